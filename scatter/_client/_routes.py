"""Routes: calls of a function the client's node cannot run, sent where it can.

A call goes to a worker of the client's node first (the fast path). A worker that
cannot run it answers, before running anything, with a failure of kind ``load`` (the
body does not load there: a missing module, another Python), ``version_not_found`` or,
for a pinned call, ``not_found`` (the node lacks the version). Such a call did not run,
so it is sent again, once per member at most, through a *route*: a pool of connections
whose leases name the function (``Lease(name, version, content_id, avoid)``), so the
node hands out a worker that can run it, its own or a member's (the node decides:
``_core/_forwarding.py``). The callable keeps its route: later calls go straight to that
worker, with no detour through a worker that cannot run them.

Any other failure, and any failure of a call that may have run (a timeout, a crash),
is raised as it is: a call is never sent twice unless it is known not to have run.

The relay: a client that cannot reach the member's worker (a connection refused, a
handshake that never completes, a network between them; ``Client(routes="relay")``
when it knows so) sends the call to its own node instead (``Relay``), which sends the
frame unchanged to a worker of that member and answers with the worker's reply
(:class:`RelaySender`). Which routes work is the client's to find out, not the node's
(only the client knows what it can reach: NAT, firewalls, containers): with
``routes="auto"`` a direct route whose worker never took the call (undelivered, twice:
it did not run) switches that route to the relay for good; the direct route stays the
fast path wherever it works.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Literal

from .. import _wire
from .._exceptions import (
    CallTimeout,
    FunctionNotFound,
    RemoteError,
    ScatterError,
    Unreachable,
    VersionNotFound,
)

if TYPE_CHECKING:
    from collections.abc import Iterator

    from ._calls import CallSender
    from ._connections import ConnectionPool

# Makes the sender of one route from what its leases ask for (Client._route_sender).
SenderFactory = Callable[[Callable[[int], _wire.Lease]], "CallSender"]

__all__ = ["RelaySender", "Routes", "refused_before_running"]

RouteMode = Literal["auto", "direct", "relay"]
# Seconds a relayed call's reply may take beyond its timeout and the workers' margin:
# the node leases the member's worker first (a forward, at most FORWARD_TIMEOUT).
_RELAY_LEASE_ALLOWANCE = 10.0
# As _connections._REPLY_MARGIN: the worker's kill grace and more.
_RELAY_REPLY_MARGIN = 3.0


def refused_before_running(error: ScatterError, pinned: bool) -> bool:
    """Whether ``error`` (a call's failure) says the call did not run because this worker's
    node cannot run it: another member may.

    Only the worker's own refusals count (``error_from_failure`` of a ``load``,
    ``version_not_found`` or ``not_found`` failure). The function's own exception (a
    ``remote`` failure) ran the call, whatever its class: one rebuilt as
    ``scatter.VersionNotFound`` (a function calling another whose version is gone) is an
    instance of ``RemoteError`` too, and is never a refusal."""
    if isinstance(error, RemoteError):
        return (
            type(error) is RemoteError
            and error.remote_type == "scatter.LoadError"
            and not error.remote_traceback
        )
    if isinstance(error, VersionNotFound):
        return True
    if isinstance(error, FunctionNotFound):
        return pinned
    return False


class RelaySender:
    """The calls of one route, relayed by the client's node (``Relay``): for a client
    that cannot reach the member's worker itself. Same interface as ``CallSender``.

    The route's first use leases through the node as a direct route does (a route
    ``Lease``: it names the member that can run the function and gives its clock, on
    which the calls' ``start_by`` is written); that lease is never connected to, and the
    member's idle expiry ends it. Each call then is one ``Relay`` request carrying the
    call's frame, encoded and validated here, which the node never re-encodes.
    """

    def __init__(self, pool: ConnectionPool, ids: Iterator[int]) -> None:
        self._pool = pool  # the route's: nodes_leased, and the lease it asks for
        self._ids = ids
        self._target: tuple[str, float | None] | None = None  # (member, its clock offset)

    def _member(self, give_up: float) -> tuple[str, float | None]:
        if self._target is None:
            control = self._pool.control
            leased: _wire.Leased = control.request(
                self._pool._lease_request, timeout=max(give_up - time.monotonic(), 0.001)
            )
            received = time.monotonic()
            node = leased.node or control.node_id
            self._pool.nodes_leased.add(node)
            offset = leased.monotonic - received if leased.monotonic else None
            self._target = (node, offset)
        return self._target

    def call(
        self, frame_for: Callable[..., bytes], timeout: float, polling: object = None
    ) -> tuple[int, bytes]:
        """Relay one call through the node: (call id, the worker's reply frame)."""
        started = time.monotonic()
        node, offset = self._member(started + timeout)
        call_id = next(self._ids)
        left = started + timeout - time.monotonic()
        if left <= 0:
            raise CallTimeout(
                f"the route took the call's timeout of {timeout:g} s", may_have_run=False
            )
        start_by = 0.0 if offset is None else time.monotonic() + left + offset
        frame = frame_for(call_id, start_by)
        route = self._pool._lease_request(0)
        try:
            relayed: _wire.Relayed = self._pool.control.request(
                lambda i: _wire.Relay(
                    i, node, route.name, route.version, route.content_id, frame, timeout
                ),
                timeout=timeout + _RELAY_REPLY_MARGIN + _RELAY_LEASE_ALLOWANCE,
            )
        except (Unreachable, CallTimeout) as exc:
            # Sent, and no answer: the node may have relayed it.
            exc.may_have_run = True
            raise
        return call_id, relayed.reply

    async def call_async(
        self, frame_for: Callable[..., bytes], timeout: float, library: str
    ) -> tuple[int, bytes]:
        """:meth:`call` in one of the pool's own threads (never the loop's executor)."""
        from ._connections import _in_thread

        threads = self._pool.lease_threads()
        return await _in_thread(
            library, threads, lambda: self.call(frame_for, timeout), lambda _: None
        )


class Routes:
    """A client's routes, one per (name, pinned version, content id, nodes avoided) and
    registry session generation: a route taken before this process changed the registry
    may lead to a member that lacks the change, so it is not used after (_calls.py).

    ``mode``: "auto" (direct, switched to the relay once a route's worker never took a
    call), "direct" (never relayed) or "relay" (always relayed: ``Client(routes=...)``).
    """

    def __init__(self, make_sender: SenderFactory, mode: RouteMode = "auto") -> None:
        self._make_sender = make_sender
        self.mode = mode
        self._lock = threading.Lock()
        self._senders: dict[
            tuple[str, int, str, tuple[str, ...], int], CallSender | RelaySender
        ] = {}

    def sender(
        self, name: str, version: int, content_id: str, avoid: tuple[str, ...], generation: int
    ) -> CallSender | RelaySender:
        key = (name, version, content_id, avoid, generation)
        with self._lock:
            sender = self._senders.get(key)
            if sender is None:
                # Routes of this function from older generations are used no more.
                for old in [k for k in self._senders if k[:3] == key[:3] and k[4] < generation]:
                    self._senders.pop(old)._pool.close()
                lease = functools.partial(
                    _wire.Lease, name=name, version=version, content_id=content_id, avoid=list(avoid)
                )
                sender = self._senders[key] = self._make_sender(lease)
                if self.mode == "relay":
                    sender = self._senders[key] = RelaySender(sender._pool, sender._ids)
            return sender

    def relay_instead(
        self, sender: CallSender | RelaySender, error: ScatterError
    ) -> RelaySender:
        """The relay for the route of ``sender``, whose worker never took a call (so the
        call did not run: ``error`` says so); raises ``error`` where the relay does not
        apply (``routes="direct"``, a call that may have run, a relay already)."""
        if self.mode == "direct" or error.may_have_run or not isinstance(error, Unreachable):
            raise error
        with self._lock:
            for key, known in self._senders.items():
                if known is sender and isinstance(known, RelaySender):
                    raise error
                if known is sender:
                    relay = self._senders[key] = RelaySender(sender._pool, sender._ids)
                    return relay
        raise error

    def pools(self) -> list[ConnectionPool]:
        with self._lock:
            return [sender._pool for sender in self._senders.values()]
