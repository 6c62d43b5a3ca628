"""The client: control requests to a node, calls straight to the node's workers.

``Client`` is blocking and never starts an event loop, so it works the same from a
script, from threads and from inside a running loop (a Jupyter kernel). Async callers
use ``RemoteFunction.call_async``: under trio or asyncio the loop waits on the worker
connection's socket (its edge-triggered fd, EVENTS read first); only taking a new
connection from the node runs in a worker thread.

Sockets are never shared between threads at the same time: control requests use one
DEALER per thread; calls check a worker connection out of a pool and put it back.

A call's path: ``RemoteFunction.__call__`` binds (Python's own TypeError on bad arity),
encodes and validates the arguments with the version's ``CallSpec``, checks out a
``WorkerConnection``, sends one ``Call`` frame, waits for one ``Result`` or ``Failure``
frame, and decodes the result with the same spec. One message each way, no hop.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import itertools
import os
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import msgspec
import zmq
from zmq.utils.monitor import recv_monitor_message

from . import _wire
from ._config import (
    ENV_AUTOSTART,
    MAX_MESSAGE_BYTES,
    data_dir_for,
    default_data_dir,
    is_loopback,
    parse_address,
    resolve_client_config,
)
from ._core import _typespec
from ._core._registry import check_name
from ._core._signature import CallSpec, build_call_spec, decoding
from ._exceptions import (
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
from ._security import ClientKeys, apply_client_keys, client_keys, read_user_secret

_HANDSHAKE_EVENTS = (
    zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)

# A worker interrupts a call at its deadline and kills it `kill_grace` later; the client
# waits that long plus this margin before it gives up on the reply itself.
_REPLY_MARGIN = 3.0
# Room left in a frame for the call's envelope (name, ids) next to its arguments.
_MAX_ARGUMENT_BYTES = MAX_MESSAGE_BYTES - 64 * 1024
# Seconds a call may wait to be handed to its worker's connection before it is retried
# on another worker (it was never delivered, so retrying cannot run it twice).
_SEND_TIMEOUT = 2.0
# Seconds a lease may take: starting a worker process on a loaded machine is slow.
_LEASE_TIMEOUT = 30.0
# A pooled connection idle longer than this (seconds) is checked for a dropped worker.
_IDLE_CHECK_AFTER = 1.0
# How often a waiting call checks whether its worker's connection dropped (seconds):
# the delay before a crashed worker (os._exit, segfault) is reported.
_CRASH_CHECK_INTERVAL = 0.1
# How much work (seconds of calls) `map` queues on each worker connection: enough that
# the worker never idles for a round trip, little enough that the last calls of a map
# are not stuck behind a busy worker while another one has finished. Tiny calls get up
# to _PIPELINE_MAX_DEPTH in flight (16 in flight ran `add` about 4x as fast as 2 did),
# slow ones _PIPELINE_MIN_DEPTH: one running, one waiting.
_PIPELINE_WORK = 0.002
_PIPELINE_MIN_DEPTH = 2
_PIPELINE_MAX_DEPTH = _wire.MAX_PIPELINED_CALLS  # 32; workers size their queues by it


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
        return RemoteError("scatter.LoadError", failure.message)
    if kind == "forbidden":
        return AuthenticationError(failure.message)
    return ScatterError(failure.message)


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


def _per_call(timeout: float | None) -> float:
    """A per-call timeout as the wire carries it (0.0: none), or ValueError."""
    if timeout is None:
        return 0.0
    if not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    return float(timeout)


class _Undelivered(Exception):
    """The call never left this process: safe to retry elsewhere."""


class ReplyPolling:
    """Whether a sync caller polls for a function's reply before sleeping on the socket.

    A sleeping caller costs two thread wake-ups per call (zmq's I/O thread, then the
    caller), 30-70 us each when they cross cores on a small VM. Polling for the reply,
    yielding the core between looks, skips both: one-client ``add`` runs about 1.7x as
    many calls per second in ``cluster/bench.py``. It only pays while the reply comes
    within the window, so each function keeps a moving average of how often its polls
    ran out. Above ``MAX_MISSES``, calls sleep at once, and one in ``PROBE_EVERY`` polls
    anyway to notice when polling would pay again. So functions slower than the window,
    and short ones on a machine with no core to spare (their replies come late: several
    busy clients on two cores), stop polling and burn no CPU waiting. Threads race on
    the average harmlessly: it is a hint, one float store at a time.

    Also counting a long yield as a miss (a contended core) was tried and measured: it
    halved the one-client gain and bought nothing with four clients.
    """

    WINDOW = 0.00025  # seconds polled before sleeping
    MAX_MISSES = 0.2
    # A probe on a busy machine wastes up to WINDOW of CPU: 1 in 64 keeps that near 4 us
    # per call, and still notices within a few hundred calls that polling pays again.
    PROBE_EVERY = 64

    __slots__ = ("calls", "misses")

    def __init__(self) -> None:
        self.misses = 0.0
        self.calls = 0

    def wanted(self) -> bool:
        self.calls = calls = self.calls + 1
        return self.misses < self.MAX_MISSES or calls % self.PROBE_EVERY == 0

    def wait(self, sock: zmq.Socket[bytes]) -> None:
        """Poll ``sock`` until it is readable or the window ends."""
        give_up = time.perf_counter() + self.WINDOW
        while True:
            events: int = sock.getsockopt(zmq.EVENTS)  # type: ignore[assignment]
            if events & zmq.POLLIN:
                self.misses -= self.misses * 0.0625
                return
            if time.perf_counter() > give_up:
                self.misses += (1.0 - self.misses) * 0.0625
                return
            # sched_yield, not a busy loop: the worker or the I/O thread may be waiting
            # for this very core; it also drops the GIL for the caller's other threads.
            os.sched_yield()


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
        self.sock.setsockopt(zmq.RCVTIMEO, int(_CRASH_CHECK_INTERVAL * 1000))
        self.monitor = self.sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self.sock.connect(endpoint)
        self.broken = False
        self.last_used = time.monotonic()

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
            raise _Undelivered from None
        if polling is not None and polling.wanted():
            polling.wait(sock)
        try:
            return self.sock.recv()
        except zmq.Again:
            pass
        # Slow path: the reply takes longer than one crash-check interval.
        started = time.monotonic() - _CRASH_CHECK_INTERVAL
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
                if self._events() & zmq.POLLOUT:
                    continue
                if time.monotonic() > give_up_sending:
                    self.broken = True
                    raise _Undelivered from None
                await _wait_readable(fd, library, _CRASH_CHECK_INTERVAL)
        started = time.monotonic()
        while True:
            try:
                return self.sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                if self._events() & zmq.POLLIN:
                    continue
                self.check_alive(started, timeout)
                await _wait_readable(fd, library, _CRASH_CHECK_INTERVAL)

    def _events(self) -> int:
        events: int = self.sock.getsockopt(zmq.EVENTS)  # type: ignore[assignment]
        return events

    def close(self) -> None:
        with contextlib.suppress(zmq.ZMQError):
            self.sock.disable_monitor()
        self.monitor.close(linger=0)
        self.sock.close(linger=0)


class _Pipe:
    """One worker connection during a ``map``, with its calls in flight, oldest first.

    A worker runs the calls of one connection in the order they came, so replies come
    back in that order too: the next reply always answers the head of ``in_flight``.
    """

    __slots__ = ("call_seconds", "connection", "head_started", "in_flight")

    def __init__(self, connection: WorkerConnection) -> None:
        self.connection = connection
        # (position, call id, when sent)
        self.in_flight: collections.deque[tuple[int, int, float]] = collections.deque()
        self.head_started = 0.0  # when the worker began the head call (as far as we know)
        # Moving average of the time between replies while calls were queued: about what
        # one call costs the worker. 0 until measured.
        self.call_seconds = 0.0

    def full(self) -> bool:
        depth = _PIPELINE_MIN_DEPTH
        if self.call_seconds:
            depth = max(depth, min(_PIPELINE_MAX_DEPTH, int(_PIPELINE_WORK / self.call_seconds)))
        return len(self.in_flight) >= depth

    def send(self, position: int, call_id: int, frame: bytes) -> None:
        self.connection.sock.send(frame)  # SNDTIMEO bounds it; zmq.Again: undelivered
        now = time.monotonic()
        if not self.in_flight:
            self.head_started = now
        self.in_flight.append((position, call_id, now))

    def receive_ready(self, done: dict[int, tuple[int, bytes]]) -> None:
        connection = self.connection
        while self.in_flight and connection._events() & zmq.POLLIN:
            position, call_id, sent = self.in_flight.popleft()
            done[position] = (call_id, connection.sock.recv())
            now = time.monotonic()
            if sent < self.head_started:  # queued at the worker: it ran right after the last
                seconds = now - self.head_started
                self.call_seconds += (seconds - self.call_seconds) * 0.25
            self.head_started = now


@dataclass(frozen=True)
class ClientStatistics:
    leases: int  # workers leased from the node so far
    idle_connections: int  # pooled connections ready for the next call
    stale_connections_dropped: int  # pooled connections whose worker had gone
    undelivered_retries: int  # calls re-sent to a new worker because nobody took them


@dataclass(frozen=True, slots=True)
class _Version:
    """What a callable knows of the version it validates against; replaced whole."""

    number: int
    spec: CallSpec
    timeout: float  # effective: the function's own, else the node's default
    # Result | Failure, with the result's value decoded (and so validated) in the same
    # pass as its envelope: one decode per reply instead of two.
    decode_reply: Callable[[bytes], Any]


def _reply_decoder(spec: CallSpec) -> Callable[[bytes], Any]:
    result = msgspec.defstruct(
        "Result",
        [("id", int), ("version", int), ("value", spec.return_type)],
        tag=_wire.Result.__struct_config__.tag,
        array_like=True,
        frozen=True,
    )
    return decoding(result | _wire.Failure, unpickle=True)


class Client:
    """A blocking client of one node.

    Args:
        address: the node's address, such as ``tcp://127.0.0.1:4242``; default
            ``SCATTER_ADDRESS``, else this user's own (``tcp://127.0.0.1:4242`` for root,
            see ``default_address``).
        autostart: start a detached local node when none answers (default: on, unless
            ``SCATTER_AUTOSTART=0`` or the address is not on loopback).
        secret: the cluster secret, or a call-only one (``scatter secret call-only``);
            default ``SCATTER_SECRET``, else the secret this user's local nodes share.
        transport: ``"auto"`` (default) reaches a worker on the node's machine through
            its Unix socket, else its TCP endpoint (CURVE); ``"tcp"`` always takes TCP,
            for a client that shares the node's loopback but not its files (a
            container), or to measure what CURVE costs.

    Example::

        client = scatter.Client("tcp://127.0.0.1:4242")
        add = client.make_callable("add")
        add(1, 2)
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        autostart: bool | None = None,
        secret: str | None = None,
        transport: Literal["auto", "tcp"] = "auto",
    ) -> None:
        if transport not in ("auto", "tcp"):
            raise ConfigError(f"transport must be 'auto' or 'tcp', not {transport!r}")
        config = resolve_client_config(address, secret=secret)
        if autostart is not None:
            config = dataclasses.replace(config, autostart=autostart)
        self.config = config
        self.address = config.address
        self.transport = transport
        self._context: zmq.Context[Any] = zmq.Context()
        self._ids = itertools.count(1)
        # Sync calls begun and ended (see ``call``): how many are in flight, without a lock.
        self._sync_calls_started = itertools.count(1)
        self._sync_calls_ended = itertools.count(1)
        self._sync_calls_finished = 0
        self._local = threading.local()
        # Every thread's control socket, closed with the client: a thread-local alone
        # would drop a finished thread's socket unclosed (a ResourceWarning, and its
        # pending messages) when the thread goes away.
        self._control_sockets: list[zmq.Socket[bytes]] = []
        self._lock = threading.Lock()
        # Idle worker connections, shared by threads and event loops: a connection is
        # checked out by one caller at a time, and zmq allows a socket to move between
        # threads with a memory barrier (the GIL's, around pop and append).
        self._idle: list[WorkerConnection] = []
        self._node_ready = False
        self._closed = False
        self._client_keys: ClientKeys | None = None
        self._pid = os.getpid()
        self._counts: collections.Counter[str] = collections.Counter()
        weakref.finalize(
            self, Client._release_all, self._idle, self._control_sockets, self._context
        )

    # -- node control --

    def _keys(self) -> ClientKeys:
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

    def _control_socket(self) -> zmq.Socket[bytes]:
        sock: zmq.Socket[bytes] | None = getattr(self._local, "sock", None)
        if sock is None:
            keys = self._keys()
            sock = self._context.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            apply_client_keys(sock, keys)
            # Where a wrong secret shows: the handshake fails, and no frame ever comes.
            monitor = self._local.handshake = sock.get_monitor_socket(_HANDSHAKE_EVENTS)
            sock.connect(self.address)
            self._local.sock = sock
            with self._lock:
                self._control_sockets += (monitor, sock)
        return sock

    def _reset_control_socket(self) -> None:
        sock = getattr(self._local, "sock", None)
        if sock is not None:
            monitor = self._local.handshake
            sock.disable_monitor()
            monitor.close(linger=0)
            sock.close(linger=0)
            self._local.sock = None
            with self._lock:
                self._control_sockets.remove(sock)
                self._control_sockets.remove(monitor)

    def _handshake_failed(self) -> bool:
        """Whether the control socket's CURVE handshake failed since the last look."""
        monitor: zmq.Socket[bytes] = self._local.handshake
        failed = False
        while monitor.poll(0):
            event = recv_monitor_message(monitor)["event"]
            failed = event != zmq.EVENT_HANDSHAKE_SUCCEEDED
        return failed

    def _authentication_failed(self) -> AuthenticationError:
        self._reset_control_socket()
        self._node_ready = False
        return AuthenticationError(
            f"authentication failed at {self.address}: the node refused this client's "
            "secret; check SCATTER_SECRET (or the node's --secret-file): both must be "
            "the cluster's secret, or a call-only secret made from it"
        )

    def request(self, make: Callable[[int], Any], timeout: float | None = None) -> Any:
        """Send one control request (built by ``make(request_id)``) and return its reply."""
        if self._closed:
            raise ScatterError("this client is closed")
        self._ensure_node()
        request_id = next(self._ids)
        frame = _wire.encoder.encode(make(request_id))
        sock = self._control_socket()
        sock.send(frame)
        wait_ms = int((timeout or self.config.connect_timeout) * 1000)
        deadline = time.monotonic() + wait_ms / 1000
        while True:
            remaining = max(0, int((deadline - time.monotonic()) * 1000))
            ready = 0
            # Look at the handshake every 100 ms: a wrong secret fails at once, not
            # at the timeout.
            while remaining > 0 and not ready:
                step = min(remaining, 100)
                ready = sock.poll(step, zmq.POLLIN)
                remaining = max(0, int((deadline - time.monotonic()) * 1000))
                if not ready and self._handshake_failed():
                    raise self._authentication_failed()
            if not ready:
                if self._handshake_failed():
                    raise self._authentication_failed()
                # A late answer must not reach the next request: start a fresh socket.
                self._reset_control_socket()
                self._node_ready = False
                raise Unreachable(
                    f"no node answered at {self.address} within {wait_ms / 1000:g} s; "
                    "start one with `scatter node start` or set SCATTER_ADDRESS"
                )
            try:
                reply = _wire.control_reply_decoder.decode(sock.recv())
            except _wire.DECODE_ERRORS as exc:
                raise ProtocolError(f"malformed reply from {self.address}: {exc}") from None
            if reply.id not in (request_id, 0):
                continue  # an answer to a request abandoned earlier on this socket
            if isinstance(reply, _wire.Failure):
                raise error_from_failure(reply)
            return reply

    def _ensure_node(self) -> None:
        if self._node_ready:
            return
        host, port = parse_address(self.address)
        if _port_open(host, port):
            self._node_ready = True
            self._check_protocol()
            return
        if not self.config.autostart:
            hint = ""
            if os.environ.get(ENV_AUTOSTART, "").strip() not in ("", "1", "true", "yes", "on"):
                hint = f", or unset {ENV_AUTOSTART} to let Scatter start one"
            raise Unreachable(
                f"no node answered at {self.address}; start one with `scatter node start`"
                + hint
            )
        with _autostart_lock:
            if not _port_open(host, port):
                start_background_node(self.address, self.config.data_dir, announce=True)
        self._node_ready = True
        self._check_protocol()

    def _check_protocol(self) -> None:
        welcome: _wire.Welcome = self.request(lambda i: _wire.Hello(i))
        if not _wire.PROTOCOL_VERSION_MIN <= welcome.protocol <= _wire.PROTOCOL_VERSION_MAX:
            self._node_ready = False
            raise ProtocolError(
                f"the node at {self.address} speaks protocol {welcome.protocol}; this client "
                f"speaks {_wire.PROTOCOL_VERSION_MIN}..{_wire.PROTOCOL_VERSION_MAX}: upgrade "
                "the older of the two"
            )

    # -- the public operations --

    def publish(
        self, fn: Callable[..., Any], *, name: str | None = None, timeout: float | None = None
    ) -> _wire.Published:
        from ._publish import prepare_publish

        fields = prepare_publish(fn, name=name, timeout=timeout)
        published: _wire.Published = self.request(lambda i: _wire.Publish(id=i, **fields))
        return published

    def publish_set(
        self, name: str, members: list[tuple[Callable[..., Any], str | None, float | None]]
    ) -> _wire.Published:
        """Publish ``members`` (function, name, timeout) as the complete new version of a set."""
        from ._publish import prepare_publish

        check_name(name)
        requests = [
            _wire.Publish(id=0, **prepare_publish(fn, name=member_name, timeout=timeout))
            for fn, member_name, timeout in members
        ]
        published: _wire.Published = self.request(lambda i: _wire.PublishSet(i, name, requests))
        return published

    def describe(self, name: str, version: int | None = None, *, source: bool = False) -> _wire.Description:
        description: _wire.Description = self.request(
            lambda i: _wire.Describe(i, name, version or 0, source)
        )
        return description

    def current_version(self, name: str) -> int:
        moved: _wire.Moved = self.request(lambda i: _wire.CurrentVersion(i, name))
        return moved.version

    def rollback(self, name: str, to: int | None = None) -> int:
        moved: _wire.Moved = self.request(lambda i: _wire.Rollback(i, name, to))
        return moved.version

    def vaporize(self, name: str) -> None:
        self.request(lambda i: _wire.Vaporize(i, name))

    def versions(self, name: str) -> list[dict[str, Any]]:
        listing: _wire.Listing = self.request(lambda i: _wire.ListVersions(i, name))
        return listing.rows

    def functions(self) -> list[dict[str, Any]]:
        listing: _wire.Listing = self.request(lambda i: _wire.ListFunctions(i))
        return listing.rows

    def status(self) -> _wire.NodeStatus:
        status: _wire.NodeStatus = self.request(lambda i: _wire.Status(i))
        return status

    def leave(self) -> None:
        """Make the node leave its cluster gracefully (members see it as left), then stop."""
        self.request(lambda i: _wire.Leave(i))

    def members(self) -> list[dict[str, Any]]:
        """The members the node knows: node, address, state, incarnation, changes_behind."""
        return self.status().members

    def shutdown(self) -> None:
        """Stop the node this client talks to."""
        self.request(lambda i: _wire.Shutdown(i))

    def make_callable(self, name: str, version: int | None = None) -> RemoteFunction:
        return RemoteFunction(self, name, version)

    # -- worker connections --

    def _checkout(self) -> WorkerConnection:
        return self._take_idle() or self._lease_connection()

    def _take_idle(self) -> WorkerConnection | None:
        while self._idle:
            try:
                # list.pop is atomic under the GIL: no lock on the hot path.
                connection = self._idle.pop()
            except IndexError:
                break
            # A connection idle for a while may have lost its worker (retired, replaced):
            # look (~2 us) rather than stall on a send to nobody. Busy loops skip the look.
            if time.monotonic() - connection.last_used < _IDLE_CHECK_AFTER or not connection.dropped():
                return connection
            self._counts["stale_connections_dropped"] += 1
            self._discard(connection)
        return None

    def _lease_connection(self) -> WorkerConnection:
        if os.getpid() != self._pid:
            raise ScatterError(
                "this client was created in another process (before a fork); "
                "make a new one with scatter.connect() in this process"
            )
        # A lease may wait for a worker process to start: give it longer than a lookup.
        leased: _wire.Leased = self.request(lambda i: _wire.Lease(i), timeout=_LEASE_TIMEOUT)
        self._counts["leases"] += 1
        endpoint = leased.endpoint
        if (
            leased.local_endpoint
            and self.transport == "auto"
            and is_loopback(parse_address(self.address)[0])
        ):
            endpoint = leased.local_endpoint
        return WorkerConnection(self._context, leased.lease, endpoint, self._keys())

    def _checkin(self, connection: WorkerConnection) -> None:
        if connection.broken or self._closed:
            self._discard(connection)
            return
        connection.last_used = time.monotonic()
        self._idle.append(connection)

    def _discard(self, connection: WorkerConnection) -> None:
        connection.close()
        self._release_nowait(connection.lease)

    def _release_nowait(self, lease: int) -> None:
        # Nobody waits for the answer: it is skipped by id when this thread's control
        # socket next reads. A lost release only lets the node's idle expiry clean up.
        if self._closed or not self._node_ready:
            return
        with contextlib.suppress(zmq.ZMQError):
            frame = _wire.encoder.encode(_wire.Release(next(self._ids), lease))
            self._control_socket().send(frame, zmq.NOBLOCK)

    def call(
        self,
        frame_for: Callable[[int], bytes],
        timeout: float,
        polling: ReplyPolling | None = None,
    ) -> tuple[int, bytes]:
        """Send one call to a leased worker: (call id, reply frame).

        Retried on another worker once, only if it was never delivered.
        """
        # A call polls for its reply only while it is this client's only one: polling
        # threads would take the GIL from each other. Two atomic counters, no lock; a
        # stale read only makes one call sleep, or poll, when it need not.
        if next(self._sync_calls_started) - self._sync_calls_finished > 1:
            polling = None
        try:
            for attempt in range(2):
                connection = self._checkout()
                call_id = next(self._ids)
                try:
                    reply = connection.request(frame_for(call_id), timeout, polling)
                except _Undelivered:
                    self._undelivered(connection, attempt)
                    continue
                except BaseException:
                    self._discard(connection)  # a reply may still be in flight: never reuse
                    raise
                self._checkin(connection)
                return call_id, reply
            raise AssertionError("unreachable")
        finally:
            self._sync_calls_finished = next(self._sync_calls_ended)

    def call_many(
        self, frames: list[Callable[[int], bytes]], timeout: float, parallel: int
    ) -> Generator[tuple[int, bytes], None, None]:
        """Send ``frames`` over up to ``parallel`` worker connections, pipelined; yield
        (call id, reply frame) for each, in the order of ``frames``.

        Each connection keeps about ``_PIPELINE_WORK`` seconds of calls in flight. Leaving the
        iteration early (an error, or a consumer that stops) discards the connections
        that still have calls in flight, as a single call does.
        """
        pipes: list[_Pipe] = []
        poller = zmq.Poller()
        by_socket: dict[zmq.Socket[bytes], _Pipe] = {}
        done: dict[int, tuple[int, bytes]] = {}
        sent = yielded = 0
        retried = False
        try:
            while yielded < len(frames):
                while sent < len(frames):
                    pipe = self._pipe_with_room(pipes, parallel)
                    if pipe is None:
                        break
                    if pipe.connection.sock not in by_socket:
                        by_socket[pipe.connection.sock] = pipe
                        poller.register(pipe.connection.sock, zmq.POLLIN)
                    call_id = next(self._ids)
                    try:
                        pipe.send(sent, call_id, frames[sent](call_id))
                    except zmq.Again:
                        pipe.connection.broken = True
                        if pipe.in_flight:  # its worker is gone: say how, below
                            break
                        pipes.remove(pipe)
                        poller.unregister(pipe.connection.sock)
                        del by_socket[pipe.connection.sock]
                        # A call nobody took: once more, on a new lease (as a single call).
                        self._undelivered(pipe.connection, attempt=int(retried))
                        retried = True
                        continue
                    sent += 1
                while yielded in done:
                    yield done.pop(yielded)
                    yielded += 1
                if yielded == len(frames):
                    break
                for sock, _ in poller.poll(int(_CRASH_CHECK_INTERVAL * 1000)):
                    by_socket[sock].receive_ready(done)
                for pipe in pipes:
                    if pipe.in_flight:
                        pipe.connection.check_alive(pipe.head_started, timeout)
        finally:
            for pipe in pipes:
                if pipe.in_flight:
                    self._discard(pipe.connection)  # replies may still come: never reuse
                else:
                    self._checkin(pipe.connection)

    def _pipe_with_room(self, pipes: list[_Pipe], parallel: int) -> _Pipe | None:
        """The connection to send the next call on: the least loaded, a new one while
        every connection is busy and ``parallel`` allows more; None while all are full."""
        least = min(pipes, key=lambda pipe: len(pipe.in_flight), default=None)
        if (least is None or least.in_flight) and len(pipes) < parallel:
            least = _Pipe(self._checkout())
            pipes.append(least)
        if least is None or least.full():
            return None
        return least

    def _undelivered(self, connection: WorkerConnection, attempt: int) -> None:
        """A call nobody took: drop the connection; retry once, on a new lease."""
        self._counts["undelivered_retries"] += 1
        self._discard(connection)
        if attempt:
            raise Unreachable(f"no worker of the node at {self.address} accepted the call")

    async def call_async(
        self, frame_for: Callable[[int], bytes], timeout: float, library: str
    ) -> tuple[int, bytes]:
        """:meth:`call` for trio or asyncio code: the loop waits on the socket, no thread.

        Only taking a new connection (a lease, a round trip to the node) runs in a worker
        thread, so the loop never blocks on the node.
        """
        for attempt in range(2):
            connection = await self._checkout_async(library)
            call_id = next(self._ids)
            try:
                reply = await connection.request_async(frame_for(call_id), timeout, library)
            except _Undelivered:
                self._undelivered(connection, attempt)
                continue
            except BaseException:
                self._discard(connection)  # cancelled or failed with a reply in flight
                raise
            self._checkin(connection)
            return call_id, reply
        raise AssertionError("unreachable")

    async def _checkout_async(self, library: str) -> WorkerConnection:
        connection = self._take_idle()
        if connection is not None:
            return connection
        if library == "trio":
            import trio

            return await trio.to_thread.run_sync(self._lease_connection)
        import asyncio

        return await asyncio.get_running_loop().run_in_executor(None, self._lease_connection)

    def statistics(self) -> ClientStatistics:
        """Counters of this client's worker connections."""
        return ClientStatistics(
            leases=self._counts["leases"],
            idle_connections=len(self._idle),
            stale_connections_dropped=self._counts["stale_connections_dropped"],
            undelivered_retries=self._counts["undelivered_retries"],
        )

    # -- lifecycle --

    def close(self) -> None:
        """Release leases and sockets. Callables made by this client stop working."""
        if self._closed:
            return
        for connection in list(self._idle):
            with contextlib.suppress(ScatterError):
                self.request(functools.partial(_wire.Release, lease=connection.lease), timeout=0.5)
        self._closed = True
        Client._release_all(self._idle, self._control_sockets, self._context)

    @staticmethod
    def _release_all(
        idle: list[WorkerConnection],
        control_sockets: list[zmq.Socket[bytes]],
        context: zmq.Context[Any],
    ) -> None:
        for connection in idle:
            connection.close()
        idle.clear()
        for sock in control_sockets:
            sock.close(linger=0)
        control_sockets.clear()
        context.destroy(linger=0)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class RemoteFunction:
    """A callable standing for a scattered function: same signature, name and docstring.

    Arguments are validated here before anything is sent, and again on the node.
    Unpinned (``version=None``), it follows the current version: a body-only update is
    invisible to callers; a signature change raises ``SignatureChanged`` once, after which
    the callable validates against the new signature. Pinned, it runs that version while
    it exists. Safe to share between threads.
    """

    def __init__(self, client: Client, name: str, version: int | None = None) -> None:
        self._client = client
        self._name = name
        self._pinned = version
        self._version = self._load(version)
        self._polling = ReplyPolling()
        self.__name__ = name
        self.__qualname__ = name

    def _load(self, version: int | None) -> _Version:
        # The signature is rebuilt from the publisher's type description: nothing of the
        # publisher's is unpickled or run here (see _core/_typespec.py).
        description = self._client.describe(self._name, version)
        where = f"{self._name} v{description.version}"
        if not description.signature_spec:
            raise ScatterError(
                f"{where} carries no type description of its signature (it was scattered "
                "by an older Scatter); scatter it again"
            )
        try:
            signature = _typespec.rebuild(description.signature_spec)
            spec = build_call_spec(
                self._name, signature, caller=True, signature_id=description.signature_id
            )
        except Exception as exc:  # DescriptionError, NotScatterable, or msgspec's refusal
            raise ScatterError(
                f"cannot rebuild the signature of {where} from its type description "
                f"({type(exc).__name__}: {exc})"
            ) from None
        self.__signature__ = signature
        self.__doc__ = description.doc
        return _Version(
            description.version, spec, description.timeout, _reply_decoder(spec)
        )

    @property
    def version(self) -> int:
        """The version the next call validates against (and runs, if pinned)."""
        return self._version.number

    @property
    def pinned(self) -> bool:
        return self._pinned is not None

    def __repr__(self) -> str:
        pin = "pinned" if self._pinned else "following current"
        return f"<RemoteFunction {self._name}{self._version.spec.signature} v{self.version} {pin}>"

    def refresh(self) -> None:
        """Re-read the version this callable follows (the current one unless pinned)."""
        self._version = self._load(self._pinned)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        state = self._version
        return self._send(state, state.spec.encode_arguments(args, kwargs), 0.0)

    def call(self, *args: Any, timeout: float | None = None, **kwargs: Any) -> Any:
        """Call with a per-call ``timeout`` in seconds (``__call__`` takes none, so that a
        function's own parameter named ``timeout`` keeps working)."""
        state = self._version
        return self._send(state, state.spec.encode_arguments(args, kwargs), _per_call(timeout))

    def map(
        self, *iterables: Iterable[Any], timeout: float | None = None, parallel: int | None = None
    ) -> Iterator[Any]:
        """Call the function once per item of ``zip(*iterables)``, on up to ``parallel``
        worker processes at once; return an iterator of the results, in order.

        Like ``builtins.map``, positional arguments only. Every item's arguments are
        validated before the first call is sent: a bad item raises here, naming its
        position, and nothing runs. A call that fails raises its error when the
        iteration reaches it. ``parallel`` defaults to the number of CPUs here; each
        worker also has the next calls queued, so it never waits for a round trip.

        Example::

            squares = list(scatter.make_callable("square").map(range(1000)))
        """
        if not iterables:
            raise TypeError(f"{self._name}.map() needs at least one iterable of arguments")
        if parallel is None:
            parallel = os.cpu_count() or 1
        if not isinstance(parallel, int) or parallel < 1:
            raise ValueError(f"parallel must be a positive number of workers, got {parallel!r}")
        per_call = _per_call(timeout)
        state = self._version
        frames = []
        for position, args in enumerate(zip(*iterables, strict=False)):
            try:
                arguments = state.spec.encode_arguments(args, {})
            except TypeError as exc:  # ValidationError is a TypeError too
                exc.add_note(f"(in the call for item {position} of map)")
                raise
            frames.append(self._frame_for(state, arguments, per_call))
        return self._results(state, frames, per_call or state.timeout, parallel)

    def _results(
        self, state: _Version, frames: list[Callable[[int], bytes]], timeout: float, parallel: int
    ) -> Iterator[Any]:
        # closing: an error here, or a consumer that stops early, ends call_many at once,
        # which discards the connections with calls still in flight.
        with contextlib.closing(self._client.call_many(frames, timeout, parallel)) as replies:
            for call_id, reply in replies:
                yield self._finish(state, call_id, reply)

    def _send(self, state: _Version, arguments: bytes, timeout: float) -> Any:
        frame = self._frame_for(state, arguments, timeout)
        call_id, reply = self._client.call(frame, timeout or state.timeout, self._polling)
        return self._finish(state, call_id, reply)

    async def call_async(self, *args: Any, timeout: float | None = None, **kwargs: Any) -> Any:
        """Await a call from trio or asyncio code, with an optional per-call ``timeout``.

        The event loop waits on the worker connection's socket: no thread per call.

        Example::

            total = await scatter.make_callable("add").call_async(1, 2)
        """
        import sniffio

        library = sniffio.current_async_library()
        if library not in ("trio", "asyncio"):
            raise ScatterError(f"call_async runs under trio or asyncio, not {library}")
        state = self._version
        arguments = state.spec.encode_arguments(args, kwargs)
        frame = self._frame_for(state, arguments, _per_call(timeout))
        call_id, reply = await self._client.call_async(
            frame, timeout or state.timeout, library
        )
        return self._finish(state, call_id, reply)

    def _frame_for(
        self, state: _Version, arguments: bytes, timeout: float
    ) -> Callable[[int], bytes]:
        if len(arguments) > _MAX_ARGUMENT_BYTES:
            raise ProtocolError(
                f"{self._name}(): the arguments encode to {len(arguments)} bytes, over the "
                f"limit of {_MAX_ARGUMENT_BYTES} bytes a node accepts; pass a path or a "
                "reference to the data instead"
            )
        payload = msgspec.Raw(arguments)
        pinned = self._pinned or 0
        number = state.number
        signature_id = "" if pinned else state.spec.signature_id
        name = self._name
        encode = _wire.encoder.encode

        def frame(call_id: int) -> bytes:
            return encode(_wire.Call(call_id, name, pinned, number, signature_id, timeout, payload))

        return frame

    def _finish(self, state: _Version, call_id: int, frame_bytes: bytes) -> Any:
        pinned = self._pinned or 0
        try:
            reply = state.decode_reply(frame_bytes)
        except _wire.DECODE_ERRORS:
            # Say precisely what is wrong: a result not matching the annotation, or a
            # frame that is no reply at all.
            reply = self._decode_reply_slowly(frame_bytes, state)
        if reply.id != call_id and reply.id != 0:
            raise ProtocolError(f"reply {reply.id} to call {call_id}: the worker is confused")
        if type(reply) is _wire.Failure:
            raise self._failure(reply, state)
        if reply.version != state.number and not pinned:
            # Body-only update (the signature id matched): follow it silently.
            self._version = dataclasses.replace(state, number=reply.version)
        return reply.value

    def _decode_reply_slowly(self, frame: bytes, state: _Version) -> Any:
        try:
            reply = _wire.worker_reply_decoder.decode(frame)
        except _wire.DECODE_ERRORS as exc:
            raise ProtocolError(f"malformed reply to a call of {self._name}: {exc}") from None
        if isinstance(reply, _wire.Result):
            # Raises the ValidationError that applies, or decodes what only the slow path
            # takes: an int beyond 64 bits where the annotation is not Any.
            value = state.spec.decode_result(reply.value)
            return msgspec.structs.replace(reply, value=value)
        return reply

    def _failure(self, failure: _wire.Failure, state: _Version) -> ScatterError:
        error = error_from_failure(failure)
        if isinstance(error, SignatureChanged):
            with contextlib.suppress(ScatterError):
                self.refresh()
        return error


# -- auto-start --

_autostart_lock = threading.Lock()
# Detached nodes started by this process: kept referenced so that Popen's destructor does
# not warn about a child still running (it is meant to outlive us).
_background_nodes: list[subprocess.Popen[bytes]] = []


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def start_background_node(
    address: str,
    data_dir: Path | None = None,
    *,
    announce: bool = False,
    wait: float = 60.0,
    node_options: list[str] | None = None,
) -> int:
    """Start a detached node process (it outlives this one) and wait until it answers.

    Returns:
        the node's pid.
    """
    directory = data_dir or data_dir_for(address)
    directory.mkdir(parents=True, exist_ok=True)
    log_path = directory / "node.log"
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "scatter._node",
                "--address",
                address,
                "--data-dir",
                str(directory),
                *(node_options or []),
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
            close_fds=True,
        )
    _background_nodes.append(process)
    if announce:
        print(
            f"scatter: no node answered at {address}; started one in the background "
            f"(pid {process.pid}, log {log_path})",
            file=sys.stderr,
        )
    host, port = parse_address(address)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if _port_open(host, port):
            return process.pid
        if process.poll() is not None and not _port_open(host, port):
            tail = log_path.read_text(errors="replace").strip().splitlines()[-3:]
            raise Unreachable(
                f"the background node exited with code {process.returncode}: "
                + " | ".join(tail)
            )
        time.sleep(0.05)
    raise Unreachable(f"the background node did not start listening at {address} in {wait:g} s")
