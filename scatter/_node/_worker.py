"""A worker process: runs calls, one at a time, straight off its own socket.

Why processes, and why clients talk to them directly: the speed issue measured a thread
hop at ~110-225 us and a broker hop at ~100 us per call, against ~120 us for a whole
pyzmq round trip. So a call goes client -> worker socket -> function -> reply, in a plain
synchronous loop with no hop between the socket and the code. The node (a Trio process)
leases workers to client connections, so a hung or CPU-heavy call holds up only its own
caller, CPU-bound calls from several clients run on several cores, and a function that
kills its interpreter costs one call: the node notices and starts a replacement.

Timeouts: the worker writes each call's deadline to its shared slot. Past it, the node
sends SIGUSR1 and the handler raises ``CallInterrupted`` inside the function (which works
for Python code and for interruptible sleeps); if the call is still running ``kill_grace``
later, the node kills the process.

Run as ``python -m scatter._node._worker --data-dir D --slot N --host H``; it prints one
line, ``READY <endpoint>``, once it listens.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import linecache
import os
import signal
import sys
import time
import traceback
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cloudpickle
import msgspec
import zmq

from .. import _wire
from .._config import DEFAULT_CALL_TIMEOUT, MAX_MESSAGE_BYTES
from .._core._registry import resolve_view
from .._core._signature import CallSpec, build_call_spec, restore_signature, signature_of
from .._exceptions import FunctionNotFound, NotScatterable, ValidationError, VersionNotFound
from ._slots import SharedSlots
from ._store import RegistryStore

_SCATTER_DIR = str(Path(__file__).resolve().parent.parent)


MAX_LOADED_VERSIONS = 256  # loaded bodies a worker keeps for reuse

_RESULT_TAG: int = _wire.Result.__struct_config__.tag  # type: ignore[assignment]


class CallInterrupted(BaseException):
    """Raised inside a function past its deadline. A BaseException, so that a function's
    own ``except Exception`` cannot swallow it."""


@dataclass(frozen=True, slots=True)
class Loaded:
    """One version, ready to run: built once per content id (bodies are immutable)."""

    function: Any
    spec: CallSpec
    timeout: float | None  # the version's own call timeout


class _Refused(Exception):
    def __init__(self, failure_kind: _wire.FailureKind, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.kind = failure_kind
        self.extra = extra


class Worker:
    def __init__(
        self, data_dir: Path, run_dir: Path, slot: int, default_timeout: float, max_message_bytes: int
    ) -> None:
        self.store = RegistryStore(data_dir / "registry")
        self.slots = SharedSlots(run_dir / "slots")
        self.slot = slot
        self.default_timeout = default_timeout
        self.max_message_bytes = max_message_bytes
        self.generation = -1
        # {(name, pinned version or 0): (number, loaded)}, valid for self.generation
        self.routes: dict[tuple[str, int], tuple[int, Loaded]] = {}
        # {content_id: Loaded}: never stale (bodies are immutable), least recently used
        # first; bounded so a long-lived worker does not keep every version ever called.
        self.loaded: collections.OrderedDict[str, Loaded] = collections.OrderedDict()
        self.call_number = 0
        self.running = 0  # call number running now, 0 when idle
        self.deadline = 0.0
        self.encode = _wire.encoder.encode
        self.decode_call = _wire.call_decoder.decode

    # -- interruption --

    def on_interrupt(self, signum: int, frame: object) -> None:
        if self.running and time.monotonic() >= self.deadline:
            raise CallInterrupted

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
        loaded = self.loaded.get(content_id)
        if loaded is not None:
            self.loaded.move_to_end(content_id)  # off the hot path: routes hold Loaded
            return loaded
        record = self.store.record(content_id)
        body = self.store.body(content_id)
        if record is None or body is None:
            raise _Refused("load", f"the body of {name} ({content_id}) is missing on this node")
        try:
            function = cloudpickle.loads(body)
            # The shipped signature, not one read off the body here: its annotations were
            # resolved where the function was defined (see portable_signature).
            if record.signature:
                signature = restore_signature(cloudpickle.loads(record.signature))
            else:
                signature = signature_of(function)
            spec = build_call_spec(name, signature)
            if record.source and isinstance(function, types.FunctionType):
                _attach_source(function, f"<scatter {name} {content_id[:12]}>", record.source)
        except NotScatterable as exc:
            raise _Refused("load", f"cannot prepare {name} on this node: {exc}") from exc
        except Exception as exc:
            raise _Refused(
                "load",
                f"cannot load {name} on this node ({type(exc).__name__}: {exc}); "
                "its body needs a module or Python version this node lacks",
            ) from exc
        loaded = Loaded(function, spec, record.timeout)
        self.loaded[content_id] = loaded
        if len(self.loaded) > MAX_LOADED_VERSIONS:
            self.loaded.popitem(last=False)
        return loaded

    # -- one call --

    def handle(self, payload: bytes) -> bytes:
        if len(payload) > self.max_message_bytes:
            return self.encode(
                _wire.Failure(
                    0,
                    "protocol",
                    f"message of {len(payload)} bytes refused: the limit is {self.max_message_bytes}",
                )
            )
        try:
            call = self.decode_call(payload)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            return self.encode(_wire.Failure(0, "protocol", f"malformed call: {exc}"))
        try:
            return self.run(call)
        except _Refused as refusal:
            return self.encode(_wire.Failure(call.id, refusal.kind, str(refusal), **refusal.extra))
        except ValidationError as exc:
            return self.encode(
                _wire.Failure(
                    call.id, "validation", str(exc), parameter=exc.parameter, path=exc.path
                )
            )

    def run(self, call: _wire.Call) -> bytes:
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
        arguments = spec.decode_arguments(call.args)
        timeout = call.timeout or loaded.timeout or self.default_timeout
        self.call_number += 1
        self.deadline = deadline = time.monotonic() + timeout
        self.slots.begin_call(self.slot, self.call_number, deadline)
        self.running = self.call_number
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
            return self.encode(
                _wire.Failure(
                    call.id,
                    "remote",
                    str(exc),
                    remote_type=_qualified_name(type(exc)),
                    remote_traceback=_user_traceback(exc),
                )
            )
        return spec.encode_reply(_RESULT_TAG, call.id, number, value)


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


def _qualified_name(cls: type) -> str:
    module = cls.__module__
    return cls.__qualname__ if module == "builtins" else f"{module}.{cls.__qualname__}"


def _user_traceback(exc: BaseException) -> str:
    # Skip the worker's own frames: the caller wants the function's.
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename.startswith(_SCATTER_DIR):
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, tb))


def serve(worker: Worker, host: str, ipc_path: Path | None) -> None:
    """Answer calls until the node goes away.

    Resource handling: the socket is bound to ``host`` on a free port and, for clients on
    this machine, to a Unix socket (~15% faster round trips than loopback TCP); both are
    announced on stdout.
    Error handling: a bad frame gets a ``protocol`` failure; nothing a caller sends ends
    the loop. Only losing the parent node does.
    """
    parent = os.getppid()
    context = zmq.Context()
    sock = context.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    # Idle workers look up every quarter second whether their node is still there. Not
    # PR_SET_PDEATHSIG: it fires when the parent *thread* exits, and trio spawns processes
    # from a cache thread that exits after 10 s idle: every worker died 10 s after start.
    sock.setsockopt(zmq.RCVTIMEO, 250)
    sock.setsockopt(zmq.MAXMSGSIZE, worker.max_message_bytes + 4096)
    if ":" in host:
        sock.setsockopt(zmq.IPV6, 1)
        host = f"[{host}]"
    sock.bind(f"tcp://{host}:*")
    endpoints = [sock.getsockopt_string(zmq.LAST_ENDPOINT)]
    if ipc_path is not None:
        with contextlib.suppress(zmq.ZMQError):
            sock.bind(f"ipc://{ipc_path}")
            endpoints.append(f"ipc://{ipc_path}")
    signal.signal(signal.SIGUSR1, worker.on_interrupt)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the node decides when workers stop
    sys.stdout.write(f"READY {' '.join(endpoints)}\n")
    sys.stdout.flush()
    # The node stops reading our stdout after READY: what a function prints goes to the
    # node's log through stderr instead of filling a pipe nobody drains.
    os.dup2(2, 1)
    recv = sock.recv
    send = sock.send
    more = sock.get
    handle = worker.handle
    while True:
        try:
            identity = recv()  # a ROUTER always puts the sender's identity first
            payload = recv()
            if more(zmq.RCVMORE):
                while more(zmq.RCVMORE):
                    recv()
                continue
        except zmq.Again:
            if os.getppid() != parent:
                return
            continue
        except CallInterrupted:  # a late interrupt landing while idle
            continue
        try:
            reply = handle(payload)
        except CallInterrupted:  # landed between the function's return and end_call
            reply = worker.encode(_wire.Failure(0, "timeout", "call interrupted at its deadline"))
        send(identity, zmq.SNDMORE)
        send(reply)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m scatter._node._worker")
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--slot", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--timeout", type=float, default=DEFAULT_CALL_TIMEOUT)
    parser.add_argument("--max-message-bytes", type=int, default=MAX_MESSAGE_BYTES)
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--kill-grace", type=float, default=1.0)
    parser.add_argument("--parent-fd", type=int, default=-1)
    args = parser.parse_args(argv)
    worker = Worker(args.data_dir, args.run_dir, args.slot, args.timeout, args.max_message_bytes)
    ipc_path = args.run_dir.resolve() / f"worker-{args.slot}-{os.getpid()}.sock"
    # Unix socket paths are limited to ~107 bytes; a deep data dir goes without.
    serve(worker, args.host, ipc_path if len(str(ipc_path)) < 100 else None)


if __name__ == "__main__":
    main()
