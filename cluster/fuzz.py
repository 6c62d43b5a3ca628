"""Fuzz everything a peer's bytes reach: decoders, the node core, a worker, registry, pool.

    nox -s fuzz -- --inputs 1000000        # or --seconds 600; --target worker; --engine random
    python -m cluster.fuzz --reproduce .fuzz/crashes/pool-crash-...   # one input, traceback

Coverage-guided with atheris (libFuzzer) over Scatter's own code, seeded with real frames
(``fuzz_corpus.py``). Each target runs in a libFuzzer process of its own, with its own
corpus (``.fuzz/corpus/<target>``) and an equal share of ``--inputs`` (or of
``--seconds``), ``--workers`` processes at a time (2 by default; dearest target first);
the closing note sums the inputs they ran and measures the coverage of every target's
corpus in one process. A finding in any target stops them all. One input is a target
byte (which a target's own process ignores), then what that target reads:

* ``decode``: the bytes, to every decoder a peer's frame or change meets. Only
  ``_wire.DECODE_ERRORS`` may escape; what decodes must encode and decode back the same.
* ``node``: a flags byte (role, failing writes or worker starts, a restart at the end) and
  length-prefixed control frames, to a fresh ``NodeCore`` holding a real history; its
  effects are performed as the driver does (``fuzz_corpus.Disk``). Every reply decodes,
  every request is answered once, no ``internal`` failure, the workers' views and the
  stored bodies match the registry after every frame, a restart changes nothing.
* ``worker``: a flags byte and Call frames (and a stream's More and Cancel), to
  ``Worker.handle`` on an in-process worker whose store holds the same history. Nothing
  escapes, every reply decodes, answers the call's id, and is never ``internal`` (an
  unexpected exception caught); only More and Cancel go unanswered; a generator's stream
  is stepped as the serve loop would, each frame decodes and carries its call's id, and
  it ends once cancelled.
* ``registry``: a flags byte and frames decoded as changes (one or a batch) and applied
  with ``Registry.apply_many``. Only ``ProtocolError`` may escape, and then nothing
  changed; the names ``apply`` reports cover every name whose lookup moved; the same set
  of changes applied in another order gives the same state (rule 3).
* ``pool``: a script of driver events for ``PoolCore`` (starts, failures, exits, ticks,
  leases, releases): every lease answered at most once, none waits with no start under
  way, never more than ``max_workers``, a granted worker is live.

Each input is bounded in time (libFuzzer's ``-timeout``, and a finding past
``SECONDS_PER_INPUT``) and memory (``RLIMIT_AS`` on the fuzzing process, and a finding
when one input raises the peak RSS by more than ``RSS_PER_INPUT``, or, in the test suite,
its tracemalloc peak passes ``TRACED_PER_INPUT``). A finding is an exception: libFuzzer
saves the input as ``.fuzz/crashes/<target>-crash-...`` and stops.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import re
import resource
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from cluster import fuzz_corpus as corpus
from scatter import _wire
from scatter._config import NodeConfig
from scatter._core._pool import (
    KillWorker,
    LeaseGranted,
    LeaseRefused,
    PoolCore,
    StartWorker,
    StopWorker,
)
from scatter._core._registry import (
    Change,
    FunctionView,
    Registry,
    VersionRecord,
    change_batch_decoder,
    change_decoder,
)
from scatter._core._vclock import VectorClock
from scatter._exceptions import FunctionNotFound, ProtocolError, VersionNotFound
from scatter._node._store import NodeIdentity
from scatter._node._worker import Stream, Worker

TARGETS = corpus.TARGETS
# A slower input is a finding: CPU seconds of this process, so that a fuzzer starved by a
# busy machine (nice 19 under a load of 9 took 5.1 s of wall time on an input that needs
# 0.3) reports no false hang; one that blocks is libFuzzer's -timeout's (20 s of wall time).
SECONDS_PER_INPUT = 5.0
RSS_PER_INPUT = 256 << 20  # one input may not raise the process's peak RSS by more
TRACED_PER_INPUT = 64 << 20  # nor, when traced, allocate more Python memory at once
ADDRESS_SPACE = 6 << 30  # RLIMIT_AS of the fuzzing process: allocation past it fails
MAX_INPUT_BYTES = 64 * 1024  # libFuzzer's -max_len: frames of real size, Publish included

POOL_SCRIPT_BYTES = 1024  # 512 events: longer scripts cost time and find nothing new
ROLES = ("deploy", "call", "", "admin")  # the node's two roles, none, and a made-up one


class Finding(AssertionError):
    """An oracle broke: a bug, whatever the input."""


# -- inputs ---------------------------------------------------------------------------


def frames(data: bytes) -> list[bytes]:
    """Length-prefixed frames (2 bytes, big-endian); the last one takes what is left."""
    out: list[bytes] = []
    position = 0
    while position < len(data):
        if position + 2 > len(data):
            out.append(data[position:])
            break
        (size,) = struct.unpack_from(">H", data, position)
        position += 2
        out.append(data[position : position + size])
        position += size
    return out


# -- the harness ------------------------------------------------------------------------


DECODERS: list[tuple[str, msgspec.msgpack.Decoder[Any]]] = [
    ("control request", _wire.control_request_decoder),
    ("control reply", _wire.control_reply_decoder),
    ("call", _wire.call_decoder),
    ("worker reply", _wire.worker_reply_decoder),
    ("change", change_decoder),
    ("change batch", change_batch_decoder),
    ("view", msgspec.msgpack.Decoder(FunctionView)),
    ("record", msgspec.msgpack.Decoder(VersionRecord)),
    ("clock", msgspec.msgpack.Decoder(VectorClock)),
    ("identity", msgspec.msgpack.Decoder(NodeIdentity)),
]


def _step_streams(worker: Worker) -> None:
    """Send the open streams' items as the serve loop would, while they have credit."""
    for _ in range(4 * _wire.STREAM_WINDOW):
        stream = worker.next_stream()
        if stream is None:
            return
        frame, ended = worker.step(stream)
        try:
            reply = _wire.stream_reply_decoder.decode(frame)
        except _wire.DECODE_ERRORS as exc:
            raise Finding(f"the worker sent a stream frame that does not decode: {exc}") from exc
        if reply.id != stream.call_id:
            raise Finding(f"a frame of stream {stream.call_id} says {reply.id}")
        if isinstance(reply, _wire.Failure) and reply.kind == "internal":
            raise Finding(f"internal failure in a stream: {reply.message}")
        if isinstance(reply, _wire.Yielded) == ended:
            raise Finding(f"stream {stream.call_id}: an item that ends it, or an end that does not")
        if ended:
            del worker.streams[(stream.identity, stream.call_id)]


class Harness:
    """The five targets, and the per-input bounds. One per process: it holds a worker.

    Args:
        directory: where the worker's store and slots live (the caller removes it).
        traced: bound each input's Python allocations with tracemalloc (slower; the
            tests use it) instead of the process's peak RSS.
    """

    def __init__(self, directory: Path, *, traced: bool = False) -> None:
        self.directory = directory
        self.traced = traced
        self.base = corpus.base_disk()
        self.base_changes = list(self.base.changes.values())
        # read_wait 0: a read whose clock names changes this node lacks is answered at
        # once (saying so), never held for peers the fuzzer does not run, so "every
        # request is answered once" holds frame by frame. Holding is the simulator's
        # (tests/core/test_read_your_writes.py).
        self.config = NodeConfig(min_workers=1, max_workers=3, read_wait=0.0)
        # The registry target's starting state, to compare with (never changes).
        self.base_registry = _snapshot(Registry.from_changes("fz.1.aaaaaa", self.base_changes))
        self._worker: Any = None
        self.inputs = 0
        self.targets: dict[str, Callable[[bytes], None]] = {
            "decode": self.run_decode,
            "node": self.run_node,
            "worker": self.run_worker,
            "registry": self.run_registry,
            "pool": self.run_pool,
        }

    @property
    def worker(self) -> Any:
        if self._worker is None:
            self._worker = corpus.build_worker(self.directory)
        return self._worker

    def close(self) -> None:
        if self._worker is not None:
            self._worker.store.close()
            self._worker.slots.close()

    # -- one input, bounded --

    def check(self, data: bytes, target: str | None = None) -> None:
        """Run one input; raise whatever escapes, or a Finding past a bound."""
        if not data:
            return
        name = target or TARGETS[data[0] % len(TARGETS)]
        body = data[1:]
        self.inputs += 1
        if self.traced:  # this input's allocations only, not its caller's (hypothesis')
            tracemalloc.start()
        else:
            peak = _peak_rss()
        started = time.process_time()
        try:
            self.targets[name](body)
        except BaseException:
            if self.traced:
                tracemalloc.stop()
            raise
        elapsed = time.process_time() - started
        if elapsed > SECONDS_PER_INPUT:
            raise Finding(f"{name}: one input took {elapsed:.1f} s of CPU")
        if self.traced:
            grown = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            if grown > TRACED_PER_INPUT:
                raise Finding(f"{name}: one input of {len(data)} bytes allocated {grown >> 20} MiB")
        elif self.inputs > 10:  # the first inputs load bodies, build decoders, ...
            grown = _peak_rss() - peak
            if grown > RSS_PER_INPUT:
                raise Finding(f"{name}: one input raised the peak RSS by {grown >> 20} MiB")

    # -- decode --

    def run_decode(self, data: bytes) -> None:
        for what, decoder in DECODERS:
            try:
                value = decoder.decode(data)
            except _wire.DECODE_ERRORS:
                continue
            encoded = _wire.encoder.encode(value)
            try:
                again = decoder.decode(encoded)
            except _wire.DECODE_ERRORS as exc:
                raise Finding(f"a decoded {what} does not decode once encoded: {exc}") from exc
            if _wire.encoder.encode(again) != encoded:
                raise Finding(f"a decoded {what} changes when encoded and decoded again")

    # -- node --

    def run_node(self, data: bytes) -> None:
        flags = data[0] if data else 0
        disk = self.base.copy()
        disk.fail_persist = bool(flags & 4)
        disk.fail_starts = bool(flags & 8)
        disk.start_workers = not flags & 16
        core = disk.core(self.config)
        registry = core.registry
        # What the views check reads changes only when something is stored or the core
        # uses its registry (core.registry is its only way to it). Most frames of a long
        # input (leases, releases, undecodable bytes) do neither, and checking the whole
        # state again after each was 64% of such an input's time: those skip the check.
        watched = core.registry = _Watched(registry)  # type: ignore[assignment]
        stores = -1  # the first frame checks what start() left
        logs = 0
        answers_expected = disk.start_workers or disk.fail_starts
        sent_total = 0
        now = 1.0
        for index, payload in enumerate(frames(data[1:])):
            role = ROLES[(flags + (index if flags & 32 else 0)) & 3]
            peer = bytes([65 + index % 3])
            now += 0.25
            effects = core.receive(
                peer, payload, role=role, now=now, wall=1000 + now, readings=dict
            )
            sent = disk.run(core, effects, now)
            for reply_bytes in sent:
                try:
                    reply = _wire.control_reply_decoder.decode(reply_bytes)
                except _wire.DECODE_ERRORS as exc:
                    raise Finding(f"the node sent a reply that does not decode: {exc}") from exc
                if isinstance(reply, _wire.Failure) and reply.kind == "internal":
                    legit = ("could not store the change", "worker process")
                    if not any(words in reply.message for words in legit):
                        raise Finding(f"internal failure: {reply.message}")
            internal = [log for log in disk.logs[logs:] if log.startswith("internal error")]
            if internal:
                raise Finding(f"the core logged {internal[0]!r}")
            logs = len(disk.logs)
            sent_total += len(sent)
            if answers_expected and sent_total != index + 1:
                raise Finding(f"{index + 1} requests got {sent_total} replies")
            if disk.stopped:
                break
            if watched.used or disk.stores != stores:
                _check_views(registry, disk)
                watched.used, stores = False, disk.stores
        core.registry = registry
        if flags & 64 and not disk.stopped_failed:
            _check_restart(core, disk, self.config)

    # -- worker --

    def run_worker(self, data: bytes) -> None:
        worker = self.worker
        flags = data[0] if data else 0
        for payload in frames(data[1:]):
            if flags & 1:
                worker.slots.bump_generation()
            reply_bytes = worker.handle(payload)
            if reply_bytes is None:  # only a stream's More or Cancel goes unanswered
                try:
                    _wire.stream_control_decoder.decode(payload)
                except _wire.DECODE_ERRORS as exc:
                    raise Finding("the worker did not answer a frame") from exc
                _step_streams(worker)
                continue
            if isinstance(reply_bytes, Stream):
                worker.streams[(worker.identity, reply_bytes.call_id)] = reply_bytes
                _step_streams(worker)
                continue
            try:
                reply = _wire.worker_reply_decoder.decode(reply_bytes)
            except _wire.DECODE_ERRORS as exc:
                raise Finding(f"the worker sent a reply that does not decode: {exc}") from exc
            if isinstance(reply, _wire.Failure) and reply.kind == "internal":
                raise Finding(f"internal failure: {reply.message}")
            try:
                call_id = _wire.call_decoder.decode(payload).id
            except _wire.DECODE_ERRORS:
                call_id = 0
            if reply.id != call_id:
                raise Finding(f"the reply to call {call_id} says {reply.id}")
        for stream in worker.streams.values():  # the caller went away: cancelled
            stream.cancelled = True
        _step_streams(worker)
        if worker.streams:
            raise Finding("a cancelled stream did not end")

    # -- registry --

    def run_registry(self, data: bytes) -> None:
        registry = Registry.from_changes("fz.1.aaaaaa", self.base_changes)
        accepted: list[Change] = []
        # Only apply_many changes the registry: one batch's state after is the next one's
        # before, and the first one's is the history's (taken once).
        before = self.base_registry
        for payload in frames(data[1:]):
            batch = _changes(payload)
            if batch is None:
                continue
            try:
                moved = registry.apply_many(batch)
            except ProtocolError:
                if _snapshot(registry) != before:
                    raise Finding("a refused batch changed the registry") from None
                continue
            after = _snapshot(registry)
            changed = {
                name
                for name in before["names"].keys() | after["names"].keys()
                if before["names"].get(name) != after["names"].get(name)
            }
            if not changed <= moved:
                raise Finding(f"apply moved {sorted(changed - moved)} without saying so")
            before = after
            accepted += batch
        if not accepted:
            return
        held: dict[str, Change] = {}
        for change in self.base_changes + accepted:
            held.setdefault(change.change_id, change)  # the first one held wins
        ordered = list(held.values())
        if data[:1] and data[0] & 1:
            random.Random(len(data)).shuffle(ordered)
        else:
            ordered.reverse()
        replayed = Registry.from_changes("fz.2.bbbbbb", ordered)
        if _snapshot(replayed) != before:  # the registry's state now
            raise Finding("the same changes in another order give another state (rule 3)")

    # -- pool --

    def run_pool(self, data: bytes) -> None:
        if len(data) < 2:
            return
        minimum = data[0] % 4
        maximum = minimum + data[1] % 5
        pool = PoolCore(min_workers=minimum, max_workers=maximum, kill_grace=1.0, idle_retire=5.0)
        model = _PoolModel(pool, maximum)
        now = 0.0
        model.take(pool.start(now))
        script = data[2 : 2 + POOL_SCRIPT_BYTES]
        for position in range(0, len(script) - 1, 2):
            op, arg = script[position] % 8, script[position + 1]
            if op == 0 and model.starting:
                slot = sorted(model.starting)[arg % len(model.starting)]
                model.starting.discard(slot)
                model.running[slot] = False
                endpoints = (f"tcp://w{slot}", f"ipc://w{slot}")
                model.take(pool.started(slot, 1000 + slot, endpoints, now))
            elif op == 1 and model.starting:
                slot = sorted(model.starting)[arg % len(model.starting)]
                model.starting.discard(slot)
                model.take(pool.start_failed(slot, "no fork", now))
            elif op == 2:
                slots = sorted(model.running)
                slot = slots[arg % len(slots)] if slots else arg % 8
                model.running.pop(slot, None)
                model.take(pool.exited(slot, now))
            elif op == 3:
                model.take(pool.tick(now, model.readings(arg, now)))
            elif op == 4:
                now += arg / 10
            elif op == 5:
                pool.observe(now, model.readings(arg, now))
            elif op == 6:
                model.asked.add(model.next_waiter)
                model.next_waiter += 1
                holder = model.next_waiter % 3  # three client connections
                model.take(pool.lease(model.next_waiter - 1, now, holder=holder))
            elif op == 7 and arg & 1:
                holder = arg // 2 % 3  # that connection closed
                model.dropped.update(w for w, h in pool._waiting if h == holder)
                pool.holder_gone(holder)
                if holder in pool._holders.values():
                    raise Finding(f"a lease of closed connection {holder} lives on")
            elif op == 7:
                pool.release(arg // 2)
            model.check()


class _PoolModel:
    """What the driver knows of the pool, and the pool's promises checked against it."""

    def __init__(self, pool: PoolCore, maximum: int) -> None:
        self.pool = pool
        self.maximum = maximum
        self.starting: set[int] = set()
        self.running: dict[int, bool] = {}  # {slot: killed}
        self.asked: set[int] = set()
        self.answered: set[int] = set()
        self.dropped: set[object] = set()  # waiting when their connection closed
        self.next_waiter = 0

    def take(self, effects: list[Any]) -> None:
        for effect in effects:
            if isinstance(effect, StartWorker):
                if effect.slot in self.starting or effect.slot in self.running:
                    raise Finding(f"start of slot {effect.slot}, which is in use")
                self.starting.add(effect.slot)
            elif isinstance(effect, KillWorker | StopWorker):
                if self.running.get(effect.slot) is not False:
                    raise Finding(f"{type(effect).__name__} of slot {effect.slot}, not live")
                self.running[effect.slot] = True
            elif isinstance(effect, LeaseGranted | LeaseRefused):
                waiter = effect.waiter
                if waiter not in self.asked or waiter in self.answered | self.dropped:
                    raise Finding(f"lease {waiter} answered twice, never asked, or after its connection closed")
                self.answered.add(waiter)  # type: ignore[arg-type]
                if isinstance(effect, LeaseGranted):
                    slot = int(effect.endpoints[0].removeprefix("tcp://w"))
                    if self.running.get(slot) is not False:
                        raise Finding(f"lease granted on slot {slot}, which is not live")

    def readings(self, arg: int, now: float) -> dict[int, tuple[int, float]]:
        deadline = now + (arg % 4 - 2) if arg & 4 else 0.0
        return {slot: (arg >> 3, deadline) for slot in self.running}

    def check(self) -> None:
        pool = self.pool
        # take() saw each answer go to an asked, unanswered waiter: counting is enough.
        if len(pool._waiting) + len(self.answered) + len(self.dropped) != len(self.asked):
            raise Finding("a lease was lost: neither answered nor waiting")
        leased = {lease for worker in pool._workers.values() for lease in worker.leases}
        if not set(pool._holders) <= leased:
            raise Finding("a holder is recorded for a lease no worker has")
        # A start serves one waiter; the others share the first worker up (started()), so
        # more may wait than starts are under way only while no worker is live.
        if pool._waiting and not pool._starting:
            raise Finding(f"{len(pool._waiting)} leases wait, and no worker is starting")
        live = any(not killed for killed in self.running.values())
        if live and len(pool._waiting) > len(pool._starting):
            raise Finding(f"{len(pool._waiting)} leases wait on {len(pool._starting)} starts")
        if pool._live() > max(self.maximum, pool.min_workers):
            raise Finding(f"{pool._live()} workers, above max_workers={self.maximum}")
        if set(pool._starting) != self.starting or set(pool._workers) != set(self.running):
            raise Finding("the pool's workers are not the ones the driver started")


# -- oracles' helpers ---------------------------------------------------------------------


def _changes(payload: bytes) -> list[Change] | None:
    for decoder in (change_batch_decoder, change_decoder):
        try:
            decoded = decoder.decode(payload)
        except _wire.DECODE_ERRORS:
            continue
        return decoded if isinstance(decoded, list) else [decoded]
    return None


def _lookup(call: Callable[[], Any]) -> Any:
    try:
        return call()
    except (FunctionNotFound, VersionNotFound) as exc:
        return f"{type(exc).__name__}: {exc}"


def _snapshot(registry: Registry) -> dict[str, Any]:
    """Everything a lookup can answer, for comparing two registries (or one, twice)."""
    names = sorted(registry.names())
    stats = registry.statistics()
    return {
        "names": {
            name: (
                registry.entry(name),
                _lookup(lambda name=name: registry.versions(name)),  # type: ignore[misc]
                _lookup(lambda name=name: registry.current_version(name)),  # type: ignore[misc]
            )
            for name in names
        },
        "functions": registry.functions(),
        "counts": (stats.functions, stats.sets, stats.versions, stats.tombstones, stats.changes),
        "pending": sorted(c.change_id for c in registry.pending()),
        "clock": registry.clock,
    }


class _Watched:
    """Stands in for a node core's registry, noting whether the core used it at all."""

    def __init__(self, registry: Registry) -> None:
        self._registry = registry
        self.used = True

    def __getattr__(self, name: str) -> Any:  # anything but the two attributes above
        self.used = True
        return getattr(self._registry, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("_registry", "used"):
            object.__setattr__(self, name, value)
        else:
            self.used = True
            setattr(self._registry, name, value)


def _check_views(registry: Registry, disk: corpus.Disk) -> None:
    names = set(registry.names())
    for name in names:
        if disk.views.get(name) != registry.entry(name):
            raise Finding(f"the workers' view of {name!r} is not the registry's")
    if not disk.views.keys() <= names:
        raise Finding(f"views of unknown names: {sorted(disk.views.keys() - names)}")
    live = registry.content_ids()
    if disk.bodies.keys() != live:
        missing, extra = live - disk.bodies.keys(), disk.bodies.keys() - live
        raise Finding(f"bodies missing {sorted(missing)} or kept unused {sorted(extra)}")


def _check_restart(core: Any, disk: corpus.Disk, config: NodeConfig) -> None:
    disk.fail_persist = False
    again = corpus.Disk(disk.changes, disk.views, disk.bodies, disk.records)
    restarted = again.core(config)
    if _snapshot(restarted.registry) != _snapshot(core.registry):
        raise Finding("a restart from the stored changes gives another registry")
    if again.writes:
        raise Finding("a restart had views or bodies to fix: the stored ones were stale")


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# -- mutations (the random engine, and the test suite's strategy) ------------------------

INTERESTING = bytes([0x00, 0x01, 0x7F, 0x80, 0x90, 0x91, 0x9F, 0xA0, 0xC0, 0xC1, 0xC2, 0xC3,
                     0xC4, 0xCA, 0xCB, 0xCC, 0xCF, 0xD3, 0xD9, 0xDB, 0xDC, 0xDD, 0xDE, 0xDF,
                     0xE0, 0xFF])  # fmt: skip


def mutate(data: bytes, rng: random.Random, others: list[bytes]) -> bytes:
    """A few random edits of ``data``, msgpack-aware enough to get past the headers."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 6)):
        kind = rng.randrange(7)
        position = rng.randrange(len(out) + 1)
        if kind == 0 and out:
            out[min(position, len(out) - 1)] ^= 1 << rng.randrange(8)
        elif kind == 1 and out:
            out[min(position, len(out) - 1)] = rng.choice(INTERESTING)
        elif kind == 2:
            out[position:position] = bytes(
                rng.choice(INTERESTING) for _ in range(rng.randint(1, 8))
            )
        elif kind == 3:
            del out[position : position + rng.randint(1, 16)]
        elif kind == 4 and others:
            other = rng.choice(others)
            start = rng.randrange(len(other) + 1)
            out[position:position] = other[start : start + rng.randint(1, 64)]
        elif kind == 5:
            out[position:position] = out[position : position + rng.randint(1, 32)] * rng.randint(
                2, 64
            )
        elif kind == 6 and out:
            out[min(position, len(out) - 1)] = rng.randrange(256)
    return bytes(out[:MAX_INPUT_BYTES])


# -- running it -----------------------------------------------------------------------------


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m cluster.fuzz", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--inputs", type=int, default=0, help="stop after this many in all (0: no limit)"
    )
    parser.add_argument(
        "--seconds", type=float, default=0, help="stop after this long (0: no limit)"
    )
    parser.add_argument("--target", choices=TARGETS, default=None, help="default: all of them")
    parser.add_argument("--engine", choices=("atheris", "random"), default="atheris")
    parser.add_argument(
        "--workers",
        type=int,
        default=min(2, os.cpu_count() or 1),
        help="fuzzing processes at once, one target each (default: 2, or 1 on one core)",
    )
    parser.add_argument("--corpus", type=Path, default=Path(".fuzz/corpus"))
    parser.add_argument("--crashes", type=Path, default=Path(".fuzz/crashes"))
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        help="libFuzzer's (target i gets SEED+i; default: its own pick), or the random "
        "engine's (default 1)",
    )
    parser.add_argument("--reproduce", type=Path, nargs="+", help="run these inputs once, and stop")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


@contextlib.contextmanager
def _harness(traced: bool = False) -> Iterator[Harness]:
    directory = Path(os.environ.get("SCATTER_FUZZ_DIR") or tempfile.mkdtemp(prefix="scatter-fuzz-"))
    harness = Harness(directory, traced=traced)
    try:
        yield harness
    finally:
        harness.close()
        if "SCATTER_FUZZ_DIR" not in os.environ:
            shutil.rmtree(directory, ignore_errors=True)


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))


def child_main(args: argparse.Namespace, libfuzzer: list[str]) -> None:
    """Inside the instrumented process: hand the harness to libFuzzer (never returns)."""
    import atheris  # type: ignore[import-not-found]

    _limit_memory()
    harness = Harness(Path(os.environ["SCATTER_FUZZ_DIR"]))
    target = args.target

    def one_input(data: bytes) -> None:
        try:
            harness.check(data, target)
        except SystemExit as exc:
            # atheris hands an escaping SystemExit to Python, which exits: libFuzzer then
            # says only "fuzz target exited", with no traceback and maybe another input.
            raise Finding(
                f"SystemExit({exc.code!r}) escaped the {target or 'chosen'} target"
            ) from exc

    atheris.Setup([sys.argv[0], *libfuzzer], one_input)
    atheris.Fuzz()


# The instrumented child: Scatter's modules are imported under atheris' import hook, so
# libFuzzer sees their branches (the harness itself and msgspec's C code are not).
_CHILD = """
import sys, atheris
with atheris.instrument_imports(include=["scatter"]):
    from cluster import fuzz
args = fuzz._arguments(sys.argv[1:sys.argv.index("--")])
fuzz.child_main(args, sys.argv[sys.argv.index("--") + 1:])
"""

_STATUS = re.compile(
    r"^#(\d+)\s+\w+\s+cov: (\d+) ft: (\d+) corp: (\d+)/\S+ .*exec/s: (\d+) rss: (\d+)Mb"
)
_FINDING = ("Test unit written to", "ERROR: libFuzzer", "Uncaught")
# Each target fuzzes in a libFuzzer process of its own, with an equal share of the inputs.
# One process for all five let libFuzzer's scheduling pick the target (200,000 inputs, seed
# 1): the pool 50% of the time (its long scripts keep adding hit-count features), node 22%,
# worker 16%, registry 9%, decode 3%; a pool input costs the most CPU (instrumented: pool
# 1.0 ms, node 0.49, registry 0.45, worker 0.08, decode 0.014), so 74% of the CPU went to
# the pool's 115 edges. Started dearest first, so that the last to end is a cheap one.
_DEAREST_FIRST = ("pool", "node", "registry", "worker", "decode")


@dataclass
class _Job:
    """One target's libFuzzer process, and what its stderr said."""

    target: str
    inputs: int  # its -runs (0: no limit)
    seconds: float  # its -max_total_time (0: no limit)
    process: subprocess.Popen[str] | None = None
    reader: threading.Thread | None = None
    scratch: str = ""
    status: tuple[str, ...] = ()  # the last status line (_STATUS)
    stats: dict[str, str] = field(default_factory=dict)  # its final stat:: lines
    crashed: list[str] = field(default_factory=list)
    tail: list[str] = field(default_factory=list)
    cpu: float = 0.0  # user + system seconds, once it has ended
    stopped: bool = False  # ended by us: another target's finding, or an interrupt

    @property
    def executed(self) -> int:
        """Inputs run: libFuzzer's own count at the end, its last status line before."""
        last = self.status[0] if self.status else 0
        return int(self.stats.get("number_of_executed_units", last))

    @property
    def failed(self) -> bool:
        assert self.process is not None
        return bool(self.crashed) or (self.process.returncode != 0 and not self.stopped)

    def read(self) -> None:
        assert self.process is not None and self.process.stderr is not None
        for line in self.process.stderr:
            self.tail = [*self.tail[-60:], line]
            match = _STATUS.match(line)
            if match:
                self.status = match.groups()
            elif line.startswith("stat::"):
                key, _, value = line.removeprefix("stat::").partition(":")
                self.stats[key] = value.strip()
            elif any(words in line for words in _FINDING):
                self.crashed.append(line.strip())
        self.process.stderr.close()

    def reap(self) -> bool:
        """Whether it has ended (then its stderr is read to the end and its CPU known)."""
        assert self.process is not None and self.reader is not None
        if self.process.returncode is not None:
            return True
        pid, status, usage = os.wait4(self.process.pid, os.WNOHANG)
        if pid == 0:
            return False
        self.process.returncode = os.waitstatus_to_exitcode(status)
        self.cpu = usage.ru_utime + usage.ru_stime
        self.reader.join()
        shutil.rmtree(self.scratch, ignore_errors=True)
        return True

    def stop(self) -> None:
        # SIGTERM: libFuzzer prints its final stats (the inputs it ran) and exits.
        assert self.process is not None
        self.stopped = True
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)


def _libfuzzer_options(args: argparse.Namespace, corpus_dir: Path) -> list[str]:
    return [
        str(corpus_dir),
        f"-max_len={MAX_INPUT_BYTES}",
        "-timeout=20",
        "-rss_limit_mb=4096",
        "-malloc_limit_mb=0",
        "-print_final_stats=1",
        "-reload=0",
    ]


def _spawn(job: _Job, options: list[str], *, target: str | None) -> None:
    job.scratch = tempfile.mkdtemp(prefix="scatter-fuzz-")
    chosen = ["--target", target] if target else []
    job.process = subprocess.Popen(
        [sys.executable, "-c", _CHILD, *chosen, "--child", "--", *options],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "SCATTER_FUZZ_DIR": job.scratch},
        # Its own session: a Ctrl-C reaches this process only, which stops every target
        # with SIGTERM (libFuzzer then reports its count), instead of a KeyboardInterrupt
        # inside an input that libFuzzer would report as a crash.
        start_new_session=True,
    )
    job.reader = threading.Thread(target=job.read, daemon=True)
    job.reader.start()


def _jobs(args: argparse.Namespace, slots: int) -> list[_Job]:
    targets = [args.target] if args.target else list(_DEAREST_FIRST)
    share, extra = divmod(args.inputs, len(targets))
    inputs = [share + (i < extra) for i in range(len(targets))]
    # With a time bound, every target gets the same time, and the slots end together.
    rounds = -(-len(targets) // slots)
    seconds = args.seconds / rounds if args.seconds else 0.0
    return [
        _Job(target, count, seconds)
        for target, count in zip(targets, inputs, strict=True)
        if count or not args.inputs  # --inputs 3: three targets get one each
    ]


def run_atheris(args: argparse.Namespace) -> int:
    """Every target in its own libFuzzer process, ``--workers`` at a time; a finding in
    any stops them all. Then one pass over every target's corpus measures the coverage."""
    args.crashes.mkdir(parents=True, exist_ok=True)
    bounded = bool(args.inputs or args.seconds)
    # Unbounded, every target must run at once, or those queued would never start.
    slots = max(1, args.workers) if bounded else len(TARGETS)
    jobs = _jobs(args, slots)
    seeds = 0
    for job in jobs:
        seeds += corpus.write_corpus(args.corpus / job.target, job.target)
    print(
        f"fuzz: {', '.join(job.target for job in jobs)}: {seeds} seeds in {args.corpus}/<target>, "
        f"{min(slots, len(jobs))} processes at once, crashes go to {args.crashes}/",
        flush=True,
    )
    started = time.monotonic()
    pending, running, ended = list(jobs), [], []
    finding: _Job | None = None
    interrupted = False
    printed = started
    previous_term = signal.signal(signal.SIGTERM, _interrupt)
    try:
        while pending or running:
            while pending and len(running) < slots and finding is None and not interrupted:
                job = pending.pop(0)
                options = _libfuzzer_options(args, args.corpus / job.target)
                options.append(f"-artifact_prefix={args.crashes}/{job.target}-")
                if job.inputs:
                    options.append(f"-runs={job.inputs}")
                if job.seconds:
                    options.append(f"-max_total_time={max(1, round(job.seconds))}")
                if args.seed is not None:
                    options.append(f"-seed={args.seed + TARGETS.index(job.target)}")
                if job.target == "pool":
                    # libFuzzer lengthens its inputs slowly from the longest seed (22 bytes
                    # here); the single process tried scripts up to POOL_SCRIPT_BYTES from the
                    # start (its limit began at the longest seed of any target), and their
                    # features (100k pool inputs: 870 against 796): try them from the start.
                    options.append("-len_control=0")
                if job.target == "decode":
                    # msgspec's C code gives no coverage, so libFuzzer would drop every seed
                    # and mutate an empty input: keep the real frames to mutate.
                    options.append("-keep_seed=1")
                _spawn(job, options, target=job.target)
                running.append(job)
            try:
                time.sleep(0.2)
            except KeyboardInterrupt:
                interrupted = True
                pending.clear()
                for job in running:
                    job.stop()
            for job in [job for job in running if job.reap()]:
                running.remove(job)
                ended.append(job)
                if job.failed and finding is None:
                    finding = job
                    pending.clear()
                    for other in running:
                        other.stop()
            if time.monotonic() - printed > 60:
                printed = time.monotonic()
                print(f"fuzz: {_progress(ended + running, started)}", flush=True)
    finally:
        signal.signal(signal.SIGTERM, previous_term)
        for job in running:  # only after an exception of our own
            job.stop()
            job.process.wait()  # type: ignore[union-attr]
    elapsed = time.monotonic() - started
    executed = sum(job.executed for job in ended)
    cpu = sum(job.cpu for job in ended)
    status = 1 if finding else 130 if interrupted else 0
    print(f"fuzz: done in {elapsed:.0f} s, exit status {status}")
    print(
        f"fuzz: {executed} inputs, {executed / max(elapsed, 1e-9):.0f} inputs/s overall, "
        f"{executed / max(cpu, 1e-9):.0f} per CPU second ({cpu:.0f} s of CPU in "
        f"{len(ended)} processes, {min(slots, len(jobs))} at once)",
        flush=True,
    )
    for job in ended:
        cov, ft, corp = job.status[1:4] if job.status else ("?", "?", "?")
        print(
            f"fuzz:   {job.target:<8} {job.executed:>10} inputs, "
            f"{job.executed / max(job.cpu, 1e-9):>6.0f}/CPU s, cov {cov} ft {ft}, corpus {corp}"
            + (" (stopped)" if job.stopped else "")
        )
    if finding is not None:
        assert finding.process is not None
        sys.stdout.write("".join(finding.tail))
        print(
            f"fuzz: FOUND A CRASH in the {finding.target} target (exit status "
            f"{finding.process.returncode}): {' | '.join(finding.crashed) or 'see above'}"
        )
        print(
            f"fuzz: reproduce with python -m cluster.fuzz --target {finding.target} "
            f"--reproduce {args.crashes}/{finding.target}-<the file named above>"
        )
        return 1
    if interrupted:
        return 130
    again = _coverage(args, [job.target for job in ended])
    if again.failed:  # an input that passed in its target's process fails when run again
        sys.stdout.write("".join(again.tail))
        print(f"fuzz: FOUND A CRASH running the corpora again: {' | '.join(again.crashed)}")
        return 1
    cov, ft, corp = again.status[1:4] if again.status else ("?", "?", "?")
    peak = max((int(job.stats.get("peak_rss_mb", 0)) for job in ended), default=0)
    print(
        f"fuzz: coverage: {cov} edges, {ft} features in Scatter's code; corpus {corp} "
        f"inputs (every target's, run again in one process); peak RSS {peak} MB"
    )
    return 0


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # SIGTERM to the launcher stops the targets as Ctrl-C does


def _coverage(args: argparse.Namespace, targets: list[str]) -> _Job:
    """Every target's corpus run again in one process: its INITED line gives the edges,
    features and inputs of them all together, the figure the single process gave."""
    merged = Path(tempfile.mkdtemp(prefix="scatter-fuzz-corpus-"))
    job = _Job("all", 0, 0.0)
    try:
        for target in targets:
            index = bytes([TARGETS.index(target)])
            for path in sorted((args.corpus / target).iterdir()):
                data = path.read_bytes()
                if data:  # a target's own process ignores the first byte: make it choose
                    (merged / f"{target}-{path.name}").write_bytes(index + data[1:])
        _spawn(job, [*_libfuzzer_options(args, merged), "-runs=0"], target=None)
        while not job.reap():
            time.sleep(0.1)
    finally:
        shutil.rmtree(merged, ignore_errors=True)
    return job


def _progress(jobs: list[_Job], started: float) -> str:
    elapsed = time.monotonic() - started
    total = sum(job.executed for job in jobs)
    each = ", ".join(
        f"{job.target} {job.executed}"
        + (f" cov {job.status[1]} ft {job.status[2]}" if job.status else "")
        for job in jobs
    )
    return f"{total:,} inputs in {elapsed:.0f} s ({total / max(elapsed, 1e-9):.0f}/s): {each}"


def run_random(args: argparse.Namespace) -> int:
    """Mutations of the seeds, no coverage feedback: where atheris cannot be installed."""
    seed = 1 if args.seed is None else args.seed
    rng = random.Random(seed)
    seeds = corpus.seeds()
    if args.target:
        seeds = [s for s in seeds if TARGETS[s[0] % len(TARGETS)] == args.target]
    _limit_memory()
    args.crashes.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    count = 0
    with _harness() as harness:
        while (not args.inputs or count < args.inputs) and (
            not args.seconds or time.monotonic() - started < args.seconds
        ):
            data = mutate(rng.choice(seeds), rng, seeds)
            count += 1
            try:
                harness.check(data, args.target)
            except Exception:
                path = args.crashes / f"crash-random-{seed}-{count}"
                path.write_bytes(data)
                print(f"fuzz: crash on input {count}, saved as {path}")
                raise
    elapsed = time.monotonic() - started
    print(f"fuzz: {count} inputs in {elapsed:.0f} s, {count / max(elapsed, 1e-9):.0f} inputs/s")
    print("fuzz: coverage: not measured by the random engine (no feedback)")
    return 0


def reproduce(paths: list[Path], target: str | None) -> int:
    with _harness() as harness:
        for path in paths:
            # A target's own process ignores an input's first byte and names the files it
            # saves after itself (pool-crash-...): the name says which target to run.
            named = path.name.partition("-")[0]
            chosen = target or (named if named in TARGETS else None)
            print(f"fuzz: {path}" + (f" (the {chosen} target)" if chosen else ""))
            harness.check(path.read_bytes(), chosen)
    print("fuzz: no crash")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _arguments(argv)
    if args.reproduce:
        return reproduce(args.reproduce, args.target)
    if args.engine == "random":
        return run_random(args)
    try:
        import atheris  # type: ignore[import-not-found]  # noqa: F401
    except ImportError:
        print("fuzz: atheris is not installed (nox -s fuzz installs it); use --engine random")
        return 2
    return run_atheris(args)


if __name__ == "__main__":
    sys.exit(main())
