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
import sys
import time
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgspec
import zmq

from .. import _wire
from .._config import MAX_MESSAGE_BYTES
from .._core import _typespec
from .._core._signature import CallSpec, answer_decoding, build_call_spec
from .._exceptions import (
    CallTimeout,
    ProtocolError,
    ScatterError,
    SignatureChanged,
    Unreachable,
    VersionNotFound,
)
from . import _callid
from ._connections import (
    _SEND_TIMEOUT,
    CRASH_CHECK_INTERVAL,
    ConnectionPool,
    Undelivered,
    WorkerConnection,
    _wait_readable as wait_readable,
    _zmq_failure,
)
from ._control import error_from_failure
from ._polling import POLLIN, POLLOUT, ReplyPolling
from ._remote_errors import remote_error
from ._routes import RelaySender, refused_before_running
from ._session import SESSION

if TYPE_CHECKING:
    from ._client import Client

# A call's frame, from its id and its start_by (the worker's clock past which the worker
# must not start it; 0: no bound): RemoteFunction._frame_for.
FrameFor = Callable[..., bytes]

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
# Routes one call tries at most (each avoids the nodes that refused it before).
_MAX_ROUTES = 4


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
        while self.in_flight and connection.events() & POLLIN:
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
        self._control = pool.control
        self._ids = ids
        # Sync calls begun and ended (see ``call``): how many are in flight, without a lock.
        self._sync_calls_started = itertools.count(1)
        self._sync_calls_ended = itertools.count(1)
        self._sync_calls_finished = 0

    def call(
        self,
        frame_for: FrameFor,
        timeout: float,
        polling: ReplyPolling | None = None,
    ) -> tuple[int, bytes]:
        """Send one call to a leased worker: (call id, reply frame).

        Retried on another worker once, only if it was never delivered.
        """
        # The call's timeout bounds the slow paths too (a lease, a node started again);
        # the hot path, an idle connection, reads no clock for it.
        give_up = None
        if self._control.settled < SESSION.generation:
            # This process made a change the node has not shown it holds: let the node
            # catch up first (read your writes, _session.py). Two ints on the hot path.
            give_up = time.monotonic() + timeout
            self._control.catch_up(timeout, give_up)
        # A call polls for its reply only while it is this client's only one: polling
        # threads would take the GIL from each other. Two atomic counters, no lock; a
        # stale read only makes one call sleep, or poll, when it need not.
        if next(self._sync_calls_started) - self._sync_calls_finished > 1:
            polling = None
        pool = self._pool
        try:
            for attempt in range(2):
                connection = pool.take_idle()
                if connection is None:
                    if give_up is None:
                        give_up = time.monotonic() + timeout
                    connection = pool.checkout(give_up)
                    assert connection is not None
                call_id = next(self._ids)
                # What is left of the call's timeout after a lease waited: the reply may
                # not have all of it again.
                budget = timeout if give_up is None else give_up - time.monotonic()
                if budget <= 0:
                    pool.checkin(connection)
                    raise CallTimeout(
                        f"no worker came free within the call's timeout of {timeout:g} s",
                        may_have_run=False,
                    )
                try:
                    reply = connection.request(
                        frame_for(call_id, connection.start_by(budget)),
                        timeout,
                        polling,
                        None if give_up is None else budget,
                    )
                except Undelivered:
                    if give_up is None:  # the send waited _SEND_TIMEOUT for nobody
                        give_up = time.monotonic() - _SEND_TIMEOUT + timeout
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
        self, frame_for: FrameFor, timeout: float, library: str
    ) -> tuple[int, bytes]:
        """:meth:`call` for trio or asyncio code: the loop waits on the socket, no thread.

        Only taking a new connection (a lease, a round trip to the node) runs in a thread,
        one of the pool's own (never the loop's default executor), so the loop never
        blocks on the node.
        """
        pool = self._pool
        give_up = time.monotonic() + timeout
        for attempt in range(2):
            connection = await pool.checkout_async(library, give_up)
            call_id = next(self._ids)
            budget = give_up - time.monotonic()  # the reply may not have all of it again
            if budget <= 0:
                pool.checkin(connection)
                raise CallTimeout(
                    f"no worker came free within the call's timeout of {timeout:g} s",
                    may_have_run=False,
                )
            try:
                reply = await connection.request_async(
                    frame_for(call_id, connection.start_by(budget)), timeout, library, budget
                )
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
        """A call nobody took: drop the connection; retry once, on a new lease (from
        another member if the node went: the lease fails over, ``NodeControl.request``).
        The other idle connections whose workers went too are dropped first."""
        self._pool.counts["undelivered_retries"] += 1
        self._pool.discard(connection)
        self._pool.drop_dropped_idle()
        if attempt:
            raise Unreachable(
                f"no worker of the node at {self._pool.control.address} accepted the call"
            )

    def call_many(
        self, frames: list[FrameFor], timeout: float, parallel: int
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
        give_up = time.monotonic() + timeout  # for taking connections: each call has its own
        try:
            while yielded < len(frames):
                while sent < len(frames):
                    pipe = self._pipe_with_room(pipes, limit, give_up)
                    if pipe is None:
                        break
                    if pipe.connection.sock not in by_socket:
                        by_socket[pipe.connection.sock] = pipe
                        poller.register(pipe.connection.sock, zmq.POLLIN)
                    call_id = next(self._ids)
                    try:
                        start_by = pipe.connection.start_by(timeout)
                        pipe.send(sent, call_id, frames[sent](call_id, start_by))
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
                    except zmq.ZMQError as exc:
                        pipe.connection.broken = True
                        raise ScatterError(f"cannot send a call of map: {exc}") from exc
                    sent += 1
                while yielded in done:
                    yield done.pop(yielded)
                    yielded += 1
                if yielded == len(frames):
                    break
                try:
                    for sock, _ in poller.poll(int(CRASH_CHECK_INTERVAL * 1000)):
                        by_socket[sock].receive_ready(done)
                except zmq.ZMQError as exc:  # not zmq.Again: the sockets are unusable
                    for pipe in pipes:
                        pipe.connection.broken = True
                    raise ScatterError(f"cannot receive the replies of map: {exc}") from exc
                for pipe in pipes:
                    if pipe.in_flight:
                        pipe.connection.check_alive(pipe.head_started, timeout)
        finally:
            for pipe in pipes:
                if pipe.in_flight:
                    self._pool.discard(pipe.connection)  # replies may still come: never reuse
                else:
                    self._pool.checkin(pipe.connection)

    def _pipe_with_room(self, pipes: list[_Pipe], limit: list[int], give_up: float) -> _Pipe | None:
        """The connection to send the next call on: the least loaded, a new one while
        every connection is busy and ``limit[0]`` allows more; None while all are full."""
        least = min(pipes, key=lambda pipe: len(pipe.in_flight), default=None)
        if (least is None or least.in_flight) and len(pipes) < limit[0]:
            # Past the first, a pipe only to a worker free now (claimed, within the
            # pool's bound): waiting for one would wait for this map's own pipes (more
            # `parallel` than workers) or for connections only this map holds; none
            # free, this map makes do with the pipes it has.
            connection = self._pool.checkout(give_up, wait=not pipes)
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
    content_id: str
    # Result | Failure, with the result's value decoded (and so validated) in the same
    # pass as its envelope: one decode per reply instead of two.
    decode_reply: Callable[[bytes], Any]
    # A generator function's: Yielded | Result | Failure, each item validated as its T.
    decode_stream: Callable[[bytes], Any] | None = None


def show_output(output: _wire.Output) -> None:
    """Print what a call wrote, each line already behind its "(name pid=N)" prefix, to
    this process's sys.stdout / sys.stderr as they are now (a notebook's, under Jupyter)."""
    for stream, text in output:
        target = sys.stderr if stream == 2 else sys.stdout
        if target is None:  # pythonw, or a closed stream: nowhere to print
            continue
        with contextlib.suppress(Exception):
            target.write(text)
            target.flush()


def _answer_decoder(
    spec: CallSpec, answer: type[Any], leading: list[tuple[str, type]], load_pickles: bool
) -> Callable[[bytes], Any]:
    """``answer`` (Result or Yielded) with its value typed as the function's return
    type, or a Failure: the value decoded (and so validated) in the same pass as its
    envelope, one decode per frame instead of two."""
    typed = msgspec.defstruct(
        answer.__name__,
        [
            *leading,
            ("value", spec.return_type),
            ("output", _wire.Output, msgspec.field(default_factory=list)),
        ],
        tag=answer.__struct_config__.tag,
        array_like=True,
        frozen=True,
    )
    others = (_wire.Result | _wire.Failure) if answer is _wire.Yielded else _wire.Failure
    return answer_decoding(typed | others, load_pickles=load_pickles)


def _reply_decoder(spec: CallSpec, load_pickles: bool) -> Callable[[bytes], Any]:
    return _answer_decoder(spec, _wire.Result, [("id", int), ("version", int)], load_pickles)


def _stream_decoder(spec: CallSpec, load_pickles: bool) -> Callable[[bytes], Any]:
    return _answer_decoder(spec, _wire.Yielded, [("id", int)], load_pickles)


class RemoteFunction:
    """A callable standing for a scattered function: same signature, name and docstring.

    Arguments are validated here before anything is sent, and again on the node.
    Unpinned (``version=None``), it follows the current version: a body-only update is
    invisible to callers; a signature change raises ``SignatureChanged`` once, after which
    the callable validates against the new signature. Pinned, it runs that version while
    it exists. Safe to share between threads.
    """

    def __init__(
        self,
        client: Client,
        name: str,
        version: int | None = None,
        *,
        content_id: str = "",
        lazy: bool = False,
    ) -> None:
        self._client = client
        self._sender = client._sender  # the call path; the client keeps control requests
        self._name = name
        self._pinned = version
        # A pinned callable rebuilt from a pickle checks that the version is the same body.
        self._pinned_content_id = content_id if version else ""
        self._polling = ReplyPolling()
        # Nodes known unable to run this function (their workers refused it unrun): set,
        # calls go through a route that avoids them (_routes.py); None: the fast path.
        self._avoid: tuple[str, ...] | None = None
        self._route_generation = 0  # this process's registry session when it was set
        self.__name__ = name
        self.__qualname__ = name
        if not lazy:
            self._version = self._load(version)

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickle by reference: the node's address and transport, the name, the pinned
        version and its content id. Never the client, its sockets, or the secret: the
        process that unpickles it reconnects with its own (``SCATTER_SECRET`` or the
        user's secret file), as any client does."""
        from .._api import remote_function_by_reference

        content_id = ""
        if self._pinned:
            # An unpickled callable not called yet pickles again without asking the node.
            loaded = self.__dict__.get("_version")
            content_id = loaded.content_id if loaded is not None else self._pinned_content_id
        return (
            remote_function_by_reference,
            (self._client.address, self._client.transport, self._name, self._pinned, content_id),
        )

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
        # A call-only client never loads a pickle (a result of a type msgspec cannot
        # encode): the publisher chose what it would run here.
        load_pickles = self._sender._pool.control.keys().role != "call"
        try:
            signature = _typespec.rebuild(description.signature_spec)
            spec = build_call_spec(
                self._name,
                signature,
                caller=True,
                signature_id=description.signature_id,
                load_pickles=load_pickles,
            )
        except Exception as exc:  # DescriptionError, NotScatterable, or msgspec's refusal
            raise ScatterError(
                f"cannot rebuild the signature of {where} from its type description "
                f"({type(exc).__name__}: {exc})"
            ) from None
        self.__signature__ = signature
        self.__doc__ = description.doc
        if self._pinned_content_id and description.content_id != self._pinned_content_id:
            raise VersionNotFound(
                f"{where} at {self._client.address} has content id {description.content_id}, "
                f"not {self._pinned_content_id}: the version this callable was pinned to "
                "(before it was pickled) is another body on this node"
            )
        return _Version(
            description.version,
            spec,
            description.timeout,
            description.content_id,
            _reply_decoder(spec, load_pickles),
            _stream_decoder(spec, load_pickles) if spec.streams else None,
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
        self._avoid = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        state = self._version
        if state.decode_stream is not None:
            return self._stream(state, state.spec.encode_arguments(args, kwargs), 0.0)
        return self._send(state, state.spec.encode_arguments(args, kwargs), 0.0)

    def call(self, *args: Any, timeout: float | None = None, **kwargs: Any) -> Any:
        """Call with a per-call ``timeout`` in seconds (``__call__`` takes none, so that a
        function's own parameter named ``timeout`` keeps working). For a generator
        function, the timeout is per item."""
        state = self._version
        arguments = state.spec.encode_arguments(args, kwargs)
        if state.decode_stream is not None:
            return self._stream(state, arguments, _per_call(timeout))
        return self._send(state, arguments, _per_call(timeout))

    def _stream(self, state: _Version, arguments: bytes, timeout: float) -> RemoteStream:
        return RemoteStream(self, state, self._frame_for(state, arguments, timeout), timeout or state.timeout)

    def _stream_sender(self, state: _Version) -> CallSender:
        """Where a stream's call goes: the client's node, or the route known to run it."""
        return self._direct_route_sender(state) if self._routed() else self._sender

    async def _stream_async(
        self, state: _Version, arguments: bytes, timeout: float, library: str
    ) -> AsyncRemoteStream:
        frame_for = self._frame_for(state, arguments, timeout)
        sender = self._stream_sender(state)
        lease_by = time.monotonic() + (timeout or state.timeout)
        for attempt in range(2):
            connection = await sender._pool.checkout_async(library, lease_by)
            call_id = next(sender._ids)
            sock = connection.sock
            fd: int = sock.getsockopt(zmq.FD)  # type: ignore[assignment]
            give_up = time.monotonic() + _SEND_TIMEOUT
            try:
                while True:
                    try:
                        start_by = connection.start_by(timeout or state.timeout)
                        sock.send(frame_for(call_id, start_by), zmq.NOBLOCK)
                        break
                    except zmq.Again:
                        if connection.events() & POLLOUT:
                            continue
                        if time.monotonic() > give_up:
                            raise
                        await wait_readable(fd, library, CRASH_CHECK_INTERVAL)
            except zmq.Again:
                connection.broken = True
                sender._undelivered(connection, attempt)
                continue
            except BaseException as exc:
                sender._pool.discard(connection)
                if isinstance(exc, zmq.ZMQError):
                    raise _zmq_failure(exc, "send a call") from exc
                raise
            return AsyncRemoteStream(
                self, state, connection, call_id, timeout or state.timeout, library, sender._pool
            )
        raise AssertionError("unreachable")

    def _refuse_streaming(self, what: str) -> None:
        if self._version.decode_stream is not None:
            raise ScatterError(
                f"{self._name}() is a generator function: its items stream to an iterator "
                f"(for item in {self._name}(...), or async for item in await "
                f"{self._name}.call_async(...)); {what} does not stream them"
            )

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
        self._refuse_streaming("map()")
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
        self,
        state: _Version,
        frames: list[FrameFor],
        timeout: float,
        parallel: int,
        attempt: int = 0,
    ) -> Generator[Any, None, None]:
        """The results of ``frames``, in order. Calls a worker refused unrun (its node
        cannot run the function: ``refused_before_running``) are sent again through a
        route (``_routes.py``), as a single call's are; the others' replies are all read
        first, so that only calls known not to have run are ever sent again."""
        sender = self._direct_route_sender(state) if self._routed() else self._sender
        refused: list[int] = []  # positions refused unrun, to send through a route
        refusal: ScatterError | None = None
        later: dict[int, Any] = {}  # past the first refusal: values, or _Failed errors
        # closing: an error here, or a consumer that stops early, ends call_many at once,
        # which discards the connections with calls still in flight.
        with contextlib.closing(sender.call_many(frames, timeout, parallel)) as replies:
            for position, (call_id, reply) in enumerate(replies):
                try:
                    value = self._finish(state, call_id, reply)
                except ScatterError as exc:
                    if refused_before_running(exc, self._pinned is not None):
                        refused.append(position)
                        refusal = exc
                    elif not refused:
                        raise
                    else:
                        later[position] = _Failed(exc)
                    continue
                if refused:
                    later[position] = value
                else:
                    yield value
        if refusal is None:
            return
        self._take_route(sender, attempt, refusal)
        rerun = self._results(
            state, [frames[p] for p in refused], timeout, parallel, attempt + (sender is not self._sender)
        )
        with contextlib.closing(rerun):
            for position in range(refused[0], len(frames)):
                if position not in later:
                    yield next(rerun)
                    continue
                outcome = later.pop(position)
                if isinstance(outcome, _Failed):
                    raise outcome.error
                yield outcome

    def _take_route(
        self, sender: CallSender | RelaySender, attempt: int, refusal: ScatterError
    ) -> None:
        """``sender``'s worker refused a call unrun: the next calls go through a route
        that avoids its node (and, past the first route, the nodes that route leased
        from), or ``refusal`` is raised once no other member is left to try."""
        if sender is self._sender:
            self._route_around(self._sender._pool.control.node_id)
        else:
            self._avoid_more(sender, attempt, refusal)

    def _send(self, state: _Version, arguments: bytes, timeout: float) -> Any:
        frame = self._frame_for(state, arguments, timeout)
        if self._routed():
            return self._send_routed(state, frame, timeout)
        call_id, reply = self._sender.call(frame, timeout or state.timeout, self._polling)
        try:
            return self._finish(state, call_id, reply)
        except ScatterError as exc:
            if not refused_before_running(exc, self._pinned is not None):
                raise
            self._route_around(self._sender._pool.control.node_id)
        return self._send_routed(state, frame, timeout)

    def _route_around(self, node_id: str) -> None:
        self._avoid = (node_id,)
        self._route_generation = SESSION.generation

    def _routed(self) -> bool:
        """Whether calls go through a route. One taken before this process's latest
        registry change is dropped: the member it leads to may not hold the change yet,
        and the client's node, which catches up first, decides again."""
        if self._avoid is None:
            return False
        if self._route_generation != SESSION.generation:
            self._avoid = None
            return False
        return True

    def _route_sender(self, state: _Version) -> CallSender | RelaySender:
        assert self._avoid is not None
        routes = self._client._routes
        return routes.sender(
            self._name, self._pinned or 0, state.content_id, self._avoid, self._route_generation
        )

    def _direct_route_sender(self, state: _Version) -> CallSender:
        """The route of a ``map`` or a stream: direct only (a relay carries one call)."""
        sender = self._route_sender(state)
        if isinstance(sender, RelaySender):
            raise ScatterError(
                f"{self._name}() runs only on a member this client reaches through its "
                "node's relay (routes='relay', or the member's worker did not take calls), "
                "and map() and generator functions are not relayed yet: call it one call "
                "at a time"
            )
        return sender

    def _avoid_more(
        self, sender: CallSender | RelaySender, attempt: int, exc: ScatterError
    ) -> None:
        """A routed call refused unrun too: the next route avoids those nodes as well."""
        assert self._avoid is not None
        more = sender._pool.nodes_leased - set(self._avoid)
        if attempt >= _MAX_ROUTES - 1 or not more:
            raise exc
        self._avoid = tuple(sorted({*self._avoid, *more}))

    def _send_routed(
        self, state: _Version, frame: FrameFor, timeout: float
    ) -> Any:
        """A call through the route that avoids the nodes known unable to run it: the
        node hands out a worker that can (a member's, maybe), or says why nobody can."""
        for attempt in range(_MAX_ROUTES):
            sender = self._route_sender(state)
            try:
                call_id, reply = sender.call(frame, timeout or state.timeout, None)
            except Unreachable as exc:  # its worker never took the call: it did not run
                sender = self._client._routes.relay_instead(sender, exc)
                call_id, reply = sender.call(frame, timeout or state.timeout, None)
            try:
                return self._finish(state, call_id, reply)
            except ScatterError as exc:
                if not refused_before_running(exc, self._pinned is not None):
                    raise
                self._avoid_more(sender, attempt, exc)
        raise AssertionError("unreachable")

    async def _call_routed_async(
        self, state: _Version, frame: FrameFor, timeout: float, library: str
    ) -> Any:
        """:meth:`_send_routed` for trio or asyncio."""
        for attempt in range(_MAX_ROUTES):
            sender = self._route_sender(state)
            try:
                call_id, reply = await sender.call_async(frame, timeout or state.timeout, library)
            except Unreachable as exc:  # its worker never took the call: it did not run
                sender = self._client._routes.relay_instead(sender, exc)
                call_id, reply = await sender.call_async(frame, timeout or state.timeout, library)
            try:
                return self._finish(state, call_id, reply)
            except ScatterError as exc:
                if not refused_before_running(exc, self._pinned is not None):
                    raise
                self._avoid_more(sender, attempt, exc)
        raise AssertionError("unreachable")

    async def call_async(self, *args: Any, timeout: float | None = None, **kwargs: Any) -> Any:
        """Await a call from trio or asyncio code, with an optional per-call ``timeout``.

        The event loop waits on the worker connection's socket: no thread per call. For a
        generator function, it returns an :class:`AsyncRemoteStream` once the call is
        sent: ``async for item in await fn.call_async(...)``.

        Example::

            total = await scatter.make_callable("add").call_async(1, 2)
        """
        import sniffio

        library = sniffio.current_async_library()
        if library not in ("trio", "asyncio"):
            raise ScatterError(f"call_async runs under trio or asyncio, not {library}")
        state = self._version
        arguments = state.spec.encode_arguments(args, kwargs)
        if state.decode_stream is not None:
            return await self._stream_async(state, arguments, _per_call(timeout), library)
        frame = self._frame_for(state, arguments, _per_call(timeout))
        if self._routed():
            return await self._call_routed_async(state, frame, _per_call(timeout), library)
        call_id, reply = await self._sender.call_async(
            frame, timeout or state.timeout, library
        )
        try:
            return self._finish(state, call_id, reply)
        except ScatterError as exc:
            if not refused_before_running(exc, self._pinned is not None):
                raise
            self._route_around(self._sender._pool.control.node_id)
        return await self._call_routed_async(state, frame, _per_call(timeout), library)

    def _frame_for(
        self, state: _Version, arguments: bytes, timeout: float
    ) -> FrameFor:
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
        caller = _callid.caller  # this process's (a forked child draws its own)

        def frame(call_id: int, start_by: float = 0.0) -> bytes:
            return encode(
                _wire.Call(
                    call_id, name, pinned, number, signature_id, timeout, payload, caller, start_by
                )
            )

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
        if reply.output:
            show_output(reply.output)
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
        if failure.kind == "remote":
            # Only a client that may deploy loads an exception's pickle (the publisher's
            # code); a call-only one rebuilds a class only from modules it has imported.
            may_unpickle = self._sender._pool.control.keys().role == "deploy"
            return remote_error(failure, may_unpickle=may_unpickle)
        lagging = self._sender._control.lagging
        if lagging and failure.kind in ("not_found", "version_not_found"):
            # The node gave up catching up with this process's changes (read your writes).
            failure = msgspec.structs.replace(failure, message=f"{failure.message} ({lagging})")
        error = error_from_failure(failure)
        if isinstance(error, SignatureChanged):
            with contextlib.suppress(ScatterError):
                self.refresh()
        return error



class _StreamCore:
    """What the sync and the async stream share: one call of a generator function on one
    worker connection, its credit and the decoding of its frames."""

    def __init__(
        self,
        function: RemoteFunction,
        state: _Version,
        connection: WorkerConnection,
        call_id: int,
        timeout: float,
        pool: ConnectionPool | None = None,
    ) -> None:
        assert state.decode_stream is not None
        self._function = function
        self._state = state
        self._decode = state.decode_stream
        # The pool the connection came from: the client's, or a route's.
        self._pool = function._sender._pool if pool is None else pool
        self._connection = connection
        self._call_id = call_id
        self._timeout = timeout
        self._received = 0
        self._granted = _wire.STREAM_WINDOW
        self._done = False

    def __repr__(self) -> str:
        state = "ended" if self._done else f"{self._received} items taken"
        name = type(self).__name__
        return f"<{name} of {self._function._name} v{self._state.number}, {state}>"

    def _take(self, frame: bytes) -> Any:
        """The item ``frame`` carries, or ``_END``; raises the stream's error."""
        try:
            try:
                reply = self._decode(frame)
            except _wire.DECODE_ERRORS:
                reply = self._decode_slowly(frame)
            if reply.id != self._call_id and reply.id != 0:  # 0: the worker's own failure
                raise ProtocolError(
                    f"frame for call {reply.id} in the stream of call {self._call_id}: the "
                    "worker is confused"
                )
        except BaseException:
            self._abandon()
            raise
        if reply.output:
            show_output(reply.output)
        if type(reply) is not _wire.Result and type(reply) is not _wire.Failure:
            self._received += 1
            self._grant()
            return reply.value
        self._done = True
        self._pool.checkin(self._connection)  # the stream ended: nothing more in flight
        if isinstance(reply, _wire.Failure):
            raise self._function._failure(reply, self._state)
        function = self._function
        if reply.version != self._state.number and not function._pinned:
            function._version = dataclasses.replace(function._version, number=reply.version)
        return _END

    def _ended(self, frame: bytes) -> bool:
        """While closing: True once ``frame`` is the stream's end (items are dropped)."""
        reply = _wire.stream_reply_decoder.decode(frame)
        if type(reply) is _wire.Yielded or reply.id != self._call_id:
            return False
        if reply.output:
            show_output(reply.output)
        return True

    def _grant(self) -> None:
        """Top the worker's credit back up to a window once half of it was taken."""
        outstanding = self._granted - self._received
        if outstanding > _wire.STREAM_WINDOW // 2:
            return
        credit = _wire.STREAM_WINDOW - outstanding
        with contextlib.suppress(zmq.Again):  # a gone worker shows at the next receive
            self._connection.sock.send(
                _wire.encoder.encode(_wire.More(self._call_id, credit)), zmq.NOBLOCK
            )
            self._granted += credit

    def _decode_slowly(self, frame: bytes) -> Any:
        try:
            reply = _wire.stream_reply_decoder.decode(frame)
        except _wire.DECODE_ERRORS as exc:
            raise ProtocolError(
                f"malformed frame in the stream of {self._function._name}: {exc}"
            ) from None
        if isinstance(reply, _wire.Yielded):
            # Raises the ValidationError that applies, or reads what only the slow path
            # takes (an int beyond 64 bits).
            value = self._state.spec.decode_result(reply.value)
            return msgspec.structs.replace(reply, value=value)
        return reply

    def __del__(self) -> None:
        # Not close(): a finalizer runs wherever the collector does (a lock held, a
        # request under way), and close() waits for the generator's end. The Cancel
        # stops the generator all the same; whatever the send did, the slot and the
        # worker's claim come back at the next checkout (ConnectionPool.abandoned).
        if not self._done:
            self._done = True
            with contextlib.suppress(Exception):
                self._connection.sock.send(
                    _wire.encoder.encode(_wire.Cancel(self._call_id)), zmq.NOBLOCK
                )
            self._pool.abandoned.append(self._connection)

    def _abandon(self) -> None:
        if not self._done:
            self._done = True
            self._pool.discard(self._connection)  # frames may still come: never reuse


_END: Any = object()


@dataclass(frozen=True, slots=True)
class _Failed:
    """A call of ``map`` that failed, read ahead of the iteration (see ``_results``)."""

    error: ScatterError


class RemoteStream(_StreamCore):
    """What a call of a generator function returns: an iterator of its items, each one
    as the worker produces it, validated as the ``T`` of its ``Iterator[T]`` annotation.

    As Ray's streaming generators and gRPC server streaming: the call is sent at once;
    the worker runs ahead of the consumer by at most ``_wire.STREAM_WINDOW`` items, and
    waits for credit (``More``, sent as items are taken) beyond that. Each item has the
    call's timeout (``fn.call(..., timeout=...)``), and so has the consumer: one that
    takes no item for that long finds the stream ended with ``CallTimeout``. ``close()``
    (also leaving a ``with`` block, or the iterator being garbage collected) stops the
    remote generator: its ``finally`` runs on the worker. Used by one thread at a time;
    it holds one worker connection until it ends.
    """

    def __init__(
        self,
        function: RemoteFunction,
        state: _Version,
        frame_for: FrameFor,
        timeout: float,
    ) -> None:
        self._done = True  # until the call is sent: __del__ has nothing to close
        self._frame_for = frame_for
        self._route_attempt = 0  # routes tried after a refusal (see __next__)
        sender = self._sender = function._stream_sender(state)
        connection, call_id = self._send(sender, frame_for, timeout)
        super().__init__(function, state, connection, call_id, timeout, sender._pool)

    @staticmethod
    def _send(
        sender: CallSender, frame_for: FrameFor, timeout: float
    ) -> tuple[WorkerConnection, int]:
        """Send the stream's call through ``sender``: (its connection, its call id)."""
        lease_by = time.monotonic() + timeout
        for attempt in range(2):
            found = sender._pool.checkout(lease_by)
            assert found is not None  # checkout waits for one (wait=True)
            connection = found
            call_id = next(sender._ids)
            try:
                start_by = connection.start_by(timeout)
                connection.sock.send(frame_for(call_id, start_by))  # SNDTIMEO bounds it
            except zmq.Again:
                connection.broken = True
                sender._undelivered(connection, attempt)
                continue
            except BaseException as exc:  # Ctrl-C, a dead socket: never leak the claim
                sender._pool.discard(connection)
                if isinstance(exc, zmq.ZMQError):
                    raise _zmq_failure(exc, "send a call") from exc
                raise
            return connection, call_id
        raise AssertionError("unreachable")

    def _rerouted(self, refusal: ScatterError) -> bool:
        """The stream's first frame was a refusal unrun (its node cannot run the
        function): send the call again through a route (``_routes.py``), as a single
        call is; False if it is not such a refusal (raise it)."""
        function = self._function
        if self._received or not refused_before_running(refusal, function.pinned):
            return False
        sender = self._sender
        attempt = self._route_attempt
        function._take_route(sender, attempt, refusal)  # raises when none is left
        self._route_attempt = attempt + (sender is not function._sender)
        sender = self._sender = function._direct_route_sender(self._state)
        self._connection, self._call_id = self._send(sender, self._frame_for, self._timeout)
        self._pool = sender._pool
        self._granted = _wire.STREAM_WINDOW
        self._done = False
        return True

    def __iter__(self) -> RemoteStream:
        return self

    def __enter__(self) -> RemoteStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __next__(self) -> Any:
        if self._done:
            raise StopIteration
        try:
            frame = self._receive()
        except BaseException:
            self._abandon()
            raise
        try:
            value = self._take(frame)
        except ScatterError as exc:
            if not self._rerouted(exc):
                raise
            return self.__next__()
        if value is _END:
            raise StopIteration
        return value

    def close(self) -> None:
        """Stop the remote generator (its ``finally`` runs there) and free the connection.

        Waits for the worker to confirm, up to the call's timeout; items already sent are
        dropped. Does nothing on an iterator that has ended.
        """
        if self._done:
            return
        self._done = True
        connection = self._connection
        try:
            connection.sock.send(_wire.encoder.encode(_wire.Cancel(self._call_id)))
            while not self._ended(self._receive()):
                pass
        except Exception:
            self._pool.discard(connection)  # an end may still come: never reuse
            return
        self._pool.checkin(connection)

    def _receive(self) -> bytes:
        connection = self._connection
        started = time.monotonic()
        while True:
            try:
                return connection.sock.recv()  # RCVTIMEO: the crash-check interval
            except zmq.Again:
                connection.check_alive(started, self._timeout)


class AsyncRemoteStream(_StreamCore):
    """What ``await fn.call_async(...)`` returns for a generator function: an async
    iterator of its items, as :class:`RemoteStream`, that waits on the event loop (trio or
    asyncio), never blocking it::

        async with await remote.call_async(10) as items:
            async for item in items:
                ...

    ``aclose()`` (also leaving ``async with``) stops the remote generator and waits for
    its ``finally``. Garbage collection cannot wait: it asks the worker to stop and drops
    the connection, and the worker closes the generator once it reads that (or once the
    timeout passes with no credit).
    """

    def __init__(
        self,
        function: RemoteFunction,
        state: _Version,
        connection: WorkerConnection,
        call_id: int,
        timeout: float,
        library: str,
        pool: ConnectionPool | None = None,
    ) -> None:
        super().__init__(function, state, connection, call_id, timeout, pool)
        self._library = library

    def __aiter__(self) -> AsyncRemoteStream:
        return self

    async def __aenter__(self) -> AsyncRemoteStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def __anext__(self) -> Any:
        if self._done:
            raise StopAsyncIteration
        try:
            frame = await self._receive()
        except BaseException:
            self._abandon()
            raise
        value = self._take(frame)
        if value is _END:
            raise StopAsyncIteration
        return value

    async def aclose(self) -> None:
        """As :meth:`RemoteStream.close`, waiting on the event loop."""
        if self._done:
            return
        self._done = True
        connection = self._connection
        try:
            connection.sock.send(_wire.encoder.encode(_wire.Cancel(self._call_id)), zmq.NOBLOCK)
            while not self._ended(await self._receive()):
                pass
        except zmq.ZMQError:  # the worker is gone: nothing left to stop, as close() does
            self._pool.discard(connection)
            return
        except BaseException:
            self._pool.discard(connection)
            raise
        self._pool.checkin(connection)

    async def _receive(self) -> bytes:
        connection = self._connection
        sock = connection.sock
        fd: int = sock.getsockopt(zmq.FD)  # type: ignore[assignment]
        started = time.monotonic()
        while True:
            try:
                return sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                if connection.events() & POLLIN:
                    continue
                connection.check_alive(started, self._timeout)
                await wait_readable(fd, self._library, CRASH_CHECK_INTERVAL)
class UnpickledRemoteFunction(RemoteFunction):
    """A ``RemoteFunction`` rebuilt from a pickle: it describes its version at first use,
    so unpickling never talks to the node (a multiprocessing worker that fails to unpickle
    a task loses it), then becomes a plain ``RemoteFunction``.

    A class of its own, not a ``__getattr__`` on ``RemoteFunction``: a class with one
    leaves every attribute read of the call path unspecialized by the interpreter.
    """

    def __getattr__(self, attribute: str) -> Any:
        if attribute in ("_version", "__signature__"):
            self._version = self._load(self._pinned)
            self.__class__ = RemoteFunction  # type: ignore[assignment]
            return self.__dict__[attribute]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {attribute!r}")
