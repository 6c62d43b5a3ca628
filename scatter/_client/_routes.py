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
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from .. import _wire
from .._exceptions import FunctionNotFound, RemoteError, ScatterError, VersionNotFound

if TYPE_CHECKING:
    from ._calls import CallSender
    from ._connections import ConnectionPool

# Makes the sender of one route from what its leases ask for (Client._route_sender).
SenderFactory = Callable[[Callable[[int], _wire.Lease]], "CallSender"]

__all__ = ["Routes", "refused_before_running"]


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


class Routes:
    """A client's routes, one per (name, pinned version, content id, nodes avoided) and
    registry session generation: a route taken before this process changed the registry
    may lead to a member that lacks the change, so it is not used after (_calls.py)."""

    def __init__(self, make_sender: SenderFactory) -> None:
        self._make_sender = make_sender
        self._lock = threading.Lock()
        self._senders: dict[tuple[str, int, str, tuple[str, ...], int], CallSender] = {}

    def sender(
        self, name: str, version: int, content_id: str, avoid: tuple[str, ...], generation: int
    ) -> CallSender:
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
            return sender

    def pools(self) -> list[ConnectionPool]:
        with self._lock:
            return [sender._pool for sender in self._senders.values()]
