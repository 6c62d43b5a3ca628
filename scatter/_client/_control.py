"""Control requests to a node, and what a node's ``Failure`` means on this side.

A control request (publish, describe, lease, ...) is one frame each way on a DEALER
socket, matched by id. Sockets are never shared between threads at the same time, so
each thread gets its own, with a monitor of its CURVE handshake: a wrong secret shows
there (the handshake fails and no frame ever comes), which tells it apart from a node
that does not answer.

A thread's socket is also the holder of the leases taken through it: the node ends them
when that connection closes (``connection_closed``). So a socket is never reset because a
request timed out (a late answer is skipped by its id, a late ``Leased`` released): a
client across a network would otherwise keep calling workers the node has given to
others. Where the connection ends all the same (the node gone, a handshake failed, a
disconnect seen on the monitor), its ``LeaseHolder`` ends, and the pool drops the
connections it held.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import msgspec
import zmq
from zmq.utils.monitor import recv_monitor_message

from .. import _wire
from .._config import MAX_MESSAGE_BYTES, ClientConfig, default_data_dir, parse_address
from .._core._vclock import VectorClock
from .._exceptions import (
    AuthenticationError,
    CallTimeout,
    ConfigError,
    FunctionNotFound,
    ProtocolError,
    RemoteError,
    ScatterError,
    SignatureChanged,
    Unreachable,
    ValidationError,
    VersionNotFound,
    WorkerCrashed,
)
from .._security import ClientKeys, apply_client_keys, client_keys, read_user_secret
from ._autostart import ensure_listening, nothing_listens, port_open
from ._session import CATCH_UP_SHARE, SESSION

# Seconds of silence from the node after which a request looks whether anything still
# listens at its address (a TCP connect): a stopped node is then said at once. Sooner
# when the request went out on a connection that was not up: a killed node, likely.
_NODE_GONE_CHECK_AFTER = 0.5
_NODE_GONE_CHECK_AFTER_NOT_UP = 0.1
# Seconds between refreshes of the member list a client fails over to (taken on a control
# request that finds it older; never on the call path).
MEMBERS_REFRESH = 5.0
# Members one request fails over to at most.
_MAX_FAILOVERS = 4

_log = logging.getLogger("scatter.client")

_HANDSHAKE_EVENTS = (
    zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)
# What a thread's monitor watches: its handshakes, and the end of its connection (which
# ends, on the node, the leases taken through it).
_MONITOR_EVENTS = _HANDSHAKE_EVENTS | zmq.EVENT_DISCONNECTED


class LeaseHolder:
    """One control connection, as the holder of the leases taken through it.

    ``connections`` are the worker connections leased through it (weakly held). When
    the connection ends, :meth:`NodeControl.on_leases_ended` callbacks get the holder.
    """

    __slots__ = ("__weakref__", "connections")

    def __init__(self) -> None:
        self.connections: weakref.WeakSet[Any] = weakref.WeakSet()


def error_from_failure(failure: _wire.Failure) -> ScatterError:
    """The exception a Failure stands for (the client-side half of the error tree)."""
    kind = failure.kind
    if kind == "remote":
        return RemoteError(failure.remote_type, failure.message, failure.remote_traceback)
    if kind == "validation":
        return ValidationError(failure.message, parameter=failure.parameter, path=failure.path)
    if kind == "not_found":
        return FunctionNotFound(failure.message)
    if kind == "version_not_found":
        return VersionNotFound(failure.message)
    if kind == "signature_changed":
        return SignatureChanged(
            failure.message,
            name=failure.name,
            old_version=failure.old_version,
            new_version=failure.new_version,
        )
    if kind == "timeout":
        return CallTimeout(failure.message)
    if kind == "protocol":
        return ProtocolError(failure.message)
    if kind == "invalid":
        return ConfigError(failure.message)
    if kind == "load":
        error = RemoteError("scatter.LoadError", failure.message)
        error.may_have_run = False  # refused before running
        return error
    if kind == "expired":
        return CallTimeout(failure.message, may_have_run=False)
    if kind == "duplicate":
        return ProtocolError(failure.message, may_have_run=True)
    if kind == "crashed":
        return WorkerCrashed("scatter.WorkerCrashed", failure.message)
    if kind == "forbidden":
        return AuthenticationError(failure.message)
    return ScatterError(failure.message)


# Requests whose replies carry the clock after a change: this process saw that change.
_CHANGES = (_wire.Publish, _wire.PublishSet, _wire.Rollback, _wire.Vaporize)
# Reads that carry the clock this process saw, to a node not known to hold it all.
_READS = (_wire.Describe, _wire.ListVersions, _wire.ListFunctions, _wire.CurrentVersion)
# The protocol in which nodes hold reads for a clock (read your writes).
_SEEN_CLOCK_PROTOCOL = 5
# Requests another member may answer whenever their node is found gone, delivered or not:
# reads, and a lease (one the gone node gave ended with it). Changes move only when they
# were certainly not delivered; Release, Shutdown and Leave name their node: never.
_MOVABLE_ANYWAY = (_wire.Hello, _wire.Status, _wire.CatchUp, _wire.Lease, *_READS)


class MemberUnreachable(Unreachable):
    """The client's node could not be reached for a request (a control request's error,
    before a failover decides whether another member takes it).

    ``maybe_delivered``: False only when the request certainly never reached the node (it
    was never sent, or no connection to the node was up when it was sent and none came
    up after: a connection refused, no handshake). ``gone``: nothing listens there."""

    def __init__(self, message: str, *, gone: bool, maybe_delivered: bool = True) -> None:
        super().__init__(message)
        self.gone = gone
        self.maybe_delivered = maybe_delivered
        self.request: Any = None


def _request_too_large(size: int) -> ScatterError:
    return ProtocolError(
        f"a request of {size:,} bytes is over the limit of {MAX_MESSAGE_BYTES:,} bytes a "
        "node accepts"
    )


class NodeControl:
    """Control requests to the node at ``config.address``, from any thread.

    Args:
        config: the client's resolved configuration.
        context: the client's zmq context (its worker connections share it).
        ids: the client's id counter; control requests and calls draw from it.

    Resource handling:
        Each thread's socket is made on its first request and closed by :meth:`close`.
    """

    def __init__(
        self, config: ClientConfig, context: zmq.Context[Any], ids: Iterator[int]
    ) -> None:
        self.config = config
        # The member this client uses now: the first address given, until a failover.
        self.address = config.address
        # Failover (see fail_over): the addresses given, the live members last learned
        # from the node (refreshed every MEMBERS_REFRESH s of control requests), and the
        # address last failed over from.
        self.seeds: tuple[str, ...] = config.addresses or (config.address,)
        self.members: tuple[str, ...] = ()
        self._members_due = 0.0
        self.failed_over_from = ""
        self._failover_lock = threading.Lock()
        self._context = context
        self._ids = ids
        self._local = threading.local()
        # Every thread's control socket and its monitor, closed with the client: a
        # thread-local alone would drop a finished thread's socket unclosed (a
        # ResourceWarning, and its pending messages) when the thread goes away.
        self.sockets: list[zmq.Socket[bytes]] = []
        self._lock = threading.Lock()
        self.node_ready = False
        self.node_id = ""  # the node's, from its Welcome (a route avoids it: _routes.py)
        self.closed = False
        self._client_keys: ClientKeys | None = None
        # Moves when the leases held so far stop being ours: the node was found gone, this
        # process is a forked child, or the client closed. Connections remember theirs.
        self.epoch = 0
        # Called when the node was found gone (the pool drops its idle connections).
        self.on_node_gone: list[Callable[[], None]] = []
        # Called with a LeaseHolder whose connection ended (the pool drops what it held).
        self.on_leases_ended: list[Callable[[LeaseHolder], None]] = []
        self.node_protocol = 0  # what the node's Welcome said
        # Read your writes (_session.py), in session generations: ``confirmed``, the one
        # this node was seen to hold all of (a reply's clock dominated it); ``settled``,
        # the one calls need not catch up to again (confirmed, or a CatchUp for it gave
        # up: one wait per new change, not one per call); ``lagging``, why the last
        # CatchUp fell short, added to a call's not-found error.
        self.confirmed = 0
        self.settled = 0
        self.lagging = ""

    @property
    def context(self) -> zmq.Context[Any]:
        return self._context

    def keys(self) -> ClientKeys:
        """The CURVE keys this client's secret gives (read once the node may have made it)."""
        if self._client_keys is None:
            secret = self.config.secret
            if secret is None:
                secret = read_user_secret(default_data_dir())
            if secret is None:
                raise AuthenticationError(
                    f"no secret to talk to the node at {self.address}: set SCATTER_SECRET "
                    f"(or pass secret=); a node you start keeps yours in "
                    f"{default_data_dir() / 'secret'}"
                )
            self._client_keys = client_keys(secret)
        return self._client_keys

    @property
    def can_fail_over(self) -> bool:
        """A client that may start its node (the default local address) keeps it; any
        other fails over to another member."""
        return not self.config.autostart

    def request(
        self,
        make: Callable[[int], Any],
        timeout: float | None = None,
        *,
        too_large: Callable[[int], ScatterError] = _request_too_large,
        deadline: float | None = None,
        start_node: bool = True,
    ) -> Any:
        """Send one control request (built by ``make(request_id)``) and return its reply.

        A request its node could not take goes to another live member (:meth:`fail_over`)
        when that cannot make it happen twice: reads and leases once the node is gone,
        changes only when they certainly never reached it. A change that may have reached a
        node gone since raises Unreachable saying it may have been made.
        """
        for _ in range(_MAX_FAILOVERS):
            address = self.address
            try:
                reply = self._request_here(make, timeout, too_large, deadline, start_node)
            except MemberUnreachable as exc:
                if not start_node or not self._may_move(exc):
                    if exc.maybe_delivered and isinstance(exc.request, _CHANGES):
                        raise Unreachable(
                            f"{exc}; the {type(exc.request).__name__} may have reached it "
                            "before it went, and so may have been made: look (versions(), "
                            "`scatter ls`) before sending it again"
                        ) from None
                    raise
                if not self.fail_over(address, exc, deadline):
                    raise
                continue
            if start_node and self.can_fail_over and time.monotonic() >= self._members_due:
                with contextlib.suppress(ScatterError):  # the reply stands; the list waits
                    self.refresh_members()
            return reply
        raise Unreachable(f"no member of the cluster took the request (last tried {self.address})")

    def _may_move(self, exc: MemberUnreachable) -> bool:
        """Whether another member may take the request ``exc`` failed (see request)."""
        if not self.can_fail_over or getattr(self._local, "failing_over", False):
            return False
        request = exc.request
        if isinstance(request, _MOVABLE_ANYWAY):
            return exc.gone or not exc.maybe_delivered
        return isinstance(request, _CHANGES) and not exc.maybe_delivered

    def fail_over(self, lost: str, error: BaseException, deadline: float | None = None) -> bool:
        """The node at ``lost`` is unreachable: use another live member, the first of the
        members last learned and then of the addresses given that answers. Says so once in
        the log. The leases of the lost node end with it (``epoch``, ``on_node_gone``); the
        session clock stays (the process's, ``_session.py``), so a call through the new
        member first lets it catch up with this process's own changes.

        Returns False (the client's address unchanged) if no other member answered, or
        if this client does not fail over. True also when another thread moved first.
        """
        if not self.can_fail_over or self.closed:
            return False
        with self._failover_lock:
            if self.address != lost:
                return True  # another thread moved on already
            self._local.failing_over = True
            try:
                for candidate in self._failover_candidates(lost):
                    if deadline is not None and time.monotonic() >= deadline:
                        break
                    self.address = candidate
                    self.node_ready = False
                    try:
                        self._ensure_node(deadline)
                    except ScatterError:
                        continue
                    self._leave_member(lost)
                    _log.warning(
                        "scatter: the node at %s is unreachable (%s); this client now uses "
                        "the member at %s (node %s)",
                        lost, error, candidate, self.node_id,
                    )
                    with contextlib.suppress(ScatterError):
                        self.refresh_members()
                    return True
                self.address = lost
                self.node_ready = False
                return False
            finally:
                self._local.failing_over = False

    def _failover_candidates(self, lost: str) -> list[str]:
        """Where to go from ``lost``: the live members last learned, then the addresses
        given, each once."""
        return [a for a in dict.fromkeys((*self.members, *self.seeds)) if a != lost]

    def _leave_member(self, lost: str) -> None:
        """The client now talks to another member: the leases of ``lost`` are void (never
        released elsewhere, never reused), its idle connections go."""
        self.failed_over_from = lost
        self.epoch += 1
        for callback in self.on_node_gone:
            callback()

    def refresh_members(self) -> None:
        """Learn the live members from the node (a ``Status``), for a later failover."""
        self._members_due = time.monotonic() + MEMBERS_REFRESH
        status: _wire.NodeStatus = self._request_here(
            lambda i: _wire.Status(i), None, _request_too_large, None, True
        )
        self.members = tuple(
            member["address"]
            for member in status.members
            if member["state"] in ("alive", "suspect") and member["node"] != status.node_id
        )

    def _request_here(
        self,
        make: Callable[[int], Any],
        timeout: float | None,
        too_large: Callable[[int], ScatterError],
        deadline: float | None,
        start_node: bool,
    ) -> Any:
        """:meth:`request` to the member in use, with no failover (MemberUnreachable).

        Args:
            make: builds the request from its id.
            timeout: seconds to wait for the reply (default: ``config.connect_timeout``).
            too_large: the error for a request over the frame limit, given its size.
            deadline: a ``time.monotonic()`` bounding all of it, also starting a node and
                checking its protocol (a call's timeout); None: only the reply is bounded.
            start_node: False never starts a node (nor checks one): a request to a node
                not known to answer raises Unreachable at once (releases, on close).

        Raises:
            Unreachable: the node did not answer in time.
            AuthenticationError: the node refused this client's secret.
            ProtocolError: the reply is malformed.
            ScatterError: the node's ``Failure``, as :func:`error_from_failure` maps it.
        """
        if self.closed:
            raise ScatterError("this client is closed")
        request_id = next(self._ids)
        request = make(request_id)
        frame = _wire.encoder.encode(request)
        if len(frame) > MAX_MESSAGE_BYTES:
            # Refused here, before anything is sent: a node drops a frame far past the
            # limit with its connection, unread, and the caller would only see silence.
            raise too_large(len(frame))
        if not self.node_ready:
            if not start_node:
                raise Unreachable(f"the node at {self.address} is not known to answer")
            try:
                self._ensure_node(deadline)
            except Unreachable as exc:  # nothing was sent
                lost = MemberUnreachable(str(exc), gone=True, maybe_delivered=False)
                lost.request = request
                raise lost from None
        seen: tuple[int, VectorClock] | None = None
        if isinstance(request, _READS) and self.node_protocol >= _SEEN_CLOCK_PROTOCOL:
            generation, clock = SESSION.state
            if generation > self.confirmed and clock.entries:
                seen = (generation, clock)
                frame = _wire.encoder.encode(msgspec.structs.replace(request, clock=clock))
        sock = self._socket()
        # Whether the request can have reached the node, should it be found gone: only if
        # the connection was up when it left, or came up after (a handshake).
        early_failure = self._watch_connection()
        up_at_send = self._local.up
        handshakes_at_send = self._local.handshakes
        try:
            # Never blocking: a node that stopped reading (SIGSTOP) lets requests pile up
            # on a socket that is not reset, to the high-water mark.
            sock.send(frame, zmq.NOBLOCK)
        except zmq.Again:
            self.node_ready = False
            stuck = MemberUnreachable(
                f"the node at {self.address} is not reading requests: it is busy or stopped",
                gone=False,
                maybe_delivered=False,
            )
            stuck.request = request
            raise stuck from None
        except zmq.ZMQError as exc:
            raise ScatterError(f"cannot send a request to {self.address}: {exc}") from exc
        seconds = timeout or self.config.connect_timeout
        if deadline is not None:
            seconds = min(seconds, max(0.0, deadline - time.monotonic()))
        give_up = time.monotonic() + seconds
        while True:
            try:
                received = self._receive(sock, give_up, seconds, early_failure, up_at_send)
            except Unreachable as exc:
                lost = exc if isinstance(exc, MemberUnreachable) else MemberUnreachable(
                    str(exc), gone=False
                )
                lost.request = request
                lost.maybe_delivered = up_at_send or self._local.handshakes != handshakes_at_send
                raise lost from None
            early_failure = 0
            try:
                reply = _wire.control_reply_decoder.decode(received)
            except _wire.DECODE_ERRORS as exc:
                raise ProtocolError(f"malformed reply from {self.address}: {exc}") from None
            if reply.id not in (request_id, 0):
                # An answer to a request abandoned earlier on this socket (it timed out).
                # A lease nobody waits for any more is given back at once.
                # Only this node's own: a route's lease number is a member's, and here it
                # could name another client's lease.
                if isinstance(reply, _wire.Leased) and reply.node in ("", self.node_id):
                    self.send_nowait(functools.partial(_wire.Release, lease=reply.lease))
                continue
            if isinstance(reply, _wire.Failure):
                raise error_from_failure(reply)
            self._watch_connection()  # a lease must not be credited to a connection gone
            replied = getattr(reply, "clock", None)
            if replied is not None:
                self._saw(replied, isinstance(request, _CHANGES), seen)
            return reply

    def _saw(
        self, clock: VectorClock, change: bool, seen: tuple[int, VectorClock] | None
    ) -> None:
        """A reply carried the node's registry clock: after a change of this process's
        (the session merges it), or answering a read that sent ``seen``."""
        if change:
            SESSION.saw(clock)
        generation, mine = SESSION.state
        if clock.dominates(mine):
            self._confirm(generation)
        elif seen is not None:
            if clock.dominates(seen[1]):
                self._confirm(seen[0])
            else:  # the node gave up waiting: calls do not wait again for the same clock
                self._fell_short(seen[0])

    def _confirm(self, generation: int) -> None:
        if generation > self.confirmed:
            self.confirmed = generation
        if generation >= self.settled:
            self.settled = generation
            self.lagging = ""

    def _fell_short(self, generation: int) -> None:
        if generation > self.settled:
            self.settled = generation
            self.lagging = (
                f"the node at {self.address} had not yet received every registry change "
                "this process has seen when it stopped waiting for them: they may still be "
                "on their way, or the node that made them is cut off from it"
            )

    def catch_up(self, timeout: float, deadline: float | None = None) -> None:
        """Before a call (it goes to a worker, which cannot wait for the registry): let
        the node catch up with the changes this process saw, for at most half of
        ``timeout`` (and the node's own ``read_wait``). Falling short is not an error:
        the call goes on, and a not-found answer says what the node lacked.

        Raises:
            Unreachable, AuthenticationError, ...: as any control request.
        """
        generation, clock = SESSION.state
        if generation <= self.settled:
            return
        if not self.node_ready:
            self._ensure_node_or_fail_over(deadline)
        if (
            generation <= self.confirmed
            or not clock.entries
            or self.node_protocol < _SEEN_CLOCK_PROTOCOL
        ):
            self._confirm(generation)  # nothing to catch up with, or no way to
            return
        wait = max(timeout * CATCH_UP_SHARE, 0.001)  # 0 would mean the node's read_wait
        caught: _wire.CaughtUp = self.request(
            lambda i: _wire.CatchUp(i, clock, wait),
            timeout=wait + self.config.connect_timeout,
            deadline=deadline,
        )
        if caught.clock.dominates(clock):
            self._confirm(generation)
        else:
            self._fell_short(generation)

    def send_nowait(self, make: Callable[[int], Any]) -> None:
        """Send a request nobody waits for (a lease's release); a lost one is harmless.

        Its answer is skipped by id when this thread's socket next reads.
        """
        if self.closed or not self.node_ready:
            return
        with contextlib.suppress(zmq.ZMQError):
            self._socket().send(_wire.encoder.encode(make(next(self._ids))), zmq.NOBLOCK)

    def _receive(
        self,
        sock: zmq.Socket[bytes],
        deadline: float,
        seconds: float,
        early_failure: int = 0,
        up: bool = True,
    ) -> bytes:
        """The next frame on ``sock`` before ``deadline``, or the error its silence means.
        ``early_failure``: a failed handshake seen just before the send; ``up``: whether
        the connection was up then (if not, a node gone is looked for sooner)."""
        look_for_the_node = time.monotonic() + (
            _NODE_GONE_CHECK_AFTER if up else _NODE_GONE_CHECK_AFTER_NOT_UP
        )
        while True:
            remaining = max(0, int((deadline - time.monotonic()) * 1000))
            # Look at the handshake every 100 ms: a wrong secret fails at once, not at the
            # timeout.
            if remaining and sock.poll(min(remaining, 100), zmq.POLLIN):
                return sock.recv()
            failed = self._watch_connection() or early_failure
            early_failure = 0
            if failed:
                host, port = parse_address(self.address)
                # No detail: the connection dropped mid-handshake. A wrong key reads the
                # same, but only a node that still listens can have refused it (the chaos
                # rig's seed 10: a node killed during a handshake looked like a wrong secret).
                if failed == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL and nothing_listens(
                    host, port, timeout=min(0.5, max(remaining, 1) / 1000)
                ):
                    raise self._node_gone()
                raise self._authentication_failed()
            if not remaining:
                # The socket stays: closing it would end the leases taken through it,
                # which this client's pool still uses. A late answer is skipped by its id.
                self.node_ready = False
                raise self._no_answer(seconds)
            now = time.monotonic()
            if now >= look_for_the_node:
                # Silence so far: if nothing listens any more, the node is gone (stopped,
                # killed); say so now rather than at the timeout.
                look_for_the_node = now + _NODE_GONE_CHECK_AFTER
                host, port = parse_address(self.address)
                if nothing_listens(host, port, timeout=min(0.5, remaining / 1000)):
                    raise self._node_gone()

    def _node_gone(self) -> MemberUnreachable:
        self._watch_connection()  # a handshake since the send: the request may have arrived
        self._reset_socket()
        self.node_ready = False
        self.epoch += 1  # its leases went with it
        for callback in self.on_node_gone:
            callback()
        return MemberUnreachable(
            f"no node listens at {self.address} any more (it stopped or was killed); "
            "start one with `scatter node start`",
            gone=True,
        )

    def _no_answer(self, seconds: float) -> Unreachable:
        if port_open(*parse_address(self.address)):
            return Unreachable(
                f"the node at {self.address} did not answer within {seconds:g} s: something "
                "listens there, but it is busy or stopped, or it is not a Scatter node"
            )
        return Unreachable(
            f"no node answered at {self.address} within {seconds:g} s; "
            "start one with `scatter node start` or set SCATTER_ADDRESS"
        )

    def _ensure_node_or_fail_over(self, deadline: float | None) -> None:
        address = self.address
        try:
            self._ensure_node(deadline)
        except Unreachable as exc:
            if not self.fail_over(address, exc, deadline):
                raise

    def _ensure_node(self, deadline: float | None = None) -> None:
        if self.node_ready:
            return
        config = self.config
        if self.address != config.address:  # a member failed over to: never started here
            config = dataclasses.replace(config, address=self.address, autostart=False)
        if deadline is None:
            ensure_listening(config)
        else:
            ensure_listening(config, wait=max(0.0, deadline - time.monotonic()))
        self.node_ready = True
        self._check_protocol(deadline)

    def _check_protocol(self, deadline: float | None = None) -> None:
        # A node (re)found may not be the one seen before (restarted, replaced): what it
        # was seen to hold is learned again.
        self.confirmed = self.settled = 0
        self.lagging = ""
        # Here, never failing over: the request that found the node not ready does.
        welcome: _wire.Welcome = self._request_here(
            lambda i: _wire.Hello(i), None, _request_too_large, deadline, True
        )
        self.node_protocol = welcome.protocol
        self.node_id = welcome.node_id
        if not _wire.PROTOCOL_VERSION_MIN <= welcome.protocol <= _wire.PROTOCOL_VERSION_MAX:
            self.node_ready = False
            raise ProtocolError(
                f"the node at {self.address} speaks protocol {welcome.protocol}; this client "
                f"speaks {_wire.PROTOCOL_VERSION_MIN}..{_wire.PROTOCOL_VERSION_MAX}: upgrade "
                "the older of the two"
            )

    def _socket(self) -> zmq.Socket[bytes]:
        sock: zmq.Socket[bytes] | None = getattr(self._local, "sock", None)
        if sock is not None and self._local.address != self.address:
            self._reset_socket()  # this thread's socket is to a member failed over from
            sock = None
        if sock is None:
            keys = self.keys()
            try:
                sock = self._context.socket(zmq.DEALER)
            except zmq.ZMQError as exc:
                raise ScatterError(f"cannot open a socket to {self.address}: {exc}") from exc
            sock.setsockopt(zmq.LINGER, 0)
            apply_client_keys(sock, keys)
            # Where a wrong secret shows: the handshake fails, and no frame ever comes.
            try:
                monitor = self._local.handshake = sock.get_monitor_socket(_MONITOR_EVENTS)
            except zmq.ZMQError as exc:
                sock.close(linger=0)
                raise ScatterError(f"cannot open a socket to {self.address}: {exc}") from exc
            sock.connect(self.address)
            self._local.sock = sock
            self._local.address = self.address
            self._local.up = False  # a handshake succeeded and no disconnect since
            self._local.handshakes = 0
            self._local.holder = LeaseHolder()
            with self._lock:
                self.sockets += (monitor, sock)
        return sock

    def lease_holder(self) -> LeaseHolder:
        """This thread's control connection, which holds the leases it takes (call it in
        the thread that took the lease, after the request)."""
        holder: LeaseHolder = self._local.holder
        return holder

    def _reset_socket(self) -> None:
        sock = getattr(self._local, "sock", None)
        if sock is not None:
            monitor = self._local.handshake
            sock.disable_monitor()
            monitor.close(linger=0)
            sock.close(linger=0)
            self._local.sock = None
            with self._lock:
                self.sockets.remove(sock)
                self.sockets.remove(monitor)
            self._leases_ended()

    def _leases_ended(self) -> None:
        """This thread's control connection ended: so did, on the node, its leases."""
        holder: LeaseHolder = self._local.holder
        self._local.holder = LeaseHolder()  # for what the socket leases from now on
        if holder.connections:
            for callback in self.on_leases_ended:
                callback(holder)

    def _watch_connection(self) -> int:
        """Read this thread's monitor: a connection that ended ends its lease holder.
        The event of a CURVE handshake that failed since the last look, else 0."""
        monitor: zmq.Socket[bytes] = self._local.handshake
        failed = 0
        while monitor.poll(0):
            event = recv_monitor_message(monitor)["event"]
            if event == zmq.EVENT_DISCONNECTED:
                self._local.up = False
                self._leases_ended()
                continue
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._local.up = True
                self._local.handshakes += 1
            failed = 0 if event == zmq.EVENT_HANDSHAKE_SUCCEEDED else event
        return failed

    def _authentication_failed(self) -> AuthenticationError:
        self._reset_socket()
        self.node_ready = False
        return AuthenticationError(
            f"authentication failed at {self.address}: the node refused this client's "
            "secret; check SCATTER_SECRET (or the node's --secret-file): both must be "
            "the cluster's secret, or a call-only secret made from it"
        )

    def forget_parent_connections(self, context: zmq.Context[Any]) -> None:
        """In a forked child: the parent's sockets are the parent's (see _fork.py)."""
        self._context = context
        self._local = threading.local()
        self.sockets = []
        self._lock = threading.Lock()
        self.epoch += 1  # the parent's leases are the parent's

    def close(self) -> None:
        """Refuse further requests and close every thread's socket."""
        self.closed = True
        self.epoch += 1
        for sock in self.sockets:
            sock.close(linger=0)
        self.sockets.clear()
