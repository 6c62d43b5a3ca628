"""Connections to leased workers, and the pool that keeps the idle ones.

A call goes straight to a worker over its own DEALER: the first connection per pool slot
is leased from the node (``Lease``, which may start a worker process), later calls reuse
it. A connection is checked out by one caller at a time and discarded after any failure,
so a pooled one never has a reply in flight.

More connections than workers (many clients, or past ``--max-workers``) share workers, and
a worker runs one call at a time. So a client on the node's machine claims its worker
before each call (``_node/_slots.WorkerClaims``: an OFD lock on the worker's slot in the
node's slots file, atomic across processes, ~2.5 us) and drops the claim with the reply.
A worker claimed by another connection, or running a call, is let go and another leased
(an idle one, or a new process), so a call never waits behind someone else's slow or
hung call while another worker could take it. Only when every worker is busy and no more
may start (the node says ``saturated``) does a call wait. A client on another machine
cannot claim: its leases stay its own until the node is past max_workers, and its calls
are seen as busy only once they run.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import zmq

from .. import _wire
from .._config import is_loopback, parse_address
from .._exceptions import CallTimeout, ScatterError, WorkerCrashed
from .._node._slots import WorkerClaims
from .._security import ClientKeys, apply_client_keys
from ._control import NodeControl
from ._polling import ReplyPolling

# A worker interrupts a call at its deadline and kills it `kill_grace` later; the client
# waits that long plus this margin before it gives up on the reply itself.
_REPLY_MARGIN = 3.0
# Seconds a call may wait to be handed to its worker's connection before it is retried
# on another worker (it was never delivered, so retrying cannot run it twice).
_SEND_TIMEOUT = 2.0
# Seconds a lease may take: starting a worker process on a loaded machine is slow.
_LEASE_TIMEOUT = 30.0
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
        self, context: zmq.Context[Any], lease: int, endpoint: str, keys: ClientKeys
    ) -> None:
        self.lease = lease
        self.endpoint = endpoint
        self.sock: zmq.Socket[bytes] = context.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        if endpoint.startswith("tcp://"):
            # The Unix socket of a worker is its user's only (a 0700 directory); TCP is
            # anyone's, so it is CURVE.
            apply_client_keys(self.sock, keys)
        # Queue only on a live connection, so a send to a dead worker fails (and can be
        # retried) instead of waiting forever for a reconnect.
        self.sock.setsockopt(zmq.IMMEDIATE, 1)
        self.sock.setsockopt(zmq.SNDTIMEO, int(_SEND_TIMEOUT * 1000))
        self.sock.setsockopt(zmq.RCVTIMEO, int(CRASH_CHECK_INTERVAL * 1000))
        self.monitor = self.sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self.sock.connect(endpoint)
        self.broken = False
        self.last_used = time.monotonic()
        # The claims on the node's workers and this worker's slot, when this machine's.
        self.claims: WorkerClaims | None = None
        self.slot = -1

    def claim(self) -> bool:
        """Claim the worker for a call (see the module docstring); False if it is busy.
        True also where nothing can be claimed (a node on another machine)."""
        claims = self.claims
        return claims is None or claims.claim(self.slot, self)

    def unclaim(self) -> None:
        if self.claims is not None:
            self.claims.release(self.slot, self)

    def dropped(self) -> bool:
        # EVENTS, not a non-blocking recv: raising zmq.Again costs ~25 us, on every call.
        if not self.broken and self.monitor.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            self.broken = True
        return self.broken

    def request(
        self, frame: bytes, timeout: float, polling: ReplyPolling | None = None
    ) -> bytes:
        """Send one call, return its reply frame; a dropped connection raises WorkerCrashed.

        A pooled connection never has a reply in flight (connections are discarded after
        any failure), so the next frame received answers this call.
        """
        sock = self.sock
        try:
            sock.send(frame)
        except zmq.Again:
            self.broken = True
            raise Undelivered from None
        if polling is not None and polling.wanted():
            polling.wait(sock)
        try:
            return self.sock.recv()
        except zmq.Again:
            pass
        # Slow path: the reply takes longer than one crash-check interval.
        started = time.monotonic() - CRASH_CHECK_INTERVAL
        while True:
            try:
                return self.sock.recv()
            except zmq.Again:
                self.check_alive(started, timeout)

    def check_alive(self, started: float, timeout: float) -> None:
        """While waiting for a reply: raise if the worker died or the wait is over."""
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
                "a crash in a C extension, or the node stopped); the node replaces "
                "it and keeps serving",
            )
        if now > started + timeout + _REPLY_MARGIN:
            self.broken = True
            raise CallTimeout(
                f"no reply within {timeout + _REPLY_MARGIN:g} s (timeout {timeout:g} s)"
            )

    async def request_async(self, frame: bytes, timeout: float, library: str) -> bytes:
        """``request`` for an event loop: waits on the socket's fd, never blocks the loop.

        The fd is edge-triggered, so ``zmq.EVENTS`` is read before every wait (the rule
        of ``_transport/_zmq_trio.py``).
        """
        fd: int = self.sock.getsockopt(zmq.FD)  # type: ignore[assignment]
        give_up_sending = time.monotonic() + _SEND_TIMEOUT
        while True:
            try:
                self.sock.send(frame, zmq.NOBLOCK)
                break
            except zmq.Again:
                if self.events() & zmq.POLLOUT:
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
                if self.events() & zmq.POLLIN:
                    continue
                self.check_alive(started, timeout)
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
    # connections let go because their worker had another connection's call
    busy_workers_avoided: int = 0


class ConnectionPool:
    """The worker connections of one client: leased from its node, idle ones kept.

    Shared by threads and event loops without a lock on the hot path: a connection is
    checked out by one caller at a time, and zmq allows a socket to move between threads
    with a memory barrier (the GIL's, around ``list.pop`` and ``list.append``).

    Args:
        control: the client's control requests (leases and releases go through it).
        context: the client's zmq context.
        transport: ``"auto"`` takes a worker's Unix socket when the node is on this
            machine's loopback, ``"tcp"`` always its TCP endpoint (see ``Client``).
    """

    def __init__(
        self, control: NodeControl, context: zmq.Context[Any], transport: Literal["auto", "tcp"]
    ) -> None:
        self.control = control
        self._context = context
        self._transport = transport
        self.idle: list[WorkerConnection] = []
        # leases, stale_connections_dropped, undelivered_retries (see ClientStatistics)
        self.counts: collections.Counter[str] = collections.Counter()
        self._pid = os.getpid()
        # {the node's slots file: the claims on its workers, None where it cannot be opened}
        self._claims: dict[str, WorkerClaims | None] = {}

    def checkout(self) -> WorkerConnection:
        busy: list[WorkerConnection] = []
        return self.take_idle(busy) or self.lease(busy)

    def try_checkout(self) -> WorkerConnection | None:
        """A connection to a worker claimed now (one lease at most), or None."""
        busy: list[WorkerConnection] = []
        connection = self.take_idle(busy)
        if connection is None:
            connection = self._lease_one()
            if not connection.claim():
                busy.append(connection)
                connection = None
        for spare in busy:
            if len(self.idle) < _CLAIM_CANDIDATES:
                self.checkin(spare)
            else:
                self.discard(spare)
        return connection

    async def checkout_async(self, library: str) -> WorkerConnection:
        """:meth:`checkout` for trio or asyncio: a lease (a round trip to the node) runs in
        a worker thread, so the loop never blocks on the node."""
        busy: list[WorkerConnection] = []
        connection = self.take_idle(busy)
        if connection is not None:
            return connection
        if library == "trio":
            import trio

            return await trio.to_thread.run_sync(self.lease, busy)
        import asyncio

        return await asyncio.get_running_loop().run_in_executor(None, self.lease, busy)

    def take_idle(self, busy: list[WorkerConnection] | None = None) -> WorkerConnection | None:
        """A pooled connection whose worker this caller could claim. Those whose worker
        another connection had go back to the pool if one could be claimed, else to
        ``busy`` (for :meth:`lease`), or are let go without ``busy``."""
        taken: list[WorkerConnection] = []
        while self.idle:
            try:
                # list.pop is atomic under the GIL: no lock on the hot path.
                connection = self.idle.pop()
            except IndexError:
                break
            # A connection idle for a while may have lost its worker (retired, replaced):
            # look (~2 us) rather than stall on a send to nobody. Busy loops skip the look.
            if time.monotonic() - connection.last_used >= _IDLE_CHECK_AFTER and connection.dropped():
                self.counts["stale_connections_dropped"] += 1
                self.discard(connection)
                continue
            if not connection.claim():
                # Another connection's call is there, maybe a long one: lease() waits
                # for it or for another worker, whichever is free first.
                self.counts["busy_workers_avoided"] += 1
                taken.append(connection)
                continue
            if taken:
                self.idle[:0] = taken  # atomic under the GIL; tried last next time
            return connection
        if busy is not None:
            busy += taken
        else:
            for connection in taken:
                self.discard(connection)
        return None

    def lease(self, busy: list[WorkerConnection] | None = None) -> WorkerConnection:
        """A claimed connection: to one of the ``busy`` ones (pooled, whose worker
        another connection had) once it is free, or to a worker newly leased.

        The node leases an idle worker, but another client may claim it first (its
        call got there between). So the call waits for whichever of up to
        ``_CLAIM_CANDIDATES`` workers frees first, looking again after pauses that
        double, and leasing one more (letting the oldest go when there are enough)
        every ``_CLAIM_NEW_LEASE_EVERY`` while none frees: never behind one
        worker, nor a few, that may be running hung calls. Past ``_LEASE_TIMEOUT`` it
        waits on one. The others stay pooled (a few): :meth:`take_idle` tries them
        all, so a client with more connections than it has callers spreads its calls
        over their workers. Without claims (a node on another machine) the first lease
        is taken.
        """
        candidates = busy if busy is not None else []
        give_up = time.monotonic() + _LEASE_TIMEOUT
        pause = _CLAIM_PAUSE
        # Pooled workers a call found busy are most often busy with a short call: look
        # at them a little before asking the node for more.
        next_lease = time.monotonic() + _CLAIM_FIRST_LEASE_AFTER if candidates else 0.0
        try:
            while True:
                for connection in candidates:
                    if connection.claim():
                        candidates.remove(connection)
                        return connection
                now = time.monotonic()
                if not candidates or now >= next_lease:
                    next_lease = now + _CLAIM_NEW_LEASE_EVERY
                    if len(candidates) >= _CLAIM_CANDIDATES:
                        self.discard(candidates.pop(0))
                    connection = self._lease_one()
                    if connection.claim():
                        return connection
                    self.counts["busy_workers_avoided"] += 1
                    candidates.append(connection)
                    continue
                if now > give_up:
                    return candidates.pop(0)
                time.sleep(pause)
                pause = min(pause * 2, _CLAIM_PAUSE_MAX)
        finally:
            # A few stay pooled: with more clients than workers, the next call finds one
            # of several workers free without asking the node.
            for connection in candidates:
                if len(self.idle) < _CLAIM_CANDIDATES:
                    self.checkin(connection)
                else:
                    self.discard(connection)

    def _lease_one(self) -> WorkerConnection:
        if os.getpid() != self._pid:
            raise ScatterError(
                "this client was created in another process (before a fork); "
                "make a new one with scatter.connect() in this process"
            )
        # A lease may wait for a worker process to start: give it longer than a lookup.
        leased: _wire.Leased = self.control.request(
            lambda i: _wire.Lease(i), timeout=_LEASE_TIMEOUT
        )
        self.counts["leases"] += 1
        endpoint = leased.endpoint
        on_this_machine = bool(leased.local_endpoint) and is_loopback(
            parse_address(self.control.address)[0]
        )
        if on_this_machine and self._transport == "auto":
            endpoint = leased.local_endpoint
        connection = WorkerConnection(self._context, leased.lease, endpoint, self.control.keys())
        if on_this_machine and leased.slot >= 0:
            connection.claims = self._claims_next_to(leased.local_endpoint)
            connection.slot = leased.slot
        return connection

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

    def checkin(self, connection: WorkerConnection) -> None:
        if connection.broken or self.control.closed:
            self.discard(connection)
            return
        connection.unclaim()
        connection.last_used = time.monotonic()
        self.idle.append(connection)

    def discard(self, connection: WorkerConnection) -> None:
        connection.close()
        # Nobody waits for the answer; a lost release only lets the node's idle expiry
        # clean up.
        self.control.send_nowait(functools.partial(_wire.Release, lease=connection.lease))

    def statistics(self) -> ClientStatistics:
        """Counters of this client's worker connections."""
        return ClientStatistics(
            leases=self.counts["leases"],
            idle_connections=len(self.idle),
            stale_connections_dropped=self.counts["stale_connections_dropped"],
            undelivered_retries=self.counts["undelivered_retries"],
            busy_workers_avoided=self.counts["busy_workers_avoided"],
        )

    def release_leases(self) -> None:
        """Tell the node the idle connections' leases are free (briefly: closing)."""
        for connection in list(self.idle):
            with contextlib.suppress(ScatterError):
                self.control.request(
                    functools.partial(_wire.Release, lease=connection.lease), timeout=0.5
                )

    def close(self) -> None:
        for connection in self.idle:
            connection.close()
        self.idle.clear()
        for claims in self._claims.values():
            if claims is not None:
                claims.close()
        self._claims.clear()
