"""A worker process: runs calls, one at a time, straight off its own socket.

Why processes, and why clients talk to them directly: the speed issue measured a thread
hop at ~110-225 us and a broker hop at ~100 us per call, against ~120 us for a whole
pyzmq round trip. So a call goes client -> worker socket -> function -> reply, in a plain
synchronous loop with no hop between the socket and the code. The node (a Trio process)
leases workers to client connections, so a hung or CPU-heavy call holds up only its own
caller, CPU-bound calls from several clients run on several cores, and a function that
kills its interpreter costs one call: the node notices and starts a replacement.

Nothing a caller sends ends the loop: every step of a call (decoding the frame and the
arguments, loading, running, encoding the result, sending) catches ``Exception`` and
answers a ``Failure``; a result that cannot be sent (an object that does not pickle) is
a ``validation`` failure naming the function and version (an int beyond 64 bits is sent:
rule 7 of ``_core/_signature.py``). What is logged to stderr is an exception's type and
where it was raised, never a value.

What else runs here: an ``async def`` function runs to its end on the worker's one asyncio
loop (``Worker.run_coroutine``); a generator function's call becomes a ``Stream`` whose
items the serve loop sends as the caller grants credit, one step at a time, reading
frames between steps (``_stream_turn``), so a plain call is never held up by a stream;
what a call writes to ``sys.stdout``/``sys.stderr`` (``CallOutput``) goes back in its
reply, never to the node's log; a function's exception carries what lets its caller
rebuild its class (``remote_failure``).

Timeouts are the worker's own, so that they hold when the node is gone too: each call
arms ``ITIMER_REAL`` for its timeout and the SIGALRM handler raises ``CallInterrupted``
inside the function (Python code and interruptible sleeps); if the function swallows it
and still runs ``kill_grace`` seconds later, the handler ends the process. One syscall
per call (~0.7 us, ``cluster/bench_worker_timer.py``): the timer is not disarmed after a
call, the next call re-arms it and a stale alarm landing while idle is ignored. It is
re-armed on every call, not only when an earlier alarm would come too late, so that a
signal reaches a call only past its own deadline. The node still watches the deadline each
call writes to its shared slot and kills the worker past deadline plus grace: code holding
the GIL without returning to the interpreter (a C loop) runs no Python handler, and only
that SIGKILL ends it.

The node's lifetime, watched on a pipe: the node passes the read end (``--parent-fd``)
and keeps the write end open, writing nothing. A thread blocks reading it; EOF means the
node is gone (even by SIGKILL): an idle worker exits at once, a busy one sends its reply
(the call bounded by its own deadline), gives the caller up to a second to read it, then
exits. No polling: an idle worker sleeps.
Not PR_SET_PDEATHSIG: it fires when the parent *thread* exits, and trio spawns processes
from a cache thread that exits after 10 s idle: every worker died 10 s after start.

Run as ``python -m scatter._node._worker --data-dir D --run-dir R --slot N --host H
--parent-fd F``; it prints one line, ``READY <endpoint>...``, once it listens. Its Unix
socket is ``R/worker-{slot}-{pid}.sock``: unique per process, so a client never
reconnects silently to another process that took over a path.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import contextvars
import inspect
import io
import linecache
import math
import os
import platform
import signal
import sys
import threading
import time
import traceback
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cloudpickle
import msgspec
import zmq
from msgspec import DecodeError, ValidationError as MsgspecValidationError

from .. import _wire
from .._config import DEFAULT_CALL_TIMEOUT, MAX_MESSAGE_BYTES, NodeConfig
from .._core._forwarding import python_problem
from .._core._registry import resolve_view
from .._core._signature import (
    CallSpec,
    argument_error,
    build_call_spec,
    meets_pickles,
    refusing_pickles,
    restore_signature,
    signature_of,
)
from .._exceptions import FunctionNotFound, NotScatterable, ValidationError, VersionNotFound
from .._publish import CAPTURE_OUTPUT_ATTRIBUTE
from .._security import WORKER_CLIENTS_VARIABLE, WORKER_KEY_VARIABLE, apply_server_keys
from ._slots import SharedSlots
from ._store import RegistryStore

_SCATTER_DIR = str(Path(__file__).resolve().parent.parent)
_NOT_THE_FUNCTIONS = (
    _SCATTER_DIR,
    os.path.dirname(asyncio.__file__),
    str(Path(asyncio.__file__).resolve().parent),
)


MAX_LOADED_VERSIONS = 256  # loaded bodies a worker keeps for reuse
# What one call may send back of what it wrote (characters); more is dropped, said once.
MAX_OUTPUT_CHARS = 1 << 20

_RESULT_TAG: int = _wire.Result.__struct_config__.tag  # type: ignore[assignment]
_YIELDED_TAG: int = _wire.Yielded.__struct_config__.tag  # type: ignore[assignment]
# Credit one stream may hold at once: a caller granting more gains nothing.
_MAX_STREAM_CREDIT = 1 << 20

_ITIMER_REAL = signal.ITIMER_REAL
# The longest alarm armed at once: setitimer refuses ~1e12 s; a later deadline re-arms.
_MAX_ALARM = 1e6
_MIN_ALARM = 1e-3  # setitimer(0) would disarm
EXIT_IGNORED_INTERRUPT = 70  # exit status of a worker whose call ignored its interrupt

# The tasks of the async call (or stream) whose context a task runs in: asyncio copies the
# creating task's context into every task it makes, so all a call starts carries its set,
# and a call cancels only these (``Worker.run_coroutine``), never a stream's.
_OWN_TASKS: contextvars.ContextVar[set[asyncio.Task[Any]]] = contextvars.ContextVar(
    "scatter_own_tasks"
)


def _own_task_factory(
    loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any
) -> asyncio.Task[Any]:
    """The worker loop's task factory: a task joins the set of the call that made it."""
    task: asyncio.Task[Any] = asyncio.Task(coro, loop=loop, **kwargs)
    context: contextvars.Context | None = kwargs.get("context")
    tasks = _OWN_TASKS.get(None) if context is None else context.get(_OWN_TASKS)
    if tasks is not None:
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    return task


def _own_context() -> tuple[contextvars.Context, set[asyncio.Task[Any]]]:
    """A context for one async call or stream, and the set its tasks join."""
    context = contextvars.copy_context()
    tasks: set[asyncio.Task[Any]] = set()
    context.run(_OWN_TASKS.set, tasks)
    return context, tasks


_LEAVE_LINGER_MS = 1000  # bounds how long a last reply is given once the node is gone
_INTERNAL_FAILURE = _wire.encoder.encode(
    _wire.Failure(0, "internal", "the worker failed on this call; the node's log says where")
)


class CallInterrupted(BaseException):
    """Raised inside a function past its deadline. A BaseException, so that a function's
    own ``except Exception`` cannot swallow it."""


@dataclass(frozen=True, slots=True)
class Loaded:
    """One version, ready to run: built once per content id (bodies are immutable)."""

    function: Any
    spec: CallSpec
    timeout: float | None  # the version's own call timeout
    # Its arguments may hold a pickle (an opaque parameter type): this decodes them for a
    # call-only client, refusing any pickle unloaded. None: nothing to refuse.
    refusing: Callable[[Any], Any] | None = None
    # What a call's output is labelled with: its name, or "" to drop what it writes
    # (@scatter(capture_output=False)).
    output_name: str = ""


class Stream:
    """A generator function's call in progress (``Worker.step`` makes its items).

    ``credit``: items it may still produce before the caller grants more (``More``);
    it starts at ``_wire.STREAM_WINDOW``. Each item gets the call's timeout, and so does
    the caller: a stream whose credit stays at 0 that long is closed (``Worker.expire``).
    """

    __slots__ = (
        "arguments",
        "call_id",
        "cancelled",
        "credit",
        "identity",
        "iterator",
        "loaded",
        "name",
        "number",
        "produced",
        "role",
        "tasks",
        "timeout",
        "waiting_since",
    )

    def __init__(
        self,
        call: _wire.Call,
        number: int,
        loaded: Loaded,
        arguments: Any,
        timeout: float,
        role: str,
        identity: bytes,
    ) -> None:
        self.call_id = call.id
        self.name = call.name
        self.number = number
        self.loaded = loaded
        self.arguments = arguments
        self.timeout = timeout
        self.role = role  # the caller's, for what a failure may carry (remote_failure)
        self.identity = identity
        self.iterator: Any = None  # made by the first step, under its deadline
        self.credit = _wire.STREAM_WINDOW
        self.cancelled = False
        self.produced = 0
        self.waiting_since = 0.0  # when credit ran out
        # An async generator's items run in one context of the stream's own, so the tasks
        # it starts are the stream's (see _OWN_TASKS): made at its first item.
        self.tasks: tuple[contextvars.Context, set[asyncio.Task[Any]]] | None = None


# How long past its start_by a call id is remembered (seconds), and how many at most.
_REMEMBER_IDS_FOR = 60.0
_MAX_REMEMBERED_IDS = 1 << 17


class AtMostOnce:
    """The call ids this worker started lately, so that none runs twice; and the rule that
    a call whose caller has given up (its ``start_by`` passed) never starts.

    A call is remembered once it is about to run, until ``_REMEMBER_IDS_FOR`` past its
    ``start_by`` (past that moment it could not start anyway), at most
    ``_MAX_REMEMBERED_IDS`` of them, oldest forgotten first. A refusal before running
    (not found, cannot load) remembers nothing: that call id may run elsewhere, or here
    through a route, once.
    """

    __slots__ = ("_order", "_seen")

    def __init__(self) -> None:
        self._seen: set[tuple[bytes, int]] = set()
        self._order: collections.deque[tuple[float, tuple[bytes, int]]] = collections.deque()

    def admit(self, call: _wire.Call, now: float) -> None:
        """Remember ``call`` as started at ``now``; _Refused if it came before (duplicate)
        or its caller's ``start_by`` has passed (expired)."""
        key = (call.caller, call.id)
        if key in self._seen:
            raise _Refused(
                "duplicate",
                f"{call.name}: call {call.id} of this caller came before; it is not run "
                "again (the first one may have run)",
            )
        if call.start_by and now > call.start_by:
            raise _Refused(
                "expired",
                f"{call.name}: the call waited for its worker past its caller's timeout "
                f"({now - call.start_by:.3f} s too long) and was not started",
            )
        order = self._order
        while order and (order[0][0] < now or len(order) >= _MAX_REMEMBERED_IDS):
            self._seen.discard(order.popleft()[1])
        self._seen.add(key)
        order.append(((call.start_by or now) + _REMEMBER_IDS_FOR, key))


class _Refused(Exception):
    def __init__(self, failure_kind: _wire.FailureKind, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.kind = failure_kind
        self.extra = extra


def _log(message: str) -> None:
    """One line to stderr (the node's log). Never given argument or result values.

    ``os.write``, not ``sys.stderr``: it runs in signal handlers, which may land while the
    interrupted code is itself writing to ``sys.stderr``.
    """
    with contextlib.suppress(Exception):
        os.write(2, f"scatter worker {os.getpid()}: {message}\n".encode(errors="replace"))


def _log_exception(step: str, exc: BaseException) -> None:
    """The type of ``exc`` and where it was raised; its message may quote a value."""
    tb = exc.__traceback__
    where = "?"
    if tb is not None:
        while tb.tb_next is not None:
            tb = tb.tb_next
        code = tb.tb_frame.f_code
        where = f"{code.co_filename}:{tb.tb_lineno} in {code.co_name}"
    _log(f"{step}: {type(exc).__qualname__} at {where}")


_recursion_limit = sys.getrecursionlimit
_MAX_DECODE_RECURSION = _wire.MAX_DECODE_RECURSION


def _bounded(decode: Any, data: Any) -> Any:
    """``decode(data)`` with the recursion limit at most ``MAX_DECODE_RECURSION``.

    For a worker whose function raised the limit: msgspec's nesting guard is that limit on
    Python 3.11, and a deep frame would otherwise overflow the C stack (see _wire.py).
    The function gets its own limit back for its calls.
    """
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(_wire.MAX_DECODE_RECURSION)
    try:
        return decode(data)
    finally:
        sys.setrecursionlimit(limit)


def _encodable(text: str) -> str:
    """``text`` without lone surrogates, which UTF-8 (and so msgpack) cannot carry."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


class Worker:
    def __init__(
        self,
        data_dir: Path,
        slot: int,
        default_timeout: float,
        max_message_bytes: int,
        *,
        run_dir: Path | None = None,
        kill_grace: float = NodeConfig.kill_grace,
    ) -> None:
        self.store = RegistryStore(data_dir / "registry")
        self.slots = SharedSlots((run_dir or data_dir / "run") / "slots")
        self.slot = slot
        self.default_timeout = default_timeout
        self.max_message_bytes = max_message_bytes
        self.kill_grace = kill_grace
        self.generation = -1
        # {(name, pinned version or 0): (number, loaded)}, valid for self.generation
        self.routes: dict[tuple[str, int], tuple[int, Loaded]] = {}
        # {content_id: Loaded}: never stale (bodies are immutable), least recently used
        # first; bounded so a long-lived worker does not keep every version ever called.
        # Keyed by name too: one body published under two names is built once per name,
        # so messages and tracebacks name the function that was called.
        self.loaded: collections.OrderedDict[tuple[str, str], Loaded] = collections.OrderedDict()
        self.frame: zmq.Frame | None = None  # the call's frame: who sent it (ZAP User-Id)
        self.call_number = 0
        self.running = 0  # call number running now, 0 when idle
        self.deadline = 0.0
        self.interrupted = 0  # the call number last interrupted
        self.kill_at = 0.0  # when that call, still running, ends the process
        self.busy = False  # from receiving a frame until its reply is sent
        self.orphaned = False  # the node is gone: exit once no frame is in hand
        self.ipc_path: Path | None = None
        self.encode = _wire.encoder.encode
        self.decode_call = _wire.call_decoder.decode
        self.arm = signal.setitimer
        self.loop: asyncio.AbstractEventLoop | None = None  # for async def functions
        # The tasks of the async call (or stream item) running now, and whether its
        # deadline cancelled them rather than raising (see _interrupt).
        self.own_tasks: set[asyncio.Task[Any]] | None = None
        self.cancelled_at_deadline = False
        # What the running call writes to sys.stdout/sys.stderr (CallOutput), for its
        # caller: made at the first write, dropped when the next frame comes in.
        self.output: list[tuple[int, str]] | None = None
        self.output_chars = 0
        self.output_name = ""  # the call's, or "": nothing is kept (capture_output=False)
        self.origin = f"pid={os.getpid()}"  # the output's prefix names the process
        self.identity = b""  # the ROUTER identity of the frame's sender
        # Generator calls in progress: {(sender's identity, call id): Stream}
        self.streams: dict[tuple[bytes, int], Stream] = {}
        # Where this worker tells its node what it cannot load (the pipe its READY line
        # went through, kept after fd 1 goes to /dev/null); -1: nobody listens.
        self.report_fd = -1
        self.reported: set[str] = set()  # content ids reported already
        self.once = AtMostOnce()  # the call ids run here lately (at most once)

    # -- interruption (the module docstring says why the worker keeps its own time) --

    def on_alarm(self, signum: int, frame: object) -> None:
        """SIGALRM: the running call's deadline, or ``kill_grace`` after its interrupt."""
        running = self.running
        if not running:
            return  # the stale alarm of a call that finished: ignored while idle
        now = time.monotonic()
        if running != self.interrupted:
            if now < self.deadline:  # a deadline beyond _MAX_ALARM
                self.arm(_ITIMER_REAL, max(min(self.deadline - now, _MAX_ALARM), _MIN_ALARM))
                return
            self._interrupt(running, now)
        if now < self.kill_at:  # interrupted already; the grace is not over
            self.arm(_ITIMER_REAL, max(self.kill_at - now, _MIN_ALARM))
            return
        _log(
            f"call {running} still ran {self.kill_grace:g} s after its timeout interrupted "
            "it (the function swallowed CallInterrupted): exiting"
        )
        self.exit(EXIT_IGNORED_INTERRUPT)

    def _interrupt(self, running: int, now: float) -> None:
        self.interrupted = running
        self.kill_at = now + self.kill_grace
        self.arm(_ITIMER_REAL, max(self.kill_grace, _MIN_ALARM))
        tasks = self.own_tasks
        if tasks is not None and self.loop is not None:
            current = asyncio.current_task(self.loop)
            if current is not None and current not in tasks:
                # The alarm landed in another caller's task (a stream's, running on the
                # same loop): raising there would end that task. This call's own tasks
                # wait in an await meanwhile, so cancelling them interrupts it; its
                # CancelledError is reported as the interrupt (run_coroutine).
                self.cancelled_at_deadline = True
                for task in tasks:
                    task.cancel()
                return
        raise CallInterrupted

    # -- the node's lifetime --

    def watch_parent(self, fd: int) -> None:
        """Exit when the node is gone: EOF on the pipe whose write end only it holds."""

        def wait_for_eof() -> None:
            # The alarm is for the main thread (the call's).
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
            with contextlib.suppress(OSError):
                while os.read(fd, 64):  # the node never writes; anything read is ignored
                    pass
            # serve() reads orphaned, clears busy, reads orphaned again: one of the two
            # sides sees the other (the GIL orders these), so the worker always exits,
            # and a busy worker exits after its reply has left, not in the middle.
            self.orphaned = True
            if not self.busy:
                self.exit(0)

        threading.Thread(target=wait_for_eof, name="scatter-node-watch", daemon=True).start()

    def exit(self, status: int) -> None:
        """End the process now (``os._exit``: from a signal handler or the watch thread)."""
        if self.ipc_path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.ipc_path)
        os._exit(status)

    # -- lookups --

    def route(self, name: str, version: int) -> tuple[int, Loaded]:
        """(version number, loaded body) for a call; cached per generation.

        The generation is read before the store: a change committed in between is then
        seen now or on the next call, never missed. The registry's own rule resolves
        the name (``resolve_view``): a worker never words a lookup rule itself.
        """
        try:
            number, content_id = resolve_view(name, self.store.view(name), version)
        except FunctionNotFound as exc:
            raise _Refused("not_found", str(exc)) from None
        except VersionNotFound as exc:
            raise _Refused("version_not_found", str(exc)) from None
        route = (number, self.load(name, content_id))
        self.routes[(name, version)] = route
        return route

    def load(self, name: str, content_id: str) -> Loaded:
        loaded = self.loaded.get((name, content_id))
        if loaded is not None:
            self.loaded.move_to_end((name, content_id))  # off the hot path: routes hold Loaded
            return loaded
        record = self.store.record(content_id)
        body = self.store.body(content_id)
        if record is None or body is None:
            raise _Refused("load", f"the body of {name} ({content_id}) is missing on this node")
        problem = python_problem(record.python, platform.python_version())
        if problem:  # cloudpickle loads a body only on its own major.minor
            self.report_cannot_load(content_id, problem)
            raise _Refused("load", f"cannot load {name} on this node: {problem}")
        try:
            function = cloudpickle.loads(body)
            # The shipped signature, not one read off the body here: its annotations were
            # resolved where the function was defined (see portable_signature).
            if record.signature:
                signature = restore_signature(cloudpickle.loads(record.signature))
            else:
                signature = signature_of(function)
            # The publisher's signature id, the one its callers send: the text of a
            # signature rebuilt here can differ (a local class's qualified name).
            spec = build_call_spec(name, signature, signature_id=record.signature_id or None)
            if record.source and isinstance(function, types.FunctionType):
                _attach_source(function, f"<scatter {name} {content_id[:12]}>", record.source)
        except NotScatterable as exc:
            self.report_cannot_load(content_id, _load_reason(exc))
            raise _Refused("load", f"cannot prepare {name} on this node: {exc}") from exc
        except Exception as exc:
            self.report_cannot_load(content_id, _load_reason(exc))
            raise _Refused(
                "load",
                f"cannot load {name} on this node ({type(exc).__name__}: {exc}); "
                "its body needs a module or Python version this node lacks",
            ) from exc
        refusing = (
            refusing_pickles(spec.arguments_type) if meets_pickles(spec.arguments_type) else None
        )
        captures = getattr(function, CAPTURE_OUTPUT_ATTRIBUTE, True) is not False
        if inspect.iscoroutinefunction(function):
            function = self.awaiting(function)
        loaded = Loaded(function, spec, record.timeout, refusing, name if captures else "")
        self.loaded[(name, content_id)] = loaded
        if len(self.loaded) > MAX_LOADED_VERSIONS:
            self.loaded.popitem(last=False)
        return loaded

    def report_cannot_load(self, content_id: str, reason: str) -> None:
        """Tell the node (one line on the report pipe, once per body) that this body
        cannot load here: it routes later calls to members that can (_forwarding.py).
        Written before the caller's failure is sent, so the node hears it first."""
        if self.report_fd < 0 or content_id in self.reported:
            return
        self.reported.add(content_id)
        line = f"CANNOT_LOAD {content_id} {_encodable(reason)[:_MAX_REASON_CHARS]}"
        with contextlib.suppress(OSError):  # a full pipe (node stuck): the call says it
            os.write(self.report_fd, (line.replace("\n", " ") + "\n").encode())

    # -- async def functions --

    def awaiting(self, coroutine_function: Callable[..., Any]) -> Callable[..., Any]:
        """A plain function that runs ``coroutine_function`` to its end on this worker's
        event loop: the call path (deadline, alarm, failures) stays the sync one."""
        run = self.run_coroutine

        def call(*args: Any, **kwargs: Any) -> Any:
            return run(coroutine_function(*args, **kwargs))

        return call

    def run_coroutine(
        self, coroutine: Any, settle: bool = True, stream: Stream | None = None
    ) -> Any:
        """Await ``coroutine`` on the worker's asyncio loop: one per process, made on the
        first async call and reused (as uvicorn keeps one loop per worker).

        Each call runs in a context of its own, and each stream in one of its own for all
        its items: the tasks started there are that call's (``_OWN_TASKS``). Once the call
        returns, its tasks still pending are cancelled and run to their end, so their
        ``finally`` blocks run and nothing of this call runs during the next one; the
        tasks of others (an async generator's, between its items) are left alone.

        The deadline is the sync one: the SIGALRM handler raises ``CallInterrupted`` in
        whatever runs, the coroutine's own code (the task ends with it) or the loop
        waiting in ``select`` (the task is left pending); when it lands in another
        caller's task, this call's tasks are cancelled instead (``_interrupt``). Either
        way its tasks are cancelled as above. A task that ignores its cancellation holds
        the call; past ``kill_grace`` after the deadline the alarm ends the process, as
        for a sync function that swallows ``CallInterrupted``.
        """
        loop = self.loop
        if loop is None:
            loop = self.loop = asyncio.new_event_loop()
            loop.set_task_factory(_own_task_factory)
            asyncio.set_event_loop(loop)
        if stream is None:
            context, tasks = _own_context()
        else:
            if stream.tasks is None:
                stream.tasks = _own_context()
            context, tasks = stream.tasks
        task = loop.create_task(coroutine, context=context)
        self.own_tasks = tasks
        self.cancelled_at_deadline = False
        try:
            return loop.run_until_complete(task)
        except asyncio.CancelledError:
            if self.cancelled_at_deadline:
                raise CallInterrupted from None
            raise
        finally:
            # An async generator's item (settle=False) leaves its tasks to the next item,
            # unless it was interrupted: then the stream ends, and its tasks go.
            if settle or not task.done():
                pending = [t for t in tasks if not t.done()]
                while pending:  # a task's finally may start another
                    for leftover in pending:
                        leftover.cancel()
                    loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
                    pending = [t for t in tasks if not t.done()]
            self.own_tasks = None

    # -- what a call writes --

    def capture(self, stream: int, text: str) -> None:
        """A write to sys.stdout (1) or sys.stderr (2): kept for the running call's
        caller, up to ``MAX_OUTPUT_CHARS``; dropped when no call keeps any, never logged."""
        if not self.output_name:
            return
        chunks = self.output
        if chunks is None:
            chunks = self.output = []
            self.output_chars = 0
        size = self.output_chars + len(text)
        if size > MAX_OUTPUT_CHARS:
            if self.output_chars <= MAX_OUTPUT_CHARS:
                chunks.append((2, f"[scatter: output past {MAX_OUTPUT_CHARS:,} characters dropped]\n"))
                self.output_chars = MAX_OUTPUT_CHARS + 1
            return
        self.output_chars = size
        chunks.append((stream, text))

    def take_output(self) -> _wire.Output | None:
        """What the call wrote, line by line behind its prefix; capturing ends."""
        chunks = self.output
        self.output = None
        if not chunks:
            return None
        return _prefixed(f"({self.output_name} {self.origin})", chunks)

    # -- streams: a generator function's items, as the caller grants credit --

    def stream_control(self, payload: bytes) -> bool:
        """Apply a ``More`` or ``Cancel`` from this frame's sender; False: not one."""
        try:
            control = _bounded(_wire.stream_control_decoder.decode, payload)
        except _wire.DECODE_ERRORS:
            return False
        stream = self.streams.get((self.identity, control.id))
        if stream is not None:
            if type(control) is _wire.More:
                stream.credit = min(stream.credit + control.credit, _MAX_STREAM_CREDIT)
            else:
                stream.cancelled = True
        return True

    def next_stream(self) -> Stream | None:
        """The stream to step next: a cancelled one, else one with credit, in turn."""
        ready = None
        for stream in self.streams.values():
            if stream.cancelled:
                return stream
            if ready is None and stream.credit > 0:
                ready = stream
        if ready is not None:  # round robin: it goes to the back of the line
            key = (ready.identity, ready.call_id)
            del self.streams[key]
            self.streams[key] = ready
        return ready

    def step(self, stream: Stream) -> tuple[bytes, bool]:
        """(the stream's next frame, whether it is the last): its next item, or its end
        (the generator returned, raised, ran past its timeout, or was cancelled)."""
        self.start_output(stream.loaded)
        if stream.cancelled:
            self.close_stream(stream)
            return self.stream_end(stream), True
        self.begin_deadline(stream.timeout)
        try:
            try:
                if stream.iterator is None:
                    stream.iterator = self.start_stream(stream)
                if stream.loaded.spec.streams == "async":
                    value = self.run_coroutine(
                        _anext(stream.iterator), settle=False, stream=stream
                    )
                else:
                    value = next(stream.iterator)
            finally:
                self.running = 0
                self.slots.end_call(self.slot)
        except (StopIteration, StopAsyncIteration):
            self.close_stream(stream)  # an async generator's leftover tasks
            return self.stream_end(stream), True
        except CallInterrupted:
            self.close_stream(stream)
            return self.failure(
                stream.call_id,
                "timeout",
                f"{stream.name} (version {stream.number}) took over its timeout of "
                f"{stream.timeout:g} s for item {stream.produced} and was interrupted; raise "
                "the timeout with @scatter(timeout=...) or per call",
            ), True
        except BaseException as exc:  # the function's exception, reported, never fatal
            self.close_stream(stream)
            return self.remote_failure(stream.call_id, exc, stream.role), True
        try:
            payload = stream.loaded.spec.encode_result(value)
        except ValidationError as exc:
            self.close_stream(stream)
            return self.failure(
                stream.call_id,
                "validation",
                f"item {stream.produced} of {stream.name}: {exc}",
                parameter="return",
                path=exc.path,
            ), True
        except Exception as exc:  # e.g. the check's decoding failing to unpickle the value
            _log_exception(f"checking an item of {stream.name}", exc)
            self.close_stream(stream)
            return self.failure(
                stream.call_id,
                "validation",
                f"item {stream.produced} of {stream.name} cannot be sent: "
                f"{type(exc).__name__}: {exc}",
                parameter="return",
            ), True
        stream.produced += 1
        stream.credit -= 1
        if not stream.credit:
            stream.waiting_since = time.monotonic()
        output = self.take_output()
        item = (_YIELDED_TAG, stream.call_id, msgspec.Raw(payload))
        return self.encode((*item, output) if output else item), False

    def start_stream(self, stream: Stream) -> Any:
        """Call the generator function (under the first item's deadline): its iterator."""
        produced = stream.loaded.spec.invoke(stream.loaded.function, stream.arguments)
        if stream.loaded.spec.streams == "async":
            return produced.__aiter__()
        return iter(produced)

    def close_stream(self, stream: Stream) -> None:
        """Close the generator (its ``finally`` runs) under the call's timeout; what goes
        wrong there is logged by type, and ends nothing but the generator."""
        iterator, stream.iterator = stream.iterator, None
        if iterator is None:
            return
        asynchronous = stream.loaded.spec.streams == "async"
        close = getattr(iterator, "aclose" if asynchronous else "close", None)
        if close is None:
            return
        self.begin_deadline(stream.timeout)
        try:
            try:
                if asynchronous:
                    self.run_coroutine(_awaited(close()), stream=stream)
                else:
                    close()
            finally:
                self.running = 0
                self.slots.end_call(self.slot)
        except CallInterrupted:
            _log(f"closing the generator of {stream.name} ran past its timeout")
        except BaseException as exc:
            _log_exception(f"closing the generator of {stream.name}", exc)

    def stream_end(self, stream: Stream) -> bytes:
        """The ``Result`` that ends a stream (value None), with what its end wrote."""
        output = self.take_output()
        end = (_RESULT_TAG, stream.call_id, stream.number, None)
        return self.encode((*end, output) if output else end)

    def expire(self, stream: Stream) -> bytes:
        """End a stream whose caller granted no credit within its timeout (gone, or stuck)."""
        self.start_output(stream.loaded)
        self.close_stream(stream)
        return self.failure(
            stream.call_id,
            "timeout",
            f"{stream.name}: the caller asked for no item within the timeout of "
            f"{stream.timeout:g} s, so the generator was closed",
        )

    def start_output(self, loaded: Loaded) -> None:
        self.output = None
        self.output_name = loaded.output_name

    def begin_deadline(self, timeout: float) -> None:
        """Arm the deadline of one step of work (a call, an item, closing a generator)."""
        self.call_number += 1
        self.deadline = time.monotonic() + timeout
        self.slots.begin_call(self.slot, self.call_number, self.deadline)
        self.running = self.call_number  # before arming: an alarm while idle is ignored
        self.arm(_ITIMER_REAL, timeout if timeout < _MAX_ALARM else _MAX_ALARM)

    # -- one call --

    def handle(self, payload: bytes) -> bytes | Stream | None:
        """One frame in, one reply out. Nothing raised here ends the worker's loop.

        Two exceptions: a generator function's call returns its ``Stream`` (the serve
        loop sends its items), and a stream's ``More`` or ``Cancel`` returns None (no
        reply; one for a stream that has ended already is ignored).
        """
        call_id = 0
        self.output = None
        try:
            if len(payload) > self.max_message_bytes:
                return self.failure(
                    0,
                    "protocol",
                    f"message of {len(payload)} bytes refused: the limit is {self.max_message_bytes}",
                )
            try:
                if _recursion_limit() > _MAX_DECODE_RECURSION:  # a function raised it
                    call = _bounded(self.decode_call, payload)
                else:
                    call = self.decode_call(payload)
            except _wire.DECODE_ERRORS as exc:  # RecursionError: nested past any limit
                if self.stream_control(payload):
                    return None
                return self.failure(0, "protocol", f"malformed call: {exc}")
            call_id = call.id
            try:
                return self.run(call)
            except _Refused as refusal:
                return self.failure(call_id, refusal.kind, str(refusal), **refusal.extra)
            except ValidationError as exc:
                return self.failure(
                    call_id, "validation", str(exc), parameter=exc.parameter, path=exc.path
                )
        except CallInterrupted:  # landed between the function's return and running = 0
            return self.failure(call_id, "timeout", "call interrupted at its deadline")
        except Exception as exc:
            _log_exception("a call failed inside the worker", exc)
            return self.failure(
                call_id,
                "internal",
                f"the worker failed on this call ({type(exc).__name__}); the node's log "
                "says where. The worker keeps serving.",
            )

    def failure(self, call_id: int, kind: _wire.FailureKind, message: str, **extra: Any) -> bytes:
        """An encoded ``Failure``, whatever the strings in it, with what the call wrote."""
        output = self.take_output()
        if output:
            extra["output"] = output
        try:
            return self.encode(_wire.Failure(call_id, kind, message, **extra))
        except UnicodeEncodeError:  # lone surrogates, from an exception's message
            clean: dict[str, Any] = {
                k: _encodable(v) if isinstance(v, str) else v for k, v in extra.items()
            }
            return self.encode(_wire.Failure(call_id, kind, _encodable(message), **clean))

    def arguments_without_pickles(self, call: _wire.Call, loaded: Loaded) -> Any:
        """A call-only client's arguments: a pickle is code, and that role runs none."""
        assert loaded.refusing is not None
        try:
            return _bounded(loaded.refusing, call.args)
        except MsgspecValidationError as exc:
            if "call-only" in str(exc):
                raise _Refused(
                    "forbidden",
                    f"{call.name}(): this client's secret is call-only, and a pickled "
                    "argument would run code on the node; call it with the cluster secret",
                ) from None
            raise argument_error(call.name, exc) from None

    def run(self, call: _wire.Call) -> bytes | Stream:
        generation = self.slots.generation()
        if generation != self.generation:
            self.routes.clear()
            self.generation = generation
        route = self.routes.get((call.name, call.version)) or self.route(call.name, call.version)
        number, loaded = route
        spec = loaded.spec
        if call.signature_id and call.signature_id != spec.signature_id:
            raise _Refused(
                "signature_changed",
                f"{call.name}: the signature changed from version {call.known_version} to "
                f"version {number} {spec.signature}; the callable has refreshed, call it again "
                "with the new arguments",
                name=call.name,
                old_version=call.known_version,
                new_version=number,
            )
        try:
            if loaded.refusing is not None and _role_of(self.frame) == "call":
                arguments = self.arguments_without_pickles(call, loaded)
            elif _recursion_limit() > _MAX_DECODE_RECURSION:
                arguments = _bounded(spec.decode_arguments, call.args)
            else:
                arguments = spec.decode_arguments(call.args)
        except (ValidationError, _Refused):
            raise
        except DecodeError as exc:  # e.g. invalid UTF-8: the caller's frame, not our bug
            raise _Refused("validation", f"{call.name}() arguments: {exc}") from None
        except RecursionError:
            raise _Refused(
                "validation",
                f"{call.name}() arguments: a value is nested too deeply (the limit is about "
                f"{_wire.MAX_DECODE_RECURSION} levels)",
            ) from None
        except Exception as exc:
            # An extension value (a pickled object) that does not unpickle here: not a
            # pickle, or a class from a module this node lacks.
            _log_exception(f"decoding the arguments of {call.name}", exc)
            raise _Refused(
                "validation",
                f"{call.name}() arguments: a value cannot be decoded on this node "
                f"({type(exc).__name__}: {exc})",
            ) from None
        timeout = call.timeout or loaded.timeout or self.default_timeout
        if not (math.isfinite(timeout) and timeout > 0):  # no NaN, no endless call
            raise _Refused(
                "protocol", f"{call.name}: a timeout must be a positive number of seconds"
            )
        now = time.monotonic()  # the one clock read of a call: its deadline counts from it
        if call.caller:
            self.once.admit(call, now)  # at most once: refuses a repeat or a late start
        if spec.streams:
            role = _role_of(self.frame)
            return Stream(call, number, loaded, arguments, timeout, role, self.identity)
        self.call_number += 1
        self.deadline = deadline = now + timeout
        self.slots.begin_call(self.slot, self.call_number, deadline)
        self.running = self.call_number  # before arming: an alarm while idle is ignored
        # Not disarmed after the call: the next call re-arms (see the module docstring).
        self.output_name = loaded.output_name
        self.arm(_ITIMER_REAL, timeout if timeout < _MAX_ALARM else _MAX_ALARM)
        try:
            try:
                value = spec.invoke(loaded.function, arguments)
            finally:
                self.running = 0
                self.slots.end_call(self.slot)
        except CallInterrupted:
            raise _Refused(
                "timeout",
                f"{call.name} (version {number}) ran past its timeout of {timeout:g} s and was "
                "interrupted; raise the timeout with @scatter(timeout=...) or per call",
            ) from None
        except BaseException as exc:  # the function's exception, reported, never fatal
            return self.remote_failure(call.id, exc)
        try:
            return spec.encode_reply(
                _RESULT_TAG, call.id, number, value, None if self.output is None else self.take_output()
            )
        except ValidationError as exc:
            # encode_result raises ValidationError from the encoder's TypeError for a
            # value that cannot be encoded, from None for one not matching the annotation.
            if not isinstance(exc.__cause__, TypeError):
                raise
            reason = str(exc.__cause__)
        except Exception as exc:  # e.g. the check's decoding failing to unpickle the value
            _log_exception(f"checking the result of {call.name}", exc)
            reason = f"{type(exc).__name__}: {exc}"
        raise _Refused(
            "validation",
            f"the result of {call.name} (version {number}) cannot be sent: {reason}",
            parameter="return",
        )

    def remote_failure(self, call_id: int, exc: BaseException, role: str | None = None) -> bytes:
        """The function's exception as a ``remote`` failure, even if it will not print.

        ``role``: the caller's (a stream's, kept from its call); default: this frame's."""
        try:
            message = str(exc)
        except Exception as inner:
            message = f"<str() of the exception raised {type(inner).__name__}>"
        try:
            trace = _user_traceback(exc)
        except Exception as inner:
            trace = f"<the traceback could not be formatted: {type(inner).__name__}>"
        args, attributes = _exception_state(exc)
        # A pickle is code: never for a call-only caller (who must not load any), and
        # only the caller decides whether it loads one (_client/_remote_errors.py).
        if role is None:
            role = _role_of(self.frame)
        pickled = _pickled_exception(exc) if role != "call" else b""
        return self.failure(
            call_id,
            "remote",
            message,
            remote_type=_qualified_name(type(exc)),
            remote_traceback=trace,
            remote_args=args,
            remote_attributes=attributes,
            remote_pickle=pickled,
        )


class CallOutput(io.TextIOBase):
    """A worker's ``sys.stdout`` / ``sys.stderr``: what a call prints (``print``,
    ``logging``, ``warnings``, tracebacks) goes back to its caller (``Worker.capture``),
    never to the node's log: a function may print its arguments (Ray's ``log_to_driver``).

    The object stays in place for the process's life, so a logging handler made with
    ``sys.stderr`` in any call writes to the call running when it emits. Writes to the
    file descriptors themselves (C code, subprocesses) are not captured: fd 1 is
    ``/dev/null``, fd 2 the node's log (the worker's own messages, and fatal errors).
    """

    encoding = "utf-8"
    errors = "backslashreplace"

    def __init__(self, worker: Worker, stream: int) -> None:
        super().__init__()
        self._capture = worker.capture
        self._stream = stream

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def write(self, text: str) -> int:
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        self._capture(self._stream, text)
        return len(text)


def _prefixed(label: str, chunks: list[tuple[int, str]]) -> _wire.Output:
    """Consecutive writes to one stream joined, each line behind ``label``; a last line
    without its newline gets one (the caller prints whole lines)."""
    merged: list[tuple[int, list[str]]] = []
    for stream, text in chunks:
        if merged and merged[-1][0] == stream:
            merged[-1][1].append(text)
        else:
            merged.append((stream, [text]))
    output: _wire.Output = []
    for stream, texts in merged:
        lines = "".join(texts).splitlines(keepends=True)
        text = "".join(
            f"{label} {line}" if line.endswith("\n") else f"{label} {line}\n" for line in lines
        )
        if text:
            output.append((stream, _encodable(text)))
    return output


async def _anext(iterator: Any) -> Any:
    return await iterator.__anext__()


async def _awaited(awaitable: Any) -> Any:
    return await awaitable


def _renamed(code: types.CodeType, filename: str) -> types.CodeType:
    consts = tuple(
        _renamed(c, filename) if isinstance(c, types.CodeType) else c for c in code.co_consts
    )
    return code.replace(co_filename=filename, co_consts=consts)


def _attach_source(function: types.FunctionType, filename: str, source: str) -> None:
    """Let tracebacks show the function's own lines: the file it came from is elsewhere."""
    code = function.__code__
    function.__code__ = _renamed(code, filename)
    lines = [""] * (code.co_firstlineno - 1) + source.splitlines(keepends=True)
    linecache.cache[filename] = (len(source), None, lines, filename)


_MAX_REASON_CHARS = 300


def _load_reason(exc: BaseException) -> str:
    """Why a body does not load, short: "missing module `x`" when an import failed."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            break
        if isinstance(seen, ModuleNotFoundError) and seen.name:
            return f"missing module `{seen.name}`"
        seen = seen.__cause__ or seen.__context__
    return f"cannot load it ({type(exc).__name__}: {exc})"[:_MAX_REASON_CHARS]


def _qualified_name(cls: type) -> str:
    module = cls.__module__
    return cls.__qualname__ if module == "builtins" else f"{module}.{cls.__qualname__}"


_plain_encode = msgspec.msgpack.Encoder().encode  # msgpack's own types only: no pickles
MAX_EXCEPTION_STATE_BYTES = 256 * 1024  # args, attributes, pickle: each; beyond, not sent


def _exception_state(exc: BaseException) -> tuple[bytes, bytes]:
    """``exc.args`` and the ``__dict__`` entries plain msgpack carries, each encoded.

    ``b""`` for args that do not encode: the caller then cannot rebuild the exception by
    its class's name. Attributes that do not encode are left out one by one.
    """
    try:
        args = _plain_encode(list(exc.args))
    except Exception:
        args = b""
    kept: dict[str, Any] = {}
    for name, value in getattr(exc, "__dict__", {}).items():
        if isinstance(name, str) and not name.startswith("__"):
            try:
                _plain_encode(value)
            except Exception:
                continue
            kept[name] = value
    try:
        attributes = _plain_encode(kept) if kept else b""
    except Exception:
        attributes = b""
    if len(args) > MAX_EXCEPTION_STATE_BYTES or len(attributes) > MAX_EXCEPTION_STATE_BYTES:
        return b"", b""
    return args, attributes


def _pickled_exception(exc: BaseException) -> bytes:
    """``exc`` by cloudpickle (its class by value where this process cannot import it),
    or ``b""``: not an ``Exception``, does not pickle, or too large."""
    if not isinstance(exc, Exception):
        return b""
    try:
        pickled = cloudpickle.dumps(exc)
    except Exception:
        return b""
    return pickled if len(pickled) <= MAX_EXCEPTION_STATE_BYTES else b""


def _user_traceback(exc: BaseException) -> str:
    # Skip the worker's own frames (and asyncio's, that ran an async def): the caller
    # wants the function's.
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename.startswith(_NOT_THE_FUNCTIONS):
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, tb))


def worker_socket(
    context: zmq.Context[zmq.Socket[bytes]], max_message_bytes: int
) -> zmq.Socket[bytes]:
    """The worker's ROUTER, with the limits of _wire.py on what one peer may queue."""
    sock = context.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes + 4096)
    sock.setsockopt(zmq.RCVHWM, _wire.PEER_QUEUE_FRAMES)
    sock.setsockopt(zmq.SNDHWM, _wire.PEER_REPLY_FRAMES)
    # Never drop a reply silently: wait for room, or fail the send (a gone or stalled
    # client) and say so, rather than leave a pipelining caller with a hole.
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    sock.setsockopt(zmq.SNDTIMEO, _wire.REPLY_SEND_TIMEOUT_MS)
    return sock


def _is_loopback_host(host: str) -> bool:
    host = host.strip("[]")
    return host in ("localhost", "::1") or host.startswith("127.")


def _role_of(frame: zmq.Frame | None) -> str:
    """The ZAP role of a call's sender: "deploy", "call", or "" (the Unix socket: only
    the node's own user can open it, who holds the cluster secret anyway)."""
    if frame is None:
        return ""
    try:
        return str(frame.get("User-Id") or "")
    except zmq.ZMQError:
        return ""


def _client_roles(text: str) -> dict[bytes, str]:
    roles: dict[bytes, str] = {}
    for item in filter(None, text.split(",")):
        role, _, key = item.partition(":")
        roles[bytes.fromhex(key)] = role
    return roles


def _serve_zap(context: zmq.Context[zmq.Socket[bytes]], clients: dict[bytes, str]) -> None:
    """Answer ZAP for the worker's TCP endpoint, in a thread: a known key gets its role."""
    sock = context.socket(zmq.REP)
    sock.bind("inproc://zeromq.zap.01")

    def answer() -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})  # the call's, not ours
        while True:
            try:
                frames = sock.recv_multipart()
            except zmq.ZMQError:
                return
            version, request_id, mechanism = frames[0], frames[1], frames[5]
            if mechanism == b"NULL":
                # Only the Unix socket speaks NULL (the TCP listener is a CURVE server),
                # and only the node's user can open it.
                sock.send_multipart([version, request_id, b"200", b"OK", b"", b""])
                continue
            key = frames[6] if len(frames) > 6 and mechanism == b"CURVE" else b""
            role = clients.get(key, "")
            status = [b"200", b"OK", role.encode()] if role else [b"400", b"unknown key", b""]
            sock.send_multipart([version, request_id, *status, b""])

    threading.Thread(target=answer, name="scatter-zap", daemon=True).start()


def serve(worker: Worker, host: str, ipc_path: Path | None, parent_fd: int | None) -> None:
    """Answer calls until the node goes away.

    Resource handling: the socket is bound to ``host`` on a free port and, for clients on
    this machine, to a Unix socket (~15% faster round trips than loopback TCP); both are
    announced on stdout. With ``parent_fd``, a thread watches the node (``watch_parent``);
    without it (a worker started by hand) the worker runs until it is stopped.
    Error handling: a bad frame gets a failure (``Worker.handle``); nothing a caller sends
    ends the loop. Only losing the node does, or a call ignoring its interrupt.
    """
    context = zmq.Context()
    sock = worker_socket(context, worker.max_message_bytes)
    if ":" in host:
        sock.setsockopt(zmq.IPV6, 1)
        host = f"[{host}]"
    # CURVE on TCP, with the node's server key; no ZAP: both roles may call, and only a
    # client that derived the server's public key from the secret completes the
    # handshake (see _security.py). Options are taken per listener, at bind: the Unix
    # socket below, in a directory only the user can open, stays plain and fast.
    server_key = os.environ.pop(WORKER_KEY_VARIABLE, "")
    clients = _client_roles(os.environ.pop(WORKER_CLIENTS_VARIABLE, ""))
    if server_key:
        # With ZAP on TCP: each call then carries its client's role, and a call-only key
        # may not send pickles (see Worker.arguments_without_pickles).
        apply_server_keys(sock, server_key.encode(), zap=bool(clients))
        if clients:
            _serve_zap(context, clients)
    sock.bind(f"tcp://{host}:*")
    sock.curve_server = False  # the Unix socket: plain (ZAP lets its NULL peers in)
    endpoints = [sock.getsockopt_string(zmq.LAST_ENDPOINT)]
    if ipc_path is not None:
        with contextlib.suppress(zmq.ZMQError):
            sock.bind(f"ipc://{ipc_path}")
            endpoints.append(f"ipc://{ipc_path}")
            worker.ipc_path = ipc_path
    signal.signal(signal.SIGALRM, worker.on_alarm)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the node decides when workers stop
    if parent_fd is not None:
        worker.watch_parent(parent_fd)
    sys.stdout.write(f"READY {' '.join(endpoints)}\n")
    sys.stdout.flush()
    # The same pipe carries what this worker cannot load to the node (report_cannot_load).
    worker.report_fd = os.dup(1)  # not inheritable: a function's subprocess gets none
    os.set_blocking(worker.report_fd, False)
    # The node stops reading our stdout after READY. What a call prints goes to its
    # caller (CallOutput), never to the node's log; fd 1 goes nowhere rather than fill a
    # pipe nobody drains.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)
    sys.stdout = CallOutput(worker, 1)
    sys.stderr = CallOutput(worker, 2)
    if not _is_loopback_host(host):
        worker.origin += f" ip={host.strip('[]')}"
    recv = sock.recv
    send = sock.send
    more = sock.get
    handle = worker.handle
    streams = worker.streams
    while True:
        if streams and _stream_turn(worker, sock):
            if worker.orphaned:  # the node died during a step: its watch saw us busy
                _leave(context, sock, worker)
            continue
        try:
            identity = recv()  # a ROUTER always puts the sender's identity first
            # A frame, not bytes: it knows who sent it (the role ZAP gave its key).
            worker.frame = frame = recv(copy=False)
            payload = frame.bytes
            if more(zmq.RCVMORE):
                while more(zmq.RCVMORE):
                    recv()
                continue
        except CallInterrupted:  # only raised while a call runs; a guard
            continue
        except zmq.ZMQError as exc:
            _log_exception("receiving", exc)
            if exc.errno in (zmq.ETERM, zmq.ENOTSOCK):
                return
            continue
        worker.busy = True
        worker.identity = identity
        try:
            reply = handle(payload)
        except Exception as exc:  # handle answers everything itself; a last guard
            _log_exception("a call failed inside the worker", exc)
            reply = _INTERNAL_FAILURE
        if type(reply) is not bytes:
            if isinstance(reply, Stream):  # a generator's call: its items go out in turns
                _open_stream(worker, sock, reply)
            worker.busy = False
            if worker.orphaned:
                _leave(context, sock, worker)
            continue
        try:
            send(identity, zmq.SNDMORE)
            send(reply)
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EHOSTUNREACH:  # a caller that went away: nothing to say
                _log_exception("sending a reply", exc)
        if worker.orphaned:  # the node died during this call
            _leave(context, sock, worker)
        worker.busy = False
        if worker.orphaned:  # it died just now, and its watch saw us busy: see watch_parent
            _leave(context, sock, worker)


def _stream_turn(worker: Worker, sock: zmq.Socket[bytes]) -> bool:
    """While streams are open: step one that may go on, unless a frame is waiting (calls
    and credit are read between items, so a plain call never waits for a stream to end).
    True if it did something; False: go read the next frame.

    With every stream out of credit, waits for a frame up to the first stream's expiry,
    and expires those past it.
    """
    ready = worker.next_stream()
    if ready is not None:
        events: int = sock.get(zmq.EVENTS)  # type: ignore[assignment]
        if events & zmq.POLLIN:
            return False
        worker.busy = True
        try:
            frame, ended = worker.step(ready)
        except Exception as exc:  # step answers everything itself; a last guard
            _log_exception("a stream failed inside the worker", exc)
            frame, ended = _INTERNAL_FAILURE, True
        if ended:
            del worker.streams[(ready.identity, ready.call_id)]
        if not _send_to(sock, ready.identity, frame) and not ended:
            # The caller is gone: close its generator, nobody will read the end.
            del worker.streams[(ready.identity, ready.call_id)]
            worker.start_output(ready.loaded)
            worker.close_stream(ready)
            worker.output = None
        worker.busy = False
        return True
    now = time.monotonic()
    first = min(s.waiting_since + s.timeout for s in worker.streams.values())
    if first > now and sock.poll(max(1, math.ceil((first - now) * 1000))):
        return False
    now = time.monotonic()
    for stream in list(worker.streams.values()):
        if not stream.credit and stream.waiting_since + stream.timeout <= now:
            del worker.streams[(stream.identity, stream.call_id)]
            worker.busy = True
            _send_to(sock, stream.identity, worker.expire(stream))
            worker.busy = False
    return True


def _open_stream(worker: Worker, sock: zmq.Socket[bytes], stream: Stream) -> None:
    key = (stream.identity, stream.call_id)
    earlier = worker.streams.pop(key, None)
    if earlier is not None:  # the same call id again from one caller: the first one ends
        _send_to(sock, earlier.identity, worker.expire(earlier))
    worker.streams[key] = stream


def _send_to(sock: zmq.Socket[bytes], identity: bytes, frame: bytes) -> bool:
    """Send one frame to the caller ``identity``; False if it is gone (or stalled)."""
    try:
        sock.send(identity, zmq.SNDMORE)
        sock.send(frame)
    except zmq.ZMQError as exc:
        if exc.errno != zmq.EHOSTUNREACH:
            _log_exception("sending a stream's frame", exc)
        return False
    return True


def _leave(
    context: zmq.Context[zmq.Socket[bytes]], sock: zmq.Socket[bytes], worker: Worker
) -> None:
    """Exit after the node's death, once the reply just sent has had time to be read.

    A client socket with ZMQ_IMMEDIATE (Scatter's) discards a reply it has not read yet
    when the connection closes, so the socket stays open until the caller sends its next
    frame (it has read the reply) or ``_LEAVE_LINGER_MS`` passes; then pending output is
    flushed (the same bound) and the process exits.
    """
    with contextlib.suppress(Exception):
        sock.poll(_LEAVE_LINGER_MS)
        sock.close(linger=_LEAVE_LINGER_MS)
    # term() flushes what the socket still holds, but it also waits for every other
    # socket of the context (the ZAP thread's): a worker was seen stuck there for good
    # after its node died. So it gets a bounded time, in a thread, and then we exit.
    flushing = threading.Thread(target=context.term, name="scatter-leave", daemon=True)
    flushing.start()
    flushing.join(2 * _LEAVE_LINGER_MS / 1000)
    worker.exit(0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m scatter._node._worker")
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--run-dir", type=Path, default=None, help="default: DATA_DIR/run")
    parser.add_argument("--slot", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--timeout", type=float, default=DEFAULT_CALL_TIMEOUT)
    parser.add_argument("--kill-grace", type=float, default=NodeConfig.kill_grace)
    parser.add_argument("--max-message-bytes", type=int, default=MAX_MESSAGE_BYTES)
    parser.add_argument(
        "--parent-fd", type=int, default=None, help="read end of the node's lifetime pipe"
    )
    args = parser.parse_args(argv)
    run_dir: Path = (args.run_dir or args.data_dir / "run").resolve()
    if args.parent_fd is not None:
        os.set_inheritable(args.parent_fd, False)  # not into a function's subprocesses
    worker = Worker(
        args.data_dir,
        args.slot,
        args.timeout,
        args.max_message_bytes,
        run_dir=run_dir,
        kill_grace=args.kill_grace,
    )
    # One path per process: a client never reconnects silently to another worker.
    ipc_path = run_dir / f"worker-{args.slot}-{os.getpid()}.sock"
    # Unix socket paths are limited to ~107 bytes; a deep data dir goes without.
    try:
        serve(worker, args.host, ipc_path if len(str(ipc_path)) < 100 else None, args.parent_fd)
    except BaseException as exc:  # sys.stderr is the calls' now: say it in the node's log
        _log_exception("the worker's loop ended", exc)
        raise


if __name__ == "__main__":
    main()
