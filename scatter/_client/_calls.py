"""The call path: a ``RemoteFunction`` and the senders that carry its calls.

``RemoteFunction.__call__`` binds (Python's own TypeError on bad arity), encodes and
validates the arguments with the version's ``CallSpec``, and builds the ``Call`` frame;
``CallSender`` checks out a ``WorkerConnection``, sends the frame and waits for one
``Result`` or ``Failure``; the callable decodes the result with the same spec. One
message each way, no hop. The sync call, ``call_async`` and ``map`` share the framing and
the decoding (``RemoteFunction._frame_for`` and ``_finish``) and differ only in how they
wait: on the socket (sync), on the event loop (async), or over several pipelined
connections at once (map).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import itertools
import os
import time
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgspec
import zmq

from .. import _wire
from .._config import MAX_MESSAGE_BYTES
from .._core import _typespec
from .._core._signature import CallSpec, build_call_spec, decoding
from .._exceptions import ProtocolError, ScatterError, SignatureChanged, Unreachable
from ._connections import CRASH_CHECK_INTERVAL, ConnectionPool, Undelivered, WorkerConnection
from ._control import error_from_failure
from ._polling import ReplyPolling

if TYPE_CHECKING:
    from ._client import Client

# Room left in a frame for the call's envelope (name, ids) next to its arguments.
_MAX_ARGUMENT_BYTES = MAX_MESSAGE_BYTES - 64 * 1024
# How much work (seconds of calls) `map` queues on each worker connection: enough that
# the worker never idles for a round trip, little enough that the last calls of a map
# are not stuck behind a busy worker while another one has finished. Tiny calls get up
# to _PIPELINE_MAX_DEPTH in flight (16 in flight ran `add` about 4x as fast as 2 did),
# slow ones _PIPELINE_MIN_DEPTH: one running, one waiting.
_PIPELINE_WORK = 0.002
_PIPELINE_MIN_DEPTH = 2
_PIPELINE_MAX_DEPTH = _wire.MAX_PIPELINED_CALLS  # 32; workers size their queues by it


def _per_call(timeout: float | None) -> float:
    """A per-call timeout as the wire carries it (0.0: none), or ValueError."""
    if timeout is None:
        return 0.0
    if not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    return float(timeout)


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
        while self.in_flight and connection.events() & zmq.POLLIN:
            position, call_id, sent = self.in_flight.popleft()
            done[position] = (call_id, connection.sock.recv())
            now = time.monotonic()
            if sent < self.head_started:  # queued at the worker: it ran right after the last
                seconds = now - self.head_started
                self.call_seconds += (seconds - self.call_seconds) * 0.25
            self.head_started = now


class CallSender:
    """Sends call frames to a client's leased workers: one at a time (sync or async), or
    many at once, pipelined (``map``).

    A call nobody took (its worker was gone before the frame left) is retried once on
    a new lease; a call that may have reached its worker never is.

    Args:
        pool: the client's worker connections.
        ids: the client's id counter; call ids and control request ids draw from it.
    """

    def __init__(self, pool: ConnectionPool, ids: Iterator[int]) -> None:
        self._pool = pool
        self._ids = ids
        # Sync calls begun and ended (see ``call``): how many are in flight, without a lock.
        self._sync_calls_started = itertools.count(1)
        self._sync_calls_ended = itertools.count(1)
        self._sync_calls_finished = 0

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
        pool = self._pool
        try:
            for attempt in range(2):
                connection = pool.checkout()
                call_id = next(self._ids)
                try:
                    reply = connection.request(frame_for(call_id), timeout, polling)
                except Undelivered:
                    self._undelivered(connection, attempt)
                    continue
                except BaseException:
                    pool.discard(connection)  # a reply may still be in flight: never reuse
                    raise
                pool.checkin(connection)
                return call_id, reply
            raise AssertionError("unreachable")
        finally:
            self._sync_calls_finished = next(self._sync_calls_ended)

    async def call_async(
        self, frame_for: Callable[[int], bytes], timeout: float, library: str
    ) -> tuple[int, bytes]:
        """:meth:`call` for trio or asyncio code: the loop waits on the socket, no thread.

        Only taking a new connection (a lease, a round trip to the node) runs in a worker
        thread, so the loop never blocks on the node.
        """
        pool = self._pool
        for attempt in range(2):
            connection = await pool.checkout_async(library)
            call_id = next(self._ids)
            try:
                reply = await connection.request_async(frame_for(call_id), timeout, library)
            except Undelivered:
                self._undelivered(connection, attempt)
                continue
            except BaseException:
                pool.discard(connection)  # cancelled or failed with a reply in flight
                raise
            pool.checkin(connection)
            return call_id, reply
        raise AssertionError("unreachable")

    def _undelivered(self, connection: WorkerConnection, attempt: int) -> None:
        """A call nobody took: drop the connection; retry once, on a new lease."""
        self._pool.counts["undelivered_retries"] += 1
        self._pool.discard(connection)
        if attempt:
            raise Unreachable(
                f"no worker of the node at {self._pool.control.address} accepted the call"
            )

    def call_many(
        self, frames: list[Callable[[int], bytes]], timeout: float, parallel: int
    ) -> Generator[tuple[int, bytes], None, None]:
        """Send ``frames`` over up to ``parallel`` worker connections, pipelined; yield
        (call id, reply frame) for each, in the order of ``frames``.

        Each connection keeps about ``_PIPELINE_WORK`` seconds of calls in flight. Leaving the
        iteration early (an error, or a consumer that stops) discards the connections
        that still have calls in flight, as a single call does.
        """
        limit = [parallel]  # lowered when no more workers are free
        pipes: list[_Pipe] = []
        poller = zmq.Poller()
        by_socket: dict[zmq.Socket[bytes], _Pipe] = {}
        done: dict[int, tuple[int, bytes]] = {}
        sent = yielded = 0
        retried = False
        try:
            while yielded < len(frames):
                while sent < len(frames):
                    pipe = self._pipe_with_room(pipes, limit)
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
                for sock, _ in poller.poll(int(CRASH_CHECK_INTERVAL * 1000)):
                    by_socket[sock].receive_ready(done)
                for pipe in pipes:
                    if pipe.in_flight:
                        pipe.connection.check_alive(pipe.head_started, timeout)
        finally:
            for pipe in pipes:
                if pipe.in_flight:
                    self._pool.discard(pipe.connection)  # replies may still come: never reuse
                else:
                    self._pool.checkin(pipe.connection)

    def _pipe_with_room(self, pipes: list[_Pipe], limit: list[int]) -> _Pipe | None:
        """The connection to send the next call on: the least loaded, a new one while
        every connection is busy and ``limit[0]`` allows more; None while all are full."""
        least = min(pipes, key=lambda pipe: len(pipe.in_flight), default=None)
        if (least is None or least.in_flight) and len(pipes) < limit[0]:
            # Past the first, a pipe only to a worker free now: waiting for one would
            # wait for this map's own pipes (more `parallel` than workers); none free,
            # this map makes do with the pipes it has.
            connection = self._pool.try_checkout() if pipes else self._pool.checkout()
            if connection is None:
                limit[0] = len(pipes)
            else:
                least = _Pipe(connection)
                pipes.append(least)
        if least is None or least.full():
            return None
        return least


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
        self._sender = client._sender  # the call path; the client keeps control requests
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
        with contextlib.closing(self._sender.call_many(frames, timeout, parallel)) as replies:
            for call_id, reply in replies:
                yield self._finish(state, call_id, reply)

    def _send(self, state: _Version, arguments: bytes, timeout: float) -> Any:
        frame = self._frame_for(state, arguments, timeout)
        call_id, reply = self._sender.call(frame, timeout or state.timeout, self._polling)
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
        call_id, reply = await self._sender.call_async(
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

