"""Connections to leased workers, and the pool that keeps the idle ones.

A call goes straight to a worker over its own DEALER: the first connection per pool slot
is leased from the node (``Lease``, which may start a worker process), later calls reuse
it. A connection is checked out by one caller at a time and discarded after any failure,
so a pooled one never has a reply in flight.

The pool is bounded (``Client(max_connections=...)``, as httpx's and urllib3's are): each
connection holds three zmq sockets and a worker lease, and a context allows 1,023
sockets, so 400 concurrent calls would otherwise fail with ``Too many open files``.
Calls beyond the bound wait, in order, for a connection to come back. Connections idle
longer than ``_IDLE_EXPIRY`` are closed and their leases released.

Under trio or asyncio, a lease (a round trip to the node, then maybe a wait for a worker to
come free, up to the call's timeout) runs in a thread of the pool's own, never in the
loop's default executor nor under trio's default thread limiter: those are the user's,
and calls waiting there would starve the user's own ``run_in_executor(None, ...)`` and cap
the calls in flight at that pool's size (anyio runs its worker threads apart from the
loop's executor for the same reason). Every leasing thread holds a connection or a slot of
the bound, so the pool's ``max_connections`` threads are never what a call waits for.

More connections than workers (many clients, or past ``--max-workers``) share workers, and
a worker runs one call at a time. So a client on the node's machine claims its worker
before each call (``_node/_slots.WorkerClaims``: an OFD lock on the worker's slot in the
node's slots file, atomic across processes) and drops the claim after the reply: at once
when the connection goes, else once ``CLAIM_KEPT_FOR`` passed without another call
(a caller in a loop takes its claim back without a system call).
A worker claimed by another connection, or running a call, is let go and another leased
(an idle one, or a new process), so a call never waits behind someone else's slow or
hung call while another worker could take it. Only when every worker is busy and no more
may start (the node says ``saturated``) does a call wait, until its timeout. A client on
another machine cannot claim: its leases stay its own until the node is past max_workers,
and its calls are seen as busy only once they run. The connections a call holds while it
waits for a claim count against the bound like any other.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import errno
import functools
import os
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import zmq

from .. import _wire
from .._config import is_loopback, parse_address
from .._exceptions import CallTimeout, ScatterError, Unreachable, WorkerCrashed
from .._node._slots import WorkerClaims
from .._security import ClientKeys, apply_client_keys
from ._autostart import nothing_listens
from ._control import LeaseHolder, NodeControl
from ._polling import POLLIN, POLLOUT, ReplyPolling
from ._session import SESSION

_T = TypeVar("_T")

# A worker interrupts a call at its deadline and kills it `kill_grace` later; the client
# waits that long plus this margin before it gives up on the reply itself.
_REPLY_MARGIN = 3.0
# Seconds a call may wait to be handed to its worker's connection before it is retried
# on another worker (it was never delivered, so retrying cannot run it twice).
_SEND_TIMEOUT = 2.0
# Seconds a lease may take: starting a worker process on a loaded machine is slow.
_LEASE_TIMEOUT = 30.0
# A control request that ran out this close to the call's deadline ran out with it (its
# wait is counted in whole milliseconds).
_DEADLINE_SLACK = 0.01
# Workers leased at once while every one is claimed by others (see ConnectionPool.lease),
# the pauses between looks at them (seconds: short at first, as most calls are; longer
# while none frees), and how often one more is leased while none frees.
_CLAIM_CANDIDATES = 4
_CLAIM_PAUSE = 0.0002
_CLAIM_PAUSE_MAX = 0.02
_CLAIM_NEW_LEASE_EVERY = 0.1
_CLAIM_FIRST_LEASE_AFTER = 0.002
# A pooled connection idle longer than this (seconds) is checked for a dropped worker.
_IDLE_CHECK_AFTER = 1.0
# How often a waiting call checks whether its worker's connection dropped (seconds):
# the delay before a crashed worker (os._exit, segfault) is reported.
CRASH_CHECK_INTERVAL = 0.1
# Connections one client keeps at most (idle and in use); calls beyond wait for one.
# A node runs 16 workers by default, so more connections than that only queue on them.
DEFAULT_MAX_CONNECTIONS = 64
# A pooled connection unused this long (seconds) is closed and its lease released, so a
# burst of concurrent calls does not hold the node's workers forever (httpx's keep-alive
# expiry, with the node's worker retirement, 60 s, in mind).
_IDLE_EXPIRY = 30.0
# How often a call waiting for a connection looks again on its own (seconds): a
# connection checked in at the very moment the call began to wait wakes nobody.
_QUEUE_LOOK_INTERVAL = 0.1


def _zmq_failure(exc: zmq.ZMQError, what: str) -> ScatterError:
    """A zmq error as a ScatterError: nothing zmq raises leaves the exception tree."""
    if exc.errno == errno.EMFILE:
        return ScatterError(
            f"cannot {what}: too many open sockets in this process ({exc}); lower "
            "Client(max_connections=...) or the number of clients"
        )
    return ScatterError(f"cannot {what}: {exc}")


def usable_unix_socket(endpoint: str) -> bool:
    """Whether this process can use a worker's ``ipc://`` endpoint: the socket file exists
    here and is ours. A client in another container (the path is not there) or under
    another uid (not ours, or its directory closed to us) takes TCP instead."""
    try:
        status = os.stat(endpoint.removeprefix("ipc://"))
    except OSError:
        return False
    return stat.S_ISSOCK(status.st_mode) and status.st_uid == os.getuid()


class Undelivered(Exception):
    """The call never left this process: safe to retry elsewhere."""


async def _wait_readable(fd: int, library: str, timeout: float) -> None:
    """Wait until ``fd`` is readable or ``timeout`` passes, on trio or asyncio."""
    if library == "trio":
        import trio

        with trio.move_on_after(timeout):
            await trio.lowlevel.wait_readable(fd)
        return
    import asyncio

    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(fd, wake)
    try:
        await asyncio.wait_for(ready, timeout)
    except TimeoutError:
        pass
    finally:
        loop.remove_reader(fd)


class WorkerConnection:
    """One DEALER socket to one leased worker, used by one thread at a time."""

    def __init__(
        self,
        context: zmq.Context[Any],
        lease: int,
        endpoint: str,
        keys: ClientKeys,
        epoch: int = 0,
    ) -> None:
        self.lease = lease
        self.endpoint = endpoint
        # The control's epoch when leased: a lease of a node since gone, or of the parent
        # of a forked child, is never released or reused.
        self.epoch = epoch
        self.sock: zmq.Socket[bytes] = context.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        # Never reconnect: the socket talks to the one worker process it was leased, so
        # a reply can never come from another process that took over its endpoint
        # (a replaced worker on a reused port). A dropped worker shows on the monitor.
        self.sock.setsockopt(zmq.RECONNECT_IVL, -1)
        if endpoint.startswith("tcp://"):
            # The Unix socket of a worker is its user's only (a 0700 directory); TCP is
            # anyone's, so it is CURVE.
            apply_client_keys(self.sock, keys)
        # Queue only on a live connection, so a send to a dead worker fails (and can be
        # retried) instead of waiting forever for a reconnect.
        self.sock.setsockopt(zmq.IMMEDIATE, 1)
        self.sock.setsockopt(zmq.SNDTIMEO, int(_SEND_TIMEOUT * 1000))
        self.sock.setsockopt(zmq.RCVTIMEO, int(CRASH_CHECK_INTERVAL * 1000))
        try:
            self.monitor = self.sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
            self.sock.connect(endpoint)
        except zmq.ZMQError:
            self.sock.close(linger=0)
            raise
        self.broken = False
        self.last_used = time.monotonic()
        self.generation = 0  # the pool's, when leased (see ConnectionPool.discard)
        # The claims on the node's workers and this worker's slot, when this machine's.
        self.claims: WorkerClaims | None = None
        self.slot = -1
        self.node = ""  # the node whose worker it is (Leased.node; "" from older nodes)
        # The worker's node's monotonic clock minus ours, at most (Leased.monotonic read
        # when the reply came, so the error is on the early side by up to the lease's
        # round trip); None: a node that sent no clock (its calls carry no start_by).
        self.clock_offset: float | None = None

    def start_by(self, budget: float) -> float:
        """A call's ``start_by`` sent now with ``budget`` seconds of its caller's wait:
        on the worker's clock, the moment past which its caller no longer waits for it
        to start (at most once: a call the caller gave up on never starts). One clock
        read, no system call (the vDSO)."""
        offset = self.clock_offset
        return 0.0 if offset is None else time.monotonic() + budget + offset

    def claim(self) -> bool:
        """Claim the worker for a call (see the module docstring); False if it is busy.
        True also where nothing can be claimed (a node on another machine)."""
        claims = self.claims
        return claims is None or claims.claim(self.slot, self)

    def unclaim(self, *, keep: bool = False) -> None:
        """Drop the claim; with ``keep``, only if the next call does not take it back
        soon (``WorkerClaims.release``)."""
        if self.claims is not None:
            self.claims.release(self.slot, self, keep=keep)

    def dropped(self) -> bool:
        # EVENTS, not a non-blocking recv: raising zmq.Again costs ~25 us, on every call.
        if not self.broken and self.monitor.getsockopt(zmq.EVENTS) & POLLIN:
            self.broken = True
        return self.broken

    def request(
        self,
        frame: bytes,
        timeout: float,
        polling: ReplyPolling | None = None,
        patience: float | None = None,
    ) -> bytes:
        """Send one call, return its reply frame; a dropped connection raises WorkerCrashed.

        A pooled connection never has a reply in flight (connections are discarded after
        any failure), so the next frame received answers this call.
        """
        sock = self.sock
        try:
            # Not blocking first (the same one send on the hot path): a worker gone (its
            # node killed) fails at once instead of after _SEND_TIMEOUT.
            sock.send(frame, zmq.NOBLOCK)
        except zmq.Again:
            self.send_slowly(frame)
        except zmq.ZMQError as exc:
            self.broken = True
            raise _zmq_failure(exc, "send a call") from exc
        if polling is not None and polling.wanted():
            polling.wait(sock)
        try:
            return self.sock.recv()
        except zmq.Again:
            pass
        except zmq.ZMQError as exc:
            self.broken = True
            raise _zmq_failure(exc, "receive a reply") from exc
        # Slow path: the reply takes longer than one crash-check interval.
        started = time.monotonic() - CRASH_CHECK_INTERVAL
        while True:
            try:
                return self.sock.recv()
            except zmq.Again:
                self.check_alive(started, timeout, patience)
            except zmq.ZMQError as exc:
                self.broken = True
                raise _zmq_failure(exc, "receive a reply") from exc

    def send_slowly(self, frame: bytes) -> None:
        """A send that could not leave at once: Undelivered if the worker's connection
        dropped, else wait for it up to _SEND_TIMEOUT (SNDTIMEO)."""
        try:
            if self.dropped():
                raise zmq.Again
            self.sock.send(frame)
        except zmq.Again:
            self.broken = True
            raise Undelivered from None
        except zmq.ZMQError as exc:
            self.broken = True
            raise _zmq_failure(exc, "send a call") from exc

    def check_alive(self, started: float, timeout: float, patience: float | None = None) -> None:
        """While waiting for a reply: raise if the worker died or the wait is over.

        ``timeout``: the call's, as its worker enforces it; ``patience``: how long this
        caller still waits, when less (what a wait for a worker left of the timeout)."""
        now = time.monotonic()
        if self.dropped():
            if now - started >= timeout:
                raise CallTimeout(
                    f"the call ran past its timeout of {timeout:g} s; its worker was "
                    "stopped and replaced"
                )
            raise WorkerCrashed(
                "scatter.WorkerCrashed",
                "the process running the call exited before answering (os._exit, "
                "a crash in a C extension, or its node stopped or was killed): the call "
                "may have run; a node that still runs replaces the worker and keeps serving",
            )
        wait = timeout if patience is None else patience
        if now > started + wait + _REPLY_MARGIN:
            self.broken = True
            raise CallTimeout(
                f"no reply within {wait + _REPLY_MARGIN:g} s (timeout {timeout:g} s)"
            )

    async def request_async(
        self, frame: bytes, timeout: float, library: str, patience: float | None = None
    ) -> bytes:
        """``request`` for an event loop: waits on the socket's fd, never blocks the loop.

        The fd is edge-triggered, so ``zmq.EVENTS`` is read before every wait (the rule
        of ``_transport/_zmq_trio.py``).
        """
        try:
            return await self._request_async(frame, timeout, library, patience)
        except zmq.ZMQError as exc:
            self.broken = True
            raise _zmq_failure(exc, "call a worker") from exc

    async def _request_async(
        self, frame: bytes, timeout: float, library: str, patience: float | None
    ) -> bytes:
        fd: int = self.sock.getsockopt(zmq.FD)  # type: ignore[assignment]
        give_up_sending = time.monotonic() + _SEND_TIMEOUT
        while True:
            try:
                self.sock.send(frame, zmq.NOBLOCK)
                break
            except zmq.Again:
                if self.events() & POLLOUT:
                    continue
                if time.monotonic() > give_up_sending:
                    self.broken = True
                    raise Undelivered from None
                await _wait_readable(fd, library, CRASH_CHECK_INTERVAL)
        started = time.monotonic()
        while True:
            try:
                return self.sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                if self.events() & POLLIN:
                    continue
                self.check_alive(started, timeout, patience)
                await _wait_readable(fd, library, CRASH_CHECK_INTERVAL)

    def events(self) -> int:
        events: int = self.sock.getsockopt(zmq.EVENTS)  # type: ignore[assignment]
        return events

    def close(self) -> None:
        self.unclaim()
        with contextlib.suppress(zmq.ZMQError):
            self.sock.disable_monitor()
        self.monitor.close(linger=0)
        self.sock.close(linger=0)


@dataclass(frozen=True)
class ClientStatistics:
    leases: int  # workers leased from the node so far
    idle_connections: int  # pooled connections ready for the next call
    stale_connections_dropped: int  # pooled connections whose worker had gone
    undelivered_retries: int  # calls re-sent to a new worker because nobody took them
    open_connections: int = 0  # connections open now, idle or in use (at most the bound)
    queued_calls: int = 0  # calls waiting now for a connection to come free
    expired_connections: int = 0  # idle connections closed after _IDLE_EXPIRY
    # connections let go because their worker had another connection's call
    busy_workers_avoided: int = 0


class _Waiter:
    """A call waiting for a connection: given one checked in, or a slot to lease one."""

    __slots__ = ("connection", "granted", "wake")

    def __init__(self, wake: Callable[[], None]) -> None:
        self.wake = wake
        self.granted = False
        self.connection: WorkerConnection | None = None  # None when granted: lease one


class ConnectionPool:
    """The worker connections of one client: leased from its node, idle ones kept.

    Shared by threads and event loops without a lock on the hot path: a connection is
    checked out by one caller at a time, and zmq allows a socket to move between threads
    with a memory barrier (the GIL's, around ``list.pop`` and ``list.append``). The lock
    guards only what the slow path counts: open connections and the queue of waiters.

    Args:
        control: the client's control requests (leases and releases go through it).
        context: the client's zmq context.
        transport: ``"auto"`` takes a worker's Unix socket when the node is on this
            machine's loopback and the socket file is usable here, else its TCP endpoint;
            ``"tcp"`` always its TCP endpoint (see ``Client``).
        limit: connections open at most; calls beyond it wait for one to come back.
    """

    def __init__(
        self,
        control: NodeControl,
        context: zmq.Context[Any],
        transport: Literal["auto", "tcp"],
        limit: int = DEFAULT_MAX_CONNECTIONS,
        lease_request: Callable[[int], _wire.Lease] = _wire.Lease,
    ) -> None:
        self.control = control
        # What a lease asks for: any worker of the node, or one that can run a given
        # function, maybe a member's (a route: _routes.py)
        self._lease_request = lease_request
        self.nodes_leased: set[str] = set()  # the nodes whose workers it leased
        self._context = context
        self._transport = transport
        self.limit = limit
        self.idle: list[WorkerConnection] = []
        # Connections of streams dropped without being closed: a finalizer may run in any
        # thread, in the middle of anything (a lock held, a request under way), so it only
        # appends here (atomic under the GIL) and the next checkout discards them.
        self.abandoned: list[WorkerConnection] = []
        # leases, stale_connections_dropped, undelivered_retries, expired_connections,
        # busy_workers_avoided (see ClientStatistics)
        self.counts: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()
        self._open = 0  # connections leased and not yet discarded (under _lock)
        self._waiters: collections.deque[_Waiter] = collections.deque()
        self._next_expiry = time.monotonic() + _IDLE_EXPIRY
        self._generation = 0  # moves in a forked child: the parent's connections are not ours
        # {the node's slots file: the claims on its workers, None where it cannot be opened}
        self._claims: dict[str, WorkerClaims | None] = {}
        # Where leases of trio and asyncio callers wait (see the module docstring): made
        # at the first, as many threads as connections, each started only when needed.
        self._lease_threads: concurrent.futures.ThreadPoolExecutor | None = None
        control.on_node_gone.append(self._drop_idle)
        control.on_leases_ended.append(self._leases_ended)

    # -- checking out ------------------------------------------------------------

    def checkout(self, give_up: float, *, wait: bool = True) -> WorkerConnection | None:
        """A connection whose worker this caller claimed: an idle one, else a busy one's
        or a new lease's once its worker is free (:meth:`lease`), else (at the bound) the
        next one to come back; by ``give_up`` (a ``time.monotonic()``), else CallTimeout
        or Unreachable.

        With ``wait=False``, only a worker free now (an idle connection, or one lease if
        the bound allows), else None: ``map``'s pipes past the first, which would
        otherwise wait for the workers that map's own pipes claimed.
        """
        control = self.control
        if control.settled < SESSION.generation:  # read your writes: see CallSender.call
            control.catch_up(self._left(give_up), give_up)
        busy: list[WorkerConnection] = []
        connection = self.take_idle(busy)
        if connection is not None:
            return connection
        if not wait:
            return self._try_lease(busy, give_up)
        while not busy:
            event = threading.Event()
            waiter = self._reserve(event.set)
            if waiter is None:
                return self.lease(busy, give_up, reserved=True)
            try:
                while not event.wait(min(_QUEUE_LOOK_INTERVAL, self._left(give_up))):
                    if self.idle or time.monotonic() >= give_up:
                        break
            except BaseException:
                self._give_back(waiter)
                raise
            granted = self._withdraw(waiter)
            if granted is not None:
                if granted.claim():
                    return granted
                self.counts["busy_workers_avoided"] += 1
                busy.append(granted)
                break
            if waiter.granted:  # a slot: lease a connection in it
                return self.lease(busy, give_up, reserved=True)
            if time.monotonic() >= give_up:
                raise self._queue_timeout()
            connection = self.take_idle(busy)
            if connection is not None:
                return connection
        return self.lease(busy, give_up)

    async def checkout_async(self, library: str, give_up: float) -> WorkerConnection:
        """:meth:`checkout` for trio or asyncio: waiting for a connection parks the task
        (woken from whichever thread checks one in), and a lease (a round trip to the
        node) or a wait for a busy worker runs in one of the pool's own threads
        (:meth:`lease_threads`), so the loop never blocks on the node."""
        control = self.control
        if control.settled < SESSION.generation:  # read your writes, in a thread
            await _in_thread(
                library,
                self.lease_threads(),
                lambda: control.catch_up(self._left(give_up), give_up),
                _nothing_to_give_back,
            )
        busy: list[WorkerConnection] = []
        connection = self.take_idle(busy)
        if connection is not None:
            return connection
        reserved = False
        while not busy:
            wake, wait = _async_wakeup(library)
            waiter = self._reserve(wake)
            if waiter is None:
                reserved = True
                break
            try:
                while not await wait(min(_QUEUE_LOOK_INTERVAL, self._left(give_up))):
                    if self.idle or time.monotonic() >= give_up:
                        break
            except BaseException:  # cancelled: what was granted goes to the next caller
                self._give_back(waiter)
                raise
            granted = self._withdraw(waiter)
            if granted is not None:
                if granted.claim():
                    return granted
                self.counts["busy_workers_avoided"] += 1
                busy.append(granted)
                break
            if waiter.granted:
                reserved = True
                break
            if time.monotonic() >= give_up:
                raise self._queue_timeout()
            connection = self.take_idle(busy)
            if connection is not None:
                return connection
        # Whichever comes first owns the slot and the busy connections: the thread, or
        # the clean-up of a caller cancelled before the thread began (see _in_thread).
        owner = [True]

        def lease() -> WorkerConnection:
            owner.pop()
            return self.lease(busy, give_up, reserved=reserved)

        try:
            return await _in_thread(library, self.lease_threads(), lease, self.checkin)
        except BaseException:
            try:
                owner.pop()
            except IndexError:
                pass  # the thread began: it freed what it held
            else:
                self._abandon(busy, reserved)
            raise

    def lease_threads(self) -> concurrent.futures.ThreadPoolExecutor:
        """The threads leases of trio and asyncio callers wait in: as many as the bound,
        which each one holds a part of (a slot, or a busy connection)."""
        threads = self._lease_threads
        if threads is None:
            with self._lock:
                threads = self._lease_threads
                if threads is None:
                    threads = self._lease_threads = concurrent.futures.ThreadPoolExecutor(
                        self.limit, thread_name_prefix="scatter-lease"
                    )
        return threads

    @staticmethod
    def _left(give_up: float) -> float:
        return max(0.0, give_up - time.monotonic())

    def _reserve(self, wake: Callable[[], None]) -> _Waiter | None:
        """Take a slot to lease a new connection in (None), or join the queue."""
        with self._lock:
            if self._open < self.limit:
                self._open += 1
                return None
            waiter = _Waiter(wake)
            self._waiters.append(waiter)
            return waiter

    def _try_reserve(self) -> bool:
        """Take a slot to lease a new connection in if one is free; never queue."""
        with self._lock:
            if self._open < self.limit:
                self._open += 1
                return True
            return False

    def _withdraw(self, waiter: _Waiter) -> WorkerConnection | None:
        """Leave the queue; the connection granted meanwhile, if any (a granted slot
        shows as ``waiter.granted`` with no connection)."""
        with self._lock:
            if not waiter.granted:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            return waiter.connection

    def _give_back(self, waiter: _Waiter) -> None:
        """A waiter that gave up (interrupted): what it was granted goes on."""
        granted = self._withdraw(waiter)
        if granted is not None:
            self.checkin(granted)
        elif waiter.granted:
            self._slot_freed()

    def _abandon(self, busy: list[WorkerConnection], reserved: bool) -> None:
        """A caller that gave up before leasing: its slot and busy connections go on."""
        if reserved:
            self._slot_freed()
        self._keep_spares(busy)

    def _queue_timeout(self) -> CallTimeout:
        return CallTimeout(
            f"no connection to a worker came free before the call's timeout: this "
            f"client's {self.limit} connections were all in use (Client(max_connections=...))",
            may_have_run=False,
        )

    def _busy_timeout(self) -> CallTimeout:
        return CallTimeout(
            "every worker this client could take was busy with another call until the "
            "call's timeout: the node is saturated (see `scatter node status`)",
            may_have_run=False,
        )

    def take_idle(self, busy: list[WorkerConnection] | None = None) -> WorkerConnection | None:
        """A pooled connection whose worker this caller claimed. Those whose worker
        another connection had go back to the pool (tried last) if one was claimed or
        without ``busy``, else to ``busy`` (for :meth:`lease`)."""
        taken: list[WorkerConnection] | None = None  # made only off the hot path
        while self.abandoned:
            self.discard(self.abandoned.pop())
        while self.idle:
            try:
                # list.pop is atomic under the GIL: no lock on the hot path.
                connection = self.idle.pop()
            except IndexError:
                break
            # A connection idle for a while may have lost its worker (retired, replaced):
            # look (~2 us) rather than stall on a send to nobody. Busy loops skip the look.
            if (
                time.monotonic() - connection.last_used >= _IDLE_CHECK_AFTER
                and connection.dropped()
            ):
                self.counts["stale_connections_dropped"] += 1
                self.discard(connection)
                continue
            if not connection.claim():
                # Another connection's call is there, maybe a long one: lease() waits
                # for it or for another worker, whichever is free first.
                if taken is None:
                    taken = []
                taken.append(connection)
                continue
            if taken:
                self.idle[:0] = taken  # atomic under the GIL
                if busy is not None:
                    self.counts["busy_workers_avoided"] += len(taken)
            return connection
        if taken:
            if busy is None:
                self.idle[:0] = taken
            else:
                self.counts["busy_workers_avoided"] += len(taken)
                busy += taken
        return None

    def lease(
        self, busy: list[WorkerConnection], give_up: float, *, reserved: bool = False
    ) -> WorkerConnection:
        """A claimed connection by ``give_up``: to one of the ``busy`` ones (pooled,
        whose worker another connection had) once it is free, to one checked in
        meanwhile, or to a worker newly leased (in the caller's ``reserved`` slot, else
        in one the bound has free).

        The node leases an idle worker, but another client may claim it first (its
        call got there between). So the call waits for whichever of up to
        ``_CLAIM_CANDIDATES`` workers frees first, looking again after pauses that
        double, and leasing one more (letting the oldest go when there are enough)
        every ``_CLAIM_NEW_LEASE_EVERY`` while none frees: never behind one worker, nor
        a few, that may be running hung calls. The others stay pooled (a few):
        :meth:`take_idle` tries them all, so a client with more connections than it
        has callers spreads its calls over their workers. Without claims (a node on
        another machine) the first lease is taken.

        Raises:
            CallTimeout: every worker within reach stayed busy until ``give_up``.
            Unreachable: no worker could be leased (see :meth:`_lease_one`).
        """
        candidates = busy
        pause = _CLAIM_PAUSE
        now = time.monotonic()
        # Pooled workers a call found busy are most often busy with a short call: look
        # at them a little before asking the node for more.
        next_lease = now + _CLAIM_FIRST_LEASE_AFTER if candidates else now
        try:
            while True:
                for connection in candidates:
                    if connection.claim():
                        candidates.remove(connection)
                        return connection
                # At the bound, one another caller checks in is the only other way out.
                if self.idle:
                    checked_in = self.take_idle()
                    if checked_in is not None:
                        return checked_in
                now = time.monotonic()
                if now >= give_up and not reserved:
                    raise self._busy_timeout()
                if now >= next_lease:
                    next_lease = now + _CLAIM_NEW_LEASE_EVERY
                    if not reserved and len(candidates) >= _CLAIM_CANDIDATES:
                        # Its slot goes to the next lease, or to a call queued first.
                        self.discard(candidates.pop(0))
                    if reserved or self._try_reserve():
                        reserved = False  # _lease_reserved frees it if the lease fails
                        connection = self._lease_reserved(give_up)
                        if connection.claim():
                            return connection
                        self.counts["busy_workers_avoided"] += 1
                        candidates.append(connection)
                        continue
                time.sleep(min(pause, give_up - now))
                pause = min(pause * 2, _CLAIM_PAUSE_MAX)
                if self.control.closed:  # nobody will take what this call would lease
                    raise ScatterError("this client is closed")
        finally:
            # A few stay pooled: with more clients than workers, the next call finds one
            # of several workers free without asking the node.
            self._abandon(candidates, reserved)

    def _try_lease(self, busy: list[WorkerConnection], give_up: float) -> WorkerConnection | None:
        """``checkout(wait=False)`` past the idle connections: one lease if the bound
        allows, kept for the caller only if its worker could be claimed."""
        try:
            if not self._try_reserve():
                return None
            connection = self._lease_reserved(give_up)
            if connection.claim():
                return connection
            self.counts["busy_workers_avoided"] += 1
            busy.append(connection)
            return None
        finally:
            self._keep_spares(busy)

    def _keep_spares(self, spares: list[WorkerConnection]) -> None:
        """Pool a few connections whose workers were busy, let the rest go."""
        for spare in spares:
            if len(self.idle) < _CLAIM_CANDIDATES:
                self.checkin(spare)
            else:
                self.discard(spare)
        spares.clear()

    def _lease_reserved(self, give_up: float) -> WorkerConnection:
        try:
            return self._lease_one(give_up)
        except BaseException:
            self._slot_freed()
            raise

    def _lease_one(self, give_up: float) -> WorkerConnection:
        """A connection to a worker newly leased from the node, by ``give_up``.

        A node found gone is started again once on the way (``_ensure_node``: only when
        auto-start applies), within the same ``give_up``.
        """
        control = self.control
        restarted = False
        while True:
            left = give_up - time.monotonic()
            if left <= 0:
                raise self._no_lease_in_time()
            try:
                # A lease may wait for a worker process to start: longer than a lookup.
                leased: _wire.Leased = control.request(
                    self._lease_request, timeout=min(_LEASE_TIMEOUT, left), deadline=give_up
                )
                received = time.monotonic()
                break
            except Unreachable as exc:
                if time.monotonic() >= give_up - _DEADLINE_SLACK:
                    raise self._no_lease_in_time() from exc
                # A node found gone left node_ready unset: the next request starts it again
                # when auto-start applies, else says at once that nothing listens.
                if restarted or control.node_ready:
                    raise
                restarted = True
        # The lease lives with this thread's control connection: if that ends, the node
        # ends the lease, and the pool drops the connection (_leases_ended).
        holder = control.lease_holder()
        self.counts["leases"] += 1
        endpoint = leased.endpoint
        on_this_machine = bool(leased.local_endpoint) and is_loopback(
            parse_address(control.address)[0]
        )
        if (
            on_this_machine
            and self._transport == "auto"
            and usable_unix_socket(leased.local_endpoint)
        ):
            endpoint = leased.local_endpoint
        try:
            connection = WorkerConnection(
                self._context, leased.lease, endpoint, control.keys(), control.epoch
            )
        except zmq.ZMQError as exc:
            if leased.node in ("", control.node_id):  # a route's lease is a member's
                control.send_nowait(functools.partial(_wire.Release, lease=leased.lease))
            raise _zmq_failure(exc, f"connect to a worker at {endpoint}") from exc
        connection.generation = self._generation
        holder.connections.add(connection)
        connection.node = leased.node
        if leased.monotonic:
            connection.clock_offset = leased.monotonic - received
        self.nodes_leased.add(leased.node)
        if on_this_machine and leased.slot >= 0:
            connection.claims = self._claims_next_to(leased.local_endpoint)
            connection.slot = leased.slot
        return connection

    def _no_lease_in_time(self) -> ScatterError:
        """The call's timeout ran out while leasing: the node is gone (Unreachable), or it
        listens but gave no worker in time (CallTimeout: stopped, or busy)."""
        address = self.control.address
        if nothing_listens(*parse_address(address)):
            return Unreachable(
                f"no node listens at {address} any more (it stopped or was killed); start "
                "one with `scatter node start`"
            )
        return CallTimeout(
            f"the node at {address} gave this call no worker within its timeout: the node "
            "did not answer in time (it is stopped, or very busy)",
            may_have_run=False,
        )

    def _claims_next_to(self, local_endpoint: str) -> WorkerClaims | None:
        """Claims on the node's slots file, which lies next to its workers' sockets."""
        path = os.path.join(os.path.dirname(local_endpoint.removeprefix("ipc://")), "slots")
        if path not in self._claims:
            try:
                claims: WorkerClaims | None = WorkerClaims(Path(path))
            except (OSError, ValueError, RuntimeError):  # another user's node, a container
                claims = None
            if self._claims.setdefault(path, claims) is not claims and claims is not None:
                claims.close()  # another thread opened it first
        return self._claims[path]

    # -- checking in -------------------------------------------------------------

    def checkin(self, connection: WorkerConnection) -> None:
        if connection.broken or connection.epoch != self.control.epoch:
            self.discard(connection)
            return
        connection.unclaim(keep=True)
        connection.last_used = now = time.monotonic()
        if self._waiters and self._hand_over(connection):
            return
        self.idle.append(connection)
        if now > self._next_expiry:
            self._expire_idle(now)

    def _hand_over(self, connection: WorkerConnection) -> bool:
        """Give the first waiter ``connection``; False if nobody waits after all."""
        with self._lock:
            return self._grant_locked(connection)

    def _grant_locked(self, connection: WorkerConnection | None) -> bool:
        """(Under the lock.) Wake the first waiter with ``connection``, or with a slot
        to lease one in (None)."""
        while self._waiters:
            waiter = self._waiters.popleft()
            waiter.granted = True
            waiter.connection = connection
            try:
                waiter.wake()
            except Exception:  # its event loop is gone: the next waiter gets it
                continue
            return True
        return False

    def _slot_freed(self) -> None:
        """A connection is gone: its slot goes to the first waiter, if any."""
        with self._lock:
            if not self._grant_locked(None):
                self._open -= 1

    def discard(self, connection: WorkerConnection) -> None:
        connection.close()
        if connection.generation != self._generation:
            return  # the parent's, before this process forked: not ours to count
        if connection.epoch == self.control.epoch and self._leased_here(connection):
            # Nobody waits for the answer; a lost release only lets the node's idle
            # expiry clean up. A lease of a node since gone is not released: the new
            # node may have given its number to someone else.
            self.control.send_nowait(functools.partial(_wire.Release, lease=connection.lease))
        self._slot_freed()

    def _leased_here(self, connection: WorkerConnection) -> bool:
        """Whether the client's node holds the lease (not a member it routed to, whose
        lease numbers are its own: a member's leases end by its idle expiry)."""
        return connection.node in ("", self.control.node_id)

    def _expire_idle(self, now: float) -> None:
        self._next_expiry = now + _IDLE_EXPIRY / 4
        for connection in list(self.idle):
            if now - connection.last_used < _IDLE_EXPIRY:
                continue
            try:
                self.idle.remove(connection)  # atomic: a caller may have taken it first
            except ValueError:
                continue
            self.counts["expired_connections"] += 1
            self.discard(connection)

    def _leases_ended(self, holder: LeaseHolder) -> None:
        """A control connection ended (reset, or dropped: see ``NodeControl``), and with it,
        on the node, the leases taken through it: the node may give those workers to
        anyone. Their connections are never used again: the idle ones go now, those in
        use at their checkin (the epoch no longer matches), with no release to send."""
        ended = list(holder.connections)
        for connection in ended:
            connection.epoch = -1
        for connection in ended:
            try:
                self.idle.remove(connection)  # atomic: a caller may have taken it first
            except ValueError:
                continue
            self.discard(connection)

    def drop_dropped_idle(self) -> None:
        """Discard the idle connections whose worker is gone (after a call found one so:
        its node may be gone, and its other workers with it)."""
        for connection in list(self.idle):
            if connection.dropped():
                try:
                    self.idle.remove(connection)  # atomic: a caller may have taken it first
                except ValueError:
                    continue
                self.counts["stale_connections_dropped"] += 1
                self.discard(connection)

    def _drop_idle(self) -> None:
        """The node is gone (``NodeControl`` saw nothing listen): its leases with it."""
        while self.idle:
            try:
                connection = self.idle.pop()
            except IndexError:
                break
            self.discard(connection)

    # -- the client's lifecycle ----------------------------------------------------

    def statistics(self) -> ClientStatistics:
        """Counters of this client's worker connections."""
        return ClientStatistics(
            leases=self.counts["leases"],
            idle_connections=len(self.idle),
            stale_connections_dropped=self.counts["stale_connections_dropped"],
            undelivered_retries=self.counts["undelivered_retries"],
            open_connections=self._open,
            queued_calls=len(self._waiters),
            expired_connections=self.counts["expired_connections"],
            busy_workers_avoided=self.counts["busy_workers_avoided"],
        )

    def release_leases(self) -> None:
        """Tell the node the idle connections' leases are free (briefly: closing).

        Never starts a node (``start_node=False``), and gives up on the first silence.
        """
        give_up = time.monotonic() + 0.5
        for connection in list(self.idle):
            if connection.epoch != self.control.epoch or not self._leased_here(connection):
                continue
            left = give_up - time.monotonic()
            if left <= 0:
                return
            try:
                self.control.request(
                    functools.partial(_wire.Release, lease=connection.lease),
                    timeout=left,
                    start_node=False,
                )
            except ScatterError:
                return

    def forget_parent_connections(self, context: zmq.Context[Any]) -> None:
        """In a forked child: the parent's connections are the parent's (see _fork.py)."""
        self._context = context
        self._generation += 1
        self.idle = []
        self._lock = threading.Lock()
        self._open = 0
        self._waiters = collections.deque()
        self._lease_threads = None  # the parent's threads are not in this process
        # The parent's claims share its open file, whose locks are the parent's: the
        # child locks through a file of its own (closing this copy leaves the parent's).
        inherited, self._claims = self._claims, {}
        for claims in inherited.values():
            if claims is not None:
                with contextlib.suppress(OSError):
                    claims.close()

    def close(self) -> None:
        threads, self._lease_threads = self._lease_threads, None
        if threads is not None:  # a lease under way ends with the closed control
            threads.shutdown(wait=False, cancel_futures=True)
        for connection in self.idle:
            connection.close()
        self.idle.clear()
        for claims in self._claims.values():
            if claims is not None:
                claims.close()
        self._claims.clear()


def _async_wakeup(library: str) -> tuple[Callable[[], None], Callable[[float], Any]]:
    """A thread-safe wake-up for a task on ``library``'s loop, and its timed wait (an
    awaitable that returns whether it was woken)."""
    if library == "trio":
        import trio

        token = trio.lowlevel.current_trio_token()
        event = trio.Event()

        async def wait_trio(seconds: float) -> bool:
            with trio.move_on_after(seconds):
                await event.wait()
            return event.is_set()

        return lambda: token.run_sync_soon(event.set), wait_trio
    import asyncio

    loop = asyncio.get_running_loop()
    woken = asyncio.Event()

    async def wait_asyncio(seconds: float) -> bool:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(woken.wait(), seconds)
        return woken.is_set()

    def wake_asyncio() -> None:
        loop.call_soon_threadsafe(woken.set)

    return wake_asyncio, wait_asyncio


def _nothing_to_give_back(_: object) -> None:
    pass


async def _in_thread(
    library: str,
    threads: concurrent.futures.Executor,
    function: Callable[[], _T],
    give_back: Callable[[_T], None],
) -> _T:
    """Lease in one of ``threads``; a lease that ends after its caller was cancelled is
    handed to ``give_back``. The caller never waits for the thread once cancelled: a lease
    may wait up to the call's timeout (saturated, or a worker starting). A lease not yet
    begun is not run at all."""
    future = threads.submit(function)
    try:
        if library == "trio":
            import trio

            token = trio.lowlevel.current_trio_token()
            finished = trio.Event()

            def wake(_: object) -> None:
                with contextlib.suppress(trio.RunFinishedError):
                    token.run_sync_soon(finished.set)

            future.add_done_callback(wake)
            await finished.wait()
            return future.result()
        import asyncio

        return await asyncio.wrap_future(future)
    except BaseException:
        if not future.cancel():

            def hand_back(done: concurrent.futures.Future[_T]) -> None:
                if not done.cancelled() and done.exception() is None:
                    give_back(done.result())

            future.add_done_callback(hand_back)
        raise
