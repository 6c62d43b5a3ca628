"""Seeds and fixtures for cluster/fuzz.py: real frames of every kind, a node's history.

Everything here is built the way Scatter builds it: functions are turned into ``Publish``
requests by the client's own ``prepare_publish``, the history goes through ``NodeCore``
(persist, then apply, then views), calls are encoded with the function's ``CallSpec``
and changes come out of real registries. A seed is one fuzz input in the harness's format
(see ``frames`` in fuzz.py): a target byte, a flags byte, then length-prefixed frames.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from scatter import _wire
from scatter._config import MAX_MESSAGE_BYTES, NodeConfig
from scatter._core._node import (
    BumpGeneration,
    Effect,
    Log,
    NodeCore,
    NodeFacts,
    PersistChanges,
    PersistViews,
    Send,
    Stop,
)
from scatter._core._pool import KillWorker, StartWorker, StopWorker
from scatter._core._registry import Change, FunctionView, Registry, VersionRecord
from scatter._core._signature import build_call_spec, signature_of
from scatter._core._vclock import VectorClock
from scatter._node._slots import SharedSlots
from scatter._node._store import RegistryStore
from scatter._node._worker import Worker
from scatter._publish import prepare_publish

TARGETS = ("decode", "node", "worker", "registry", "pool")


# -- the functions a node holds ---------------------------------------------------


class Point(msgspec.Struct):
    x: float
    y: float = 0.0


def sample(
    a: int,
    b: str = "",
    c: list[float] | None = None,
    d: dict[str, int] | None = None,
    p: Point | None = None,
    *rest: int,
    **options: str,
) -> dict[str, float]:
    """Every kind of parameter; 13 raises, 7 returns a value its annotation refuses."""
    if a == 13:
        raise ValueError("thirteen")
    if a == 7:
        return {"seven": "not a float"}  # type: ignore[dict-item]
    size = len(b) + len(c or ()) + len(d or {}) + len(rest) + len(options)
    return {"a": float(a), "size": float(size), "x": p.x if p else 0.0}


def m1(x: float) -> float:
    return x * 2


def m2(s: str, n: int = 1) -> list[str]:
    return [s] * min(n, 100)


def gone() -> None:
    return None


def counting(n: int) -> Iterator[int]:
    """A generator: its calls stream (Yielded, More, Cancel); 13 raises, 7 a wrong item."""
    for i in range(min(n, 20)):
        if n == 13 and i == 3:
            raise ValueError("thirteen")
        yield "seven" if n == 7 and i == 2 else i  # type: ignore[misc]


def publish(fn: Callable[..., Any], request_id: int = 1, **overrides: Any) -> _wire.Publish:
    fields = prepare_publish(fn)
    fields.update(overrides)
    return _wire.Publish(id=request_id, **fields)


# -- a driver that persists in memory, as the node's does on disk ------------------


def facts(writer: str = "n1.1.aaaaaa") -> NodeFacts:
    return NodeFacts(
        node_id="n1",
        writer_id=writer,
        incarnation=1,
        address="tcp://127.0.0.1:1",
        pid=1,
        data_dir="/nowhere",
        started_at=0.0,
        python="3.11.7",
        scatter_version="0",
    )


@dataclass
class Disk:
    """What a node's store holds, in memory; ``run`` performs effects as the driver does.

    ``fail_persist``: PersistChanges fail (the core must answer, apply nothing).
    ``start_workers``: answer each StartWorker with ``worker_started`` (else leave it
    starting); ``fail_starts``: answer it with ``worker_start_failed`` instead.
    """

    changes: dict[str, Change] = field(default_factory=dict)
    views: dict[str, FunctionView] = field(default_factory=dict)
    bodies: dict[str, bytes] = field(default_factory=dict)
    records: dict[str, VersionRecord] = field(default_factory=dict)
    generation: int = 0
    fail_persist: bool = False
    start_workers: bool = True
    fail_starts: bool = False
    stopped: bool = False  # a Stop effect was seen
    stopped_failed: bool = False
    logs: list[str] = field(default_factory=list)
    writes: int = 0  # PersistViews performed
    stores: int = 0  # PersistChanges and PersistViews performed: what is stored changed

    def copy(self) -> Disk:
        return Disk(dict(self.changes), dict(self.views), dict(self.bodies), dict(self.records))

    def core(self, config: NodeConfig | None = None, writer: str = "n1.1.aaaaaa") -> NodeCore:
        core = NodeCore(
            config or NodeConfig(), facts(writer), self.changes.values(), self.views, self.bodies
        )
        self.run(core, core.start(0.0))
        return core

    def run(self, core: NodeCore, effects: Iterable[Effect], now: float = 0.0) -> list[bytes]:
        """Perform ``effects`` and everything they lead to; the payloads sent, in order."""
        sent: list[bytes] = []
        pending = list(effects)
        while pending:
            effect = pending.pop(0)
            if isinstance(effect, Send):
                sent.append(effect.payload)
            elif isinstance(effect, PersistChanges):
                if self.fail_persist:
                    pending += core.persist_failed(effect.ticket, "OSError: disk full")
                    continue
                self.stores += 1
                for change in effect.changes:
                    self.changes[change.change_id] = change
                for content_id, (record, body) in effect.bodies.items():
                    self.bodies.setdefault(content_id, body)
                    self.records.setdefault(content_id, record)
                pending += core.changes_persisted(effect.ticket)
            elif isinstance(effect, PersistViews):
                self.writes += 1
                self.stores += 1
                for name, view in effect.views.items():
                    if view is None:
                        self.views.pop(name, None)
                    else:
                        self.views[name] = view
                for content_id in effect.dropped_bodies:
                    self.bodies.pop(content_id, None)
                    self.records.pop(content_id, None)
                pending += core.views_persisted(effect.ticket)
            elif isinstance(effect, BumpGeneration):
                self.generation += 1
            elif isinstance(effect, StartWorker):
                if self.fail_starts:
                    pending += core.worker_start_failed(effect.slot, "OSError: no fork", now)
                elif self.start_workers:
                    endpoints = (f"tcp://127.0.0.1:{9000 + effect.slot}", "ipc:///nowhere")
                    pending += core.worker_started(effect.slot, 100 + effect.slot, endpoints, now)
            elif isinstance(effect, KillWorker | StopWorker):
                pending += core.worker_exited(effect.slot, now)
            elif isinstance(effect, Log):
                self.logs.append(effect.message)
            elif isinstance(effect, Stop):
                self.stopped = True
                self.stopped_failed = self.stopped_failed or effect.failed
        return sent


# -- the history every fuzz input starts from ------------------------------------------


def history() -> list[Any]:
    """Requests that leave a node with versions, a set, a rollback and a tombstone."""
    return [
        publish(sample, 1),
        publish(sample, 2, timeout=5.0, content_id="sample-v2"),  # version 2
        _wire.PublishSet(3, "kit", [publish(m1, 0), publish(m2, 0)]),
        publish(gone, 4),
        _wire.Vaporize(5, "gone"),
        _wire.Rollback(6, "sample", 1),
        publish(counting, 7),
    ]


_BASE: Disk | None = None


def base_disk() -> Disk:
    """A node's store after ``history()``: built once per process, copied per input."""
    global _BASE
    if _BASE is None:
        disk = Disk()
        core = disk.core()
        for request in history():
            disk.run(
                core,
                core.receive(
                    b"seed", encode(request), role="deploy", now=0.0, wall=1000.0, readings=dict
                ),
            )
        _BASE = disk
    return _BASE.copy()


def encode(message: Any) -> bytes:
    return _wire.encoder.encode(message)


# -- a worker in this process -----------------------------------------------------------


def build_worker(directory: Path) -> Worker:
    """A Worker whose store (under ``directory``) holds ``history()``; no sockets, no timer.

    Its timer is a no-op: arming ITIMER_REAL here would send SIGALRM to the fuzzer.
    """
    disk = base_disk()
    data_dir = directory / "data"
    store = RegistryStore(data_dir / "registry")
    try:
        store.commit_changes(
            disk.changes.values(),
            {cid: (disk.records[cid], body) for cid, body in disk.bodies.items()},
        )
        store.commit_views(disk.views)
    finally:
        store.close()
    run_dir = directory / "run"
    slots = SharedSlots(run_dir / "slots", create=True)
    slots.close()
    worker = Worker(data_dir, 0, 30.0, MAX_MESSAGE_BYTES, run_dir=run_dir)
    worker.arm = _no_timer  # type: ignore[assignment]
    return worker


def _no_timer(which: int, seconds: float, interval: float = 0.0) -> tuple[float, float]:
    return (0.0, 0.0)


# -- real frames ------------------------------------------------------------------------


def _spec(fn: Callable[..., Any]) -> Any:
    return build_call_spec(fn.__name__, signature_of(fn))


def calls() -> list[bytes]:
    """Call frames as a client encodes them: valid, pinned, stale, refused, failing."""
    spec = _spec(sample)
    sig = spec.signature_id
    args = [
        spec.encode_arguments((1,), {}),
        spec.encode_arguments((2, "bb", [1.5, 2.5], {"k": 3}, Point(1.0, 2.0), 4, 5), {"o": "v"}),
        spec.encode_arguments((13,), {}),  # the function raises
        spec.encode_arguments((7,), {}),  # its result does not match its annotation
        msgspec.msgpack.encode({"a": "not an int"}),
        msgspec.msgpack.encode({"zzz": 1}),
        msgspec.msgpack.encode({"a": 1, "p": {"x": "no"}}),
        msgspec.msgpack.encode([1, 2]),
    ]
    frames = [
        encode(_wire.Call(i, "sample", 0, 1, sig, 0.0, msgspec.Raw(a)))
        for i, a in enumerate(args, 1)
    ]
    raw = msgspec.Raw(args[0])
    frames += [
        encode(_wire.Call(20, "sample", 2, 2, "", 1.5, raw)),  # pinned, no signature check
        encode(_wire.Call(21, "sample", 9, 1, sig, 0.0, raw)),  # no such version
        encode(_wire.Call(22, "sample", 0, 1, "stale-signature", 0.0, raw)),
        encode(_wire.Call(23, "nothing", 0, 1, "", 0.0, raw)),
        encode(_wire.Call(24, "gone", 0, 1, "", 0.0, msgspec.Raw(b"\x80"))),  # vaporized
        encode(_wire.Call(25, "kit", 0, 1, "", 0.0, msgspec.Raw(b"\x80"))),  # a set
        encode(
            _wire.Call(26, "m1", 0, 1, "", -1.0, msgspec.Raw(msgspec.msgpack.encode({"x": 2.0})))
        ),
        encode(
            _wire.Call(
                27, "m2", 0, 1, "", 0.0, msgspec.Raw(msgspec.msgpack.encode({"s": "a", "n": 3}))
            )
        ),
    ]
    return frames


def stream_frames() -> list[bytes]:
    """A generator's calls (ended, raising, a wrong item, endless past the window) and
    the credit and cancellations a caller sends."""
    spec = _spec(counting)

    def call(call_id: int, n: int) -> bytes:
        args = msgspec.Raw(spec.encode_arguments((n,), {}))
        return encode(_wire.Call(call_id, "counting", 0, 1, spec.signature_id, 0.0, args))

    return [
        call(30, 3),
        call(31, 13),
        call(32, 7),
        call(33, 50),
        encode(_wire.More(33, 4)),
        encode(_wire.More(33, 1 << 20)),
        encode(_wire.Cancel(33)),
        encode(_wire.Cancel(99)),  # no such stream: ignored, no reply
    ]


def control_requests() -> list[bytes]:
    return [
        encode(m)
        for m in [
            _wire.Hello(1),
            publish(sample, 2, doc="another doc"),
            _wire.Rollback(3, "sample"),
            _wire.Rollback(4, "kit", 1),
            _wire.Vaporize(5, "kit"),
            _wire.Describe(6, "sample", 1, True),
            _wire.ListVersions(7, "sample"),
            _wire.ListFunctions(8),
            _wire.Lease(9),
            _wire.Release(10, 1),
            _wire.Status(11),
            _wire.Shutdown(12),
            _wire.PublishSet(13, "kit", [publish(m1, 0)]),
            _wire.CurrentVersion(14, "kit"),
            publish(m1, 15),  # a member of a set, published alone: refused
            publish(gone, 16),  # back after vaporize: numbering continues
            # Read your writes: a clock the node holds, and one naming a stranger's changes
            _wire.Describe(17, "sample", clock=VectorClock({"n1.1.aaaaaa": 1})),
            _wire.ListVersions(18, "sample", clock=VectorClock({"stranger.1.x": 2})),
            _wire.CatchUp(19, VectorClock({"n1.1.aaaaaa": 1, "stranger.1.x": 1}), 0.5),
        ]
    ]


def replies() -> list[bytes]:
    return [
        encode(m)
        for m in [
            _wire.Welcome(1, "n1", 2, "tcp://127.0.0.1:1"),
            _wire.Published(2, "sample", 3, "c" * 32, False),
            _wire.Moved(3, "sample", 1),
            _wire.Description(4, "sample", 1, 1, "c" * 32, b"sig", "(a: int)", "s" * 16, 30.0),
            _wire.Listing(5, [{"name": "sample", "version": 1}]),
            _wire.Leased(6, 1, "tcp://127.0.0.1:2", "ipc:///x"),
            _wire.Done(7),
            _wire.NodeStatus(8, "n1", "tcp://x:1", 1, "/d", 0.0, 1, 2, 3, 0, 1, "3.11", "0"),
            _wire.Failure(9, "validation", "bad", parameter="a", path="$.a"),
            _wire.Result(10, 1, msgspec.Raw(msgspec.msgpack.encode({"a": 1.0}))),
            _wire.Result(11, 1, msgspec.Raw(b"\x01"), [(1, "(f pid=1) hi\n")]),
            _wire.Yielded(12, msgspec.Raw(b"\x02"), [(2, "(f pid=1) oops\n")]),
            _wire.Failure(13, "remote", "x", "ValueError", "tb", remote_args=b"\x91\xa1x"),
            _wire.Published(14, "sample", 3, "c" * 32, False, VectorClock({"n1.1.a": 4})),
            _wire.CaughtUp(15, VectorClock({"n1.1.a": 4, "n2.1.b": 1})),
        ]
    ]


def changes() -> tuple[list[Change], list[Change]]:
    """(the base history's changes, changes a second node made concurrently)."""
    disk = base_disk()
    base = sorted(disk.changes.values(), key=lambda c: c.change_id)
    other = Registry.from_changes("n2.1.bbbbbb", base[:2])  # both versions of sample
    now = 2000.0
    made = [
        other.publish([_record("sample", "n2")], now=now),
        other.publish([_record("kit", "n2")], now=now),  # a function where n1 has a set
        other.rollback("sample", 1, now=now),
        other.publish([_record("x", "n2"), _record("y", "n2")], now=now, set_name="pair"),
        other.publish([_record("z", "n2")], now=now),
        other.vaporize("z", now=now),
    ]
    return base, [c for c in made if c is not None]


def _record(name: str, origin: str) -> VersionRecord:
    return VersionRecord(
        content_id=f"{name}-{origin}".ljust(32, "0"),
        name=name,
        signature_text="()",
        signature_id="s" * 16,
        origin=origin,
        python="3.11.7",
        created_at=1.0,
        code_id=f"code-{name}-{origin}",
    )


# -- seeds in the harness's input format ------------------------------------------------


def frame(payload: bytes) -> bytes:
    return struct.pack(">H", min(len(payload), 0xFFFF)) + payload[:0xFFFF]


def seed(target: str, flags: int, payloads: Iterable[bytes]) -> bytes:
    return bytes([TARGETS.index(target), flags]) + b"".join(frame(p) for p in payloads)


def pool_scripts() -> list[bytes]:
    """Event scripts for the pool target (opcodes in fuzz.py's ``run_pool``)."""
    return [
        bytes([2, 8, 0, 0, 1, 0, 6, 0, 6, 1, 6, 2, 1, 0, 4, 50, 7, 1, 4, 200]),
        bytes([1, 3, 0, 2, 0, 6, 0, 6, 1, 2, 0, 4, 10, 1, 0, 3, 0, 4, 255, 6, 3]),
        bytes([0, 1, 6, 0, 6, 1, 2, 0, 4, 1, 4, 255, 1, 0, 5, 0, 4, 100, 4, 255, 7, 1]),
    ]


def seeds() -> list[bytes]:
    """One input per real frame, per target, and a few multi-frame conversations."""
    base, other = changes()
    change_frames = [encode(c) for c in base + other]
    batches = [encode(base), encode(other), encode(base + other), encode(list(reversed(other)))]
    structs = [
        encode(VectorClock({"n1": 3, "n2": 1})),
        *(encode(view) for view in base_disk().views.values()),
        *(encode(r) for r in itertools.islice(base_disk().records.values(), 2)),
    ]
    everything = (
        control_requests()
        + calls()
        + stream_frames()
        + replies()
        + change_frames
        + batches
        + structs
    )
    out = [seed("decode", 0, [p]) for p in everything]
    requests = control_requests()
    for flags in range(4):  # the role lives in the flags byte's low bits
        out += [seed("node", flags, [p]) for p in requests]
    out += [
        seed("node", 0, requests[1:4] + requests[5:8]),
        seed("node", 0, [requests[8], requests[8], requests[9], requests[8]]),
        seed("node", 4, requests[:3]),  # persist fails
        seed("node", 8, [requests[8], requests[8]]),  # worker starts fail
    ]
    out += [seed("worker", 0, [c]) for c in calls()]
    out += [seed("worker", 1, calls()[:4])]  # the generation moves between frames
    streams = stream_frames()
    out += [seed("worker", 0, [frame]) for frame in streams[:4]]
    out += [seed("worker", 0, streams[3:])]  # credit, then cancelled
    out += [seed("worker", 0, [streams[3], calls()[0], streams[4], streams[0]])]
    out += [seed("registry", 0, [b]) for b in batches]
    out += [seed("registry", 1, [encode(c) for c in other])]
    out += [bytes([TARGETS.index("pool")]) + s for s in pool_scripts()]
    return out


def write_corpus(directory: Path, target: str | None = None) -> int:
    """Write the seeds (of ``target``, or all) into ``directory``; how many."""
    directory.mkdir(parents=True, exist_ok=True)
    import hashlib

    items = [s for s in seeds() if target is None or TARGETS[s[0] % len(TARGETS)] == target]
    for data in items:
        (directory / f"seed-{hashlib.sha1(data).hexdigest()[:16]}").write_bytes(data)
    return len(items)
