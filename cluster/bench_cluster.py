"""A Scatter cluster, measured: propagation, failure detection, idle anti-entropy bytes, restart.

    python cluster/bench_cluster.py                 # about 3 minutes, most of it detection
    nox -s bench-cluster                            # the same, in a fresh virtualenv
    python cluster/bench_cluster.py --trials 3 --updates 20     # a short look
    python cluster/bench_cluster.py --only-restart              # restart time, ~40 s
    python cluster/bench_cluster.py --only propagation,digest   # any of the four

Every node is a real ``python -m scatter._node`` process on a free 127.0.0.1 port
(``cluster.launch.LocalCluster``: node i joins through node i - 1), stopped by its PID
at the end, whatever happens. The run uses a fresh ``XDG_DATA_HOME`` (the secret the
nodes and clients share is made there), never the user's own.

1. Propagation (5 nodes, ``local`` membership profile). A client on node 1 publishes
   ``--updates`` new versions of one function (each a distinct body returning its own
   number), one after another, each once the one before is visible everywhere. One
   thread per node, each with its own client, is released when ``publish`` returns and
   polls ``current_version(name)`` (a sleep of ``POLL_INTERVAL_S`` between looks) until
   its node shows the new version; node 5's thread then calls the function once and
   checks that the new body answered. An update's latency is the time from
   ``publish`` returning to the last of these (every node showing it, node 5 running it),
   each timed when its reply arrived: an upper bound, by up to one poll's round trip.
   Version 1 (creating the function) and the first call on node 5 (a worker lease) are
   warm-up, not counted.
2. Failure detection (5 nodes, ``lan`` profile: memberlist's LAN timers). A trial
   SIGSTOPs one node (``LocalNode.pause``; the victims take turns), then reads every
   other node's ``members()`` every ``DETECTION_POLL_S``; the trial's time runs from the
   SIGSTOP until the last of them shows the victim ``dead``. Then SIGCONT, and the next
   trial starts once every node shows all five alive; if that takes more than 30 s the
   cluster is replaced by a fresh one. ``--trials`` trials (default 20), fewer if
   ``--detection-budget`` seconds (default 240) run out first: the report says how many.
3. Idle anti-entropy bytes. Every anti-entropy interval a node sends one random member
   a ``PeerDigest``: its registry clock, one counter per writer (a node's id and start).
   After the propagation run on the same 5-node cluster, every node publishes functions
   until the registry holds 10 (so each of the 5 members is a writer: 5 clock entries),
   then node 1 publishes one ``FunctionSet`` to reach ``--large-registry`` (default
   10,000). At each size, once every node has applied every change, node 5 is stopped
   (SIGTERM), its registry is rebuilt from its store (``RegistryStore`` +
   ``Registry.from_changes``, as the node does at start), the frame it would send is
   encoded with ``scatter._wire.encoder`` (``PeerDigest(node id, address, clock)``), and
   node 5 is started again. Reported: the frame's bytes (the payload; zmq and CURVE
   framing not included), per member, against the target of 40 bytes x members.

4. Restart. One node's history is built through its client: 1,000 functions published
   twice, then rollbacks alternating each between its two versions, up to
   ``--restart-changes`` changes (default 10,000). The node is then started from its data
   directory three times, each time timed to its ready line and to its first answered
   call, alternating with an empty node (one function) as the same minute's baseline;
   medians, and the node's RSS after the call. ``--only-restart`` runs this alone.

The run goes 4, then 1, 3 (both on one ``local`` cluster), then 2 (a ``lan`` cluster of
its own).
Percentiles are nearest-rank: p50 of 100 samples is the 50th smallest, p99 the 99th;
with 20 samples p99 is the largest. Targets are reported as PASS/FAIL lines, never
asserted: a missed target still exits 0; a measurement that could not run exits 1.
Results go to ``--output`` (default ``bench-results-cluster.json``), samples included.
See ``cluster/MEASURING.md``.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import linecache
import math
import os
import platform
import queue
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

if __package__:
    from .launch import LocalCluster, LocalNode
else:  # run as a script: this file's folder is sys.path[0]
    from launch import LocalCluster, LocalNode

from scatter._limits import MAX_SET_MEMBERS

HERE = Path(__file__).resolve().parent
NODES = 5

POLL_INTERVAL_S = 0.0005  # between two looks at a node's current version
VISIBLE_TIMEOUT_S = 10.0  # an update not everywhere by then fails the measurement
PROPAGATION_P50_MS = 10.0
PROPAGATION_P99_MS = 50.0

DETECTION_POLL_S = 0.05
DETECTION_TIMEOUT_S = 60.0  # a victim not declared dead by then: the trial is lost
RECOVERY_TIMEOUT_S = 30.0  # not alive everywhere again by then: a fresh cluster
DETECTION_P99_S = 6.0

SMALL_REGISTRY = 10
MEASUREMENTS = ("restart", "propagation", "digest", "detection")  # in the order they run
DIGEST_BYTES_PER_MEMBER = 40
CONVERGE_TIMEOUT_S = 180.0  # every node applying a large set of changes

RESTART_FUNCTIONS = 1000
RESTART_SERVING_S = 2.0
RESTART_TRIALS = 3

console = Console(highlight=False, width=None if sys.stdout.isatty() else 120)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile: the ceil(q * n)-th smallest value."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def fresh_function(name: str, number: int) -> Callable[..., Any]:
    """``def name() -> int: return number``, a body of its own, with findable source."""
    source = f"def {name}() -> int:\n    return {number}\n"
    filename = f"<scatter-bench-cluster {name} {number}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    # A module name that is not importable: cloudpickle ships the function by value.
    namespace: dict[str, Any] = {"__name__": "scatter_bench_cluster_generated"}
    exec(compile(source, filename, "exec"), namespace)
    return namespace[name]  # type: ignore[no-any-return]


def client_of(node: LocalNode) -> Any:
    import scatter

    return scatter.Client(node.address, autostart=False)


class Bench:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.started = time.monotonic()
        self.errors: dict[str, str] = {}

    def say(self, text: str) -> None:
        console.print(f"{time.monotonic() - self.started:6.1f} s  {escape(text)}")

    def fail(self, what: str) -> None:
        detail = traceback.format_exc()
        self.errors[what] = detail
        console.print(f"[bold red]{what} FAILED[/]:\n{escape(detail)}")


# -- 1. propagation ----------------------------------------------------------------------


class Watcher(threading.Thread):
    """Polls one node for the version it is told to expect; optionally calls it then."""

    def __init__(self, node: LocalNode, name: str, *, call: bool) -> None:
        super().__init__(name=f"watch {node.address}", daemon=True)
        self.node = node
        self.function = name
        self.call = call
        self.expect: queue.Queue[tuple[int, float] | None] = queue.Queue()
        # (version, seconds after publish returned until visible, ... until it answered)
        self.seen: queue.Queue[tuple[int, float, float | None] | BaseException] = queue.Queue()
        self.stale_calls = 0  # calls that still ran an older version once it was visible
        self.ready = threading.Event()  # connected, and node 5's worker leased (warm-up)

    def run(self) -> None:
        try:
            with client_of(self.node) as client:
                remote = client.make_callable(self.function) if self.call else None
                client.current_version(self.function)
                if remote is not None:
                    remote()  # the first call leases a worker: warm-up, not measured
                self.ready.set()
                while (job := self.expect.get()) is not None:
                    version, returned = job
                    while client.current_version(self.function) < version:
                        time.sleep(POLL_INTERVAL_S)
                    visible = time.perf_counter() - returned
                    answered = None
                    if remote is not None:
                        while remote() != version:
                            self.stale_calls += 1
                            time.sleep(POLL_INTERVAL_S)
                        answered = time.perf_counter() - returned
                    self.seen.put((version, visible, answered))
        except BaseException as exc:
            self.seen.put(exc)

    def result(self, version: int) -> tuple[float, float | None]:
        try:
            found = self.seen.get(timeout=VISIBLE_TIMEOUT_S)
        except queue.Empty:
            raise TimeoutError(
                f"{self.node.address} did not show version {version} in {VISIBLE_TIMEOUT_S:g} s"
            ) from None
        if isinstance(found, BaseException):
            raise RuntimeError(f"watching {self.node.address} failed") from found
        seen_version, visible, answered = found
        assert seen_version == version, (seen_version, version)
        return visible, answered


def wait_everywhere(nodes: list[LocalNode], name: str, version: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for node in nodes:
        with client_of(node) as client:
            while True:
                with contextlib.suppress(Exception):
                    if client.current_version(name) >= version:
                        break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{node.address} lacks {name} v{version}")
                time.sleep(0.02)


def measure_propagation(bench: Bench, cluster: LocalCluster, updates: int) -> dict[str, Any]:
    nodes = cluster.nodes
    name = f"bench_propagation_{uuid.uuid4().hex[:8]}"
    bench.say(f"propagation: {updates} updates published on node 1, watched on all {NODES}")
    publisher = client_of(nodes[0])
    watchers: list[Watcher] = []
    try:
        publisher.publish(fresh_function(name, 1), name=name)  # version 1: warm-up
        wait_everywhere(nodes, name, 1, 30.0)
        watchers = [Watcher(n, name, call=(i == len(nodes) - 1)) for i, n in enumerate(nodes)]
        for watcher in watchers:
            watcher.start()
        for watcher in watchers:
            if not watcher.ready.wait(30.0):
                raise TimeoutError(f"the watcher of {watcher.node.address} is not ready")
        publish_ms: list[float] = []
        everywhere_ms: list[float] = []
        per_node_ms: list[list[float]] = [[] for _ in nodes]
        callable_ms: list[float] = []
        for version in range(2, updates + 2):
            fn = fresh_function(name, version)
            started = time.perf_counter()
            published = publisher.publish(fn, name=name)
            returned = time.perf_counter()
            if published.version != version:
                raise RuntimeError(f"published v{published.version}, expected v{version}")
            publish_ms.append((returned - started) * 1000)
            for watcher in watchers:
                watcher.expect.put((version, returned))
            latest = 0.0
            for i, watcher in enumerate(watchers):
                visible, answered = watcher.result(version)
                per_node_ms[i].append(visible * 1000)
                latest = max(latest, visible)
                if answered is not None:
                    callable_ms.append(answered * 1000)
                    latest = max(latest, answered)
            everywhere_ms.append(latest * 1000)
            if (version - 1) % 25 == 0:
                bench.say(f"propagation: {version - 1}/{updates} updates")
    finally:
        for watcher in watchers:
            watcher.expect.put(None)
        for watcher in watchers:
            watcher.join(5)
        publisher.close()
    return {
        "what": "ms from publish returning on node 1 until every node shows the new "
        "version and node 5 runs it (one call), per update",
        "updates": updates,
        "p50_ms": percentile(everywhere_ms, 0.50),
        "p99_ms": percentile(everywhere_ms, 0.99),
        "max_ms": max(everywhere_ms),
        "per_node_p50_ms": [percentile(v, 0.50) for v in per_node_ms],
        "per_node_p99_ms": [percentile(v, 0.99) for v in per_node_ms],
        "node5_callable_p50_ms": percentile(callable_ms, 0.50),
        "node5_callable_p99_ms": percentile(callable_ms, 0.99),
        "node5_stale_calls": watchers[-1].stale_calls,
        "publish_p50_ms": percentile(publish_ms, 0.50),
        "poll_interval_ms": POLL_INTERVAL_S * 1000,
        "samples_ms": everywhere_ms,
    }


# -- 3. idle anti-entropy bytes ------------------------------------------------------------


def wait_converged(
    nodes: list[LocalNode], functions: int, timeout: float, silent: list[str]
) -> int:
    """Until every node holds ``functions`` functions and the same number of changes.

    A node busy applying a large change may not answer within the client's 5 s: its
    address goes to ``silent`` and it is asked again.
    """
    import scatter

    deadline = time.monotonic() + timeout
    while True:
        counts = []
        for node in nodes:
            with client_of(node) as client:
                try:
                    status = client.status()
                except scatter.Unreachable:
                    silent.append(node.address)
                    counts.append((-1, -1))
                    continue
                counts.append((status.functions, status.changes))
        if len(set(counts)) == 1 and counts[0][0] == functions:
            return counts[0][1]
        if time.monotonic() > deadline:
            raise TimeoutError(f"no convergence at {functions} functions: {counts}")
        time.sleep(0.2)


def digest_of_stopped(node: LocalNode, node_id: str, address: str, changes: int) -> dict[str, Any]:
    """The PeerDigest the node would send, from its store; the node must be stopped."""
    from scatter import _wire
    from scatter._core._registry import Registry
    from scatter._node._store import RegistryStore

    directory = node.data_dir / "registry"  # where the node keeps it (_node/_server.py)
    if not directory.is_dir():
        raise RuntimeError(f"no registry store at {directory}")
    store = RegistryStore(directory)
    try:
        registry = Registry.from_changes(node_id, store.changes())
    finally:
        store.close()
    held = registry.statistics()
    if held.changes != changes or held.pending:
        raise RuntimeError(
            f"the store holds {held.changes} changes ({held.pending} pending), "
            f"the node reported {changes}"
        )
    frame = _wire.encoder.encode(_wire.PeerDigest(node_id, address, registry.clock, True))
    return {
        "functions": held.functions,
        "changes": held.changes,
        "clock_entries": len(registry.clock.entries),
        "writers": sorted(registry.clock.entries),
        "bytes": len(frame),
        "bytes_per_member": len(frame) / NODES,
    }


def measure_digest(bench: Bench, cluster: LocalCluster, large: int) -> dict[str, Any]:
    nodes = cluster.nodes
    tag = uuid.uuid4().hex[:8]
    with client_of(nodes[0]) as client:
        have = client.status().functions
    # Every member writes at least once: the clock then has one entry per member.
    for i in range(SMALL_REGISTRY - have):
        with client_of(nodes[i % NODES]) as client:
            client.publish(fresh_function(f"bench_digest_{tag}_{i}", i))
    if SMALL_REGISTRY - have < NODES:
        raise RuntimeError(f"{have} functions already: too many for every member to write")
    victim = nodes[-1]
    with client_of(victim) as client:
        status = client.status()
        node_id, address = status.node_id, status.address  # as its digests carry them
    results = {}
    converged_s: dict[int, float] = {}  # from the last publish until all nodes agree
    unanswered: dict[int, list[str]] = {}  # status requests not answered in 5 s meanwhile
    for size in (SMALL_REGISTRY, large):
        if size > SMALL_REGISTRY:
            started = time.monotonic()
            count = size - SMALL_REGISTRY
            bench.say(f"digest: publishing {count:,} functions in sets of {MAX_SET_MEMBERS}")
            import scatter

            for first in range(0, count, MAX_SET_MEMBERS):  # a set holds at most that many
                group = scatter.FunctionSet(
                    f"bench_digest_set_{tag}_{first}", address=nodes[0].address
                )
                for i in range(first, min(first + MAX_SET_MEMBERS, count)):
                    group.function(fresh_function(f"bench_digest_{tag}_set_{i}", i))
                group.publish()
            bench.say(f"digest: sets published in {time.monotonic() - started:.1f} s")
        converging = time.monotonic()
        silent: list[str] = []
        changes = wait_converged(nodes, size, CONVERGE_TIMEOUT_S, silent)
        converged_s[size] = time.monotonic() - converging
        unanswered[size] = silent
        victim.stop()
        results[size] = digest_of_stopped(victim, node_id, address, changes)
        results[size]["converged_s"] = converged_s[size]
        results[size]["status_unanswered_in_5s"] = unanswered[size]
        bench.say(
            f"digest at {size:,} functions: {results[size]['bytes']} bytes, "
            f"{results[size]['clock_entries']} clock entries"
        )
        victim.start()
        cluster.wait_until_joined(30.0)
    return {
        "what": "bytes of one PeerDigest frame (msgpack payload) a node of 5 sends when idle",
        "members": NODES,
        "target_bytes_per_member": DIGEST_BYTES_PER_MEMBER,
        "sizes": {str(size): found for size, found in results.items()},
    }


# -- 2. failure detection --------------------------------------------------------------


def states_of(node: LocalNode) -> dict[str, str]:
    """{address: state} as ``node`` sees its members."""
    with client_of(node) as client:
        return {m["address"]: m["state"] for m in client.members()}


def all_alive_everywhere(nodes: list[LocalNode]) -> bool:
    for node in nodes:
        states = states_of(node)
        if len(states) < len(nodes) or any(s != "alive" for s in states.values()):
            return False
    return True


def measure_detection(bench: Bench, trials: int, budget_s: float) -> dict[str, Any]:
    bench.say(f"detection: up to {trials} trials in {budget_s:g} s, 5-node lan cluster")
    generation = 0

    def new_cluster() -> LocalCluster:
        nonlocal generation
        generation += 1
        return LocalCluster(bench.workdir / f"lan-{generation}", NODES, profile="lan").start()

    cluster = new_cluster()
    detect_s: list[float] = []
    recover_s: list[float] = []
    lost = 0  # victims never declared dead in DETECTION_TIMEOUT_S
    restarts = 0
    started = time.monotonic()
    try:
        trial = 0
        while len(detect_s) + lost < trials and time.monotonic() - started < budget_s:
            nodes = cluster.nodes
            victim = nodes[trial % NODES]
            observers = [n for n in nodes if n is not victim]
            trial += 1
            dead_at: dict[str, float] = {}
            paused = time.perf_counter()
            victim.pause()
            try:
                while len(dead_at) < len(observers):
                    for observer in observers:
                        if (
                            observer.address not in dead_at
                            and states_of(observer).get(victim.address) == "dead"
                        ):
                            dead_at[observer.address] = time.perf_counter() - paused
                    if time.perf_counter() - paused > DETECTION_TIMEOUT_S:
                        break
                    time.sleep(DETECTION_POLL_S)
            finally:
                victim.resume()
            resumed = time.perf_counter()
            if len(dead_at) == len(observers):
                detect_s.append(max(dead_at.values()))
                bench.say(f"detection trial {trial}: dead everywhere after {detect_s[-1]:.2f} s")
            else:
                lost += 1
                bench.say(
                    f"detection trial {trial}: not dead everywhere in {DETECTION_TIMEOUT_S:g} s"
                )
            while True:
                with contextlib.suppress(Exception):
                    if all_alive_everywhere(nodes):
                        recover_s.append(time.perf_counter() - resumed)
                        break
                if time.perf_counter() - resumed > RECOVERY_TIMEOUT_S:
                    bench.say(
                        "detection: the victim is not alive everywhere after 30 s; a fresh cluster"
                    )
                    cluster.stop()
                    restarts += 1
                    cluster = new_cluster()
                    break
                time.sleep(DETECTION_POLL_S)
    finally:
        cluster.stop()
    if not detect_s:
        raise RuntimeError("no trial declared its victim dead")
    return {
        "what": "s from SIGSTOP of one node until the 4 others all list it dead",
        "trials": len(detect_s),
        "trials_asked": trials,
        "budget_s": budget_s,
        "lost_trials": lost,
        "cluster_restarts": restarts,
        "p50_s": percentile(detect_s, 0.50),
        "p99_s": percentile(detect_s, 0.99),
        "max_s": max(detect_s),
        "min_s": min(detect_s),
        "recovery_p50_s": percentile(recover_s, 0.50) if recover_s else None,
        "recovery_max_s": max(recover_s) if recover_s else None,
        "poll_interval_s": DETECTION_POLL_S,
        "samples_s": detect_s,
    }


# -- the run -----------------------------------------------------------------------------


def _rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("VmRSS:")[1].split()[0])


def _time_to_serve(node: LocalNode, name: str) -> tuple[float, float, int]:
    """Start ``node``; (s until its ready line, s until a call answers, node RSS KiB)."""
    started = time.monotonic()
    node.start()
    ready = time.monotonic() - started
    with client_of(node) as client:
        client.make_callable(name)()
        serving = time.monotonic() - started
    return ready, serving, _rss_kib(node.pid)


def measure_restart(bench: Bench, changes: int) -> dict[str, Any]:
    """A node with 1,000 functions and ``changes`` changes in its history, restarted.

    The history: each function published twice (2,000 changes, 2,000 bodies), then
    rollbacks alternating each function between its two versions up to ``changes``.
    Each trial starts the node from its data directory and times its ready line and its
    first answered call; an empty node (one function, one change) is timed the same
    way, alternating with it, as the baseline of the same minute.
    """
    functions = min(RESTART_FUNCTIONS, changes // 2)
    full = LocalNode(bench.workdir / "restart-full")
    empty = LocalNode(bench.workdir / "restart-empty")
    built = time.monotonic()
    try:
        for node, count in ((empty, 1), (full, functions)):
            node.start()
            with client_of(node) as client:
                made = 0
                for version in (1, 2) if count > 1 else (1,):
                    for i in range(count):
                        client.publish(fresh_function(f"f{i}", i * 10 + version))
                        made += 1
                target = changes if count > 1 else made
                while made < target:
                    i = made % count
                    client.rollback(f"f{i}", 1 if (made // count) % 2 == 0 else 2)
                    made += 1
            node.stop()
        bench.say(
            f"restart: history of {changes:,} changes built in {time.monotonic() - built:.0f} s"
        )
        full.start()  # what the store holds: the snapshot, and the log on top of it
        with client_of(full) as client:
            status = client.status()
            history = {"compacted": status.compacted_changes, "log": status.changes}
        full.stop()
        bench.say(
            f"restart: {history['compacted']:,} changes compacted into the snapshot, "
            f"{history['log']:,} in the log"
        )
        trials: dict[str, list[tuple[float, float, int]]] = {"full": [], "empty": []}
        for _ in range(RESTART_TRIALS):
            for what, node in (("empty", empty), ("full", full)):
                trials[what].append(_time_to_serve(node, "f0"))
                node.stop()
    finally:
        full.stop()
        empty.stop()

    def median(what: str, index: int) -> float:
        return statistics.median(trial[index] for trial in trials[what])

    return {
        "functions": functions,
        "changes": changes,
        "trials": RESTART_TRIALS,
        "ready_s": median("full", 0),
        "serving_s": median("full", 1),
        "rss_mib": median("full", 2) / 1024,
        "empty_serving_s": median("empty", 1),
        "empty_rss_mib": median("empty", 2) / 1024,
        "history": history,
        "samples": trials,
    }


def machine_info() -> dict[str, Any]:
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    try:
        scatter_version: str | None = importlib.metadata.version("scatter-rpc")
    except importlib.metadata.PackageNotFoundError:
        scatter_version = None
    return {
        "load_average_at_start": os.getloadavg(),  # other work on the machine skews it all
        "cpu_count": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "scatter": scatter_version,
    }


def check_targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    def line(text: str, value: float | None, bound: float) -> dict[str, Any]:
        status = "SKIP" if value is None else "PASS" if value <= bound else "FAIL"
        return {"target": text, "status": status, "value": value, "bound": bound}

    prop = report["propagation"] or {}
    det = report["detection"] or {}
    digest = (report["digest"] or {}).get("sizes", {})
    targets = [
        line(
            f"propagation p50 <= {PROPAGATION_P50_MS:g} ms", prop.get("p50_ms"), PROPAGATION_P50_MS
        ),
        line(
            f"propagation p99 <= {PROPAGATION_P99_MS:g} ms", prop.get("p99_ms"), PROPAGATION_P99_MS
        ),
        line(
            f"failure detection p99 <= {DETECTION_P99_S:g} s (lan)",
            det.get("p99_s"),
            DETECTION_P99_S,
        ),
    ]
    restart = report.get("restart") or {}
    targets.append(
        line(
            f"restart with {RESTART_FUNCTIONS:,} functions and {restart.get('changes', 0):,} "
            f"changes: serving in <= {RESTART_SERVING_S:g} s",
            restart.get("serving_s"),
            RESTART_SERVING_S,
        )
    )
    for size, found in digest.items():
        targets.append(
            line(
                f"idle digest at {int(size):,} functions <= {DIGEST_BYTES_PER_MEMBER} bytes "
                f"x {NODES} members",
                found["bytes"],
                DIGEST_BYTES_PER_MEMBER * NODES,
            )
        )
    return targets


def print_report(report: dict[str, Any]) -> None:
    machine = report["machine"]
    table = Table(
        box=box.SIMPLE_HEAD,
        title=f"{machine['cpu_count']} x {machine['cpu_model']}, Python {machine['python']}, "
        f"{NODES} nodes on loopback; load average {machine['load_average_at_start'][0]:.1f} "
        f"at start, {machine['load_average_at_end'][0]:.1f} at end",
    )
    table.add_column("measurement")
    for name in ("samples", "p50", "p99", "max", "target"):
        table.add_column(name, justify="right")
    prop, det, digest = report["propagation"], report["detection"], report["digest"]
    if prop:
        table.add_row(
            "propagation, every node (local)",
            str(prop["updates"]),
            f"{prop['p50_ms']:.1f} ms",
            f"{prop['p99_ms']:.1f} ms",
            f"{prop['max_ms']:.1f} ms",
            f"{PROPAGATION_P50_MS:g} / {PROPAGATION_P99_MS:g} ms",
        )
        table.add_row(
            "  of which node 5 answering a call",
            str(prop["updates"]),
            f"{prop['node5_callable_p50_ms']:.1f} ms",
            f"{prop['node5_callable_p99_ms']:.1f} ms",
            "",
            "",
        )
        table.add_row(
            "  publish on node 1 returning",
            str(prop["updates"]),
            f"{prop['publish_p50_ms']:.1f} ms",
            "",
            "",
            "",
        )
    if det:
        table.add_section()
        table.add_row(
            "detection, SIGSTOP to dead everywhere (lan)",
            str(det["trials"]),
            f"{det['p50_s']:.2f} s",
            f"{det['p99_s']:.2f} s",
            f"{det['max_s']:.2f} s",
            f"p99 {DETECTION_P99_S:g} s",
        )
        if det["recovery_p50_s"] is not None:
            table.add_row(
                "  SIGCONT to alive everywhere",
                str(det["trials"]),
                f"{det['recovery_p50_s']:.2f} s",
                "",
                f"{det['recovery_max_s']:.2f} s",
                "",
            )
    console.print(table)
    if digest:
        sizes = Table(
            box=box.SIMPLE_HEAD, title=f"idle anti-entropy: one PeerDigest, {NODES} members"
        )
        for name in (
            "functions",
            "clock entries",
            "changes",
            "bytes",
            "bytes/member",
            "target",
            "all nodes had it after",
        ):
            sizes.add_column(name, justify="right")
        for size, found in digest["sizes"].items():
            sizes.add_row(
                f"{int(size):,}",
                str(found["clock_entries"]),
                f"{found['changes']:,}",
                str(found["bytes"]),
                f"{found['bytes_per_member']:.1f}",
                f"{DIGEST_BYTES_PER_MEMBER} x {NODES} = {DIGEST_BYTES_PER_MEMBER * NODES}",
                f"{found['converged_s']:.1f} s",
            )
        console.print(sizes)
        for size, found in digest["sizes"].items():
            if found["status_unanswered_in_5s"]:
                console.print(
                    f"while {int(size):,} functions replicated, "
                    f"{len(found['status_unanswered_in_5s'])} status request(s) went "
                    f"unanswered for 5 s (a node busy applying): "
                    f"{', '.join(sorted(set(found['status_unanswered_in_5s'])))}"
                )
    restart = report.get("restart")
    if restart:
        console.print(
            f"restart, {restart['functions']:,} functions and {restart['changes']:,} changes "
            f"(median of {restart['trials']}): ready line {restart['ready_s']:.2f} s, first "
            f"call answered {restart['serving_s']:.2f} s, node RSS {restart['rss_mib']:.0f} MiB; "
            f"an empty node: {restart['empty_serving_s']:.2f} s, {restart['empty_rss_mib']:.0f} MiB"
        )
    if prop:
        per_node = ", ".join(f"{v:.1f}" for v in prop["per_node_p50_ms"])
        console.print(
            f"propagation p50 per node (ms, node 1..5): {per_node}; "
            f"stale calls on node 5: {prop['node5_stale_calls']}"
        )
    if det:
        console.print(
            f"detection: {det['trials']} trials of {det['trials_asked']} asked "
            f"(budget {det['budget_s']:g} s), {det['lost_trials']} lost, "
            f"{det['cluster_restarts']} cluster restarts"
        )
    console.print("\ntargets (reported, never asserted):")
    colours = {"PASS": "green", "FAIL": "bold red", "SKIP": "yellow"}
    for target in report["targets"]:
        value = "not measured" if target["value"] is None else f"{target['value']:.4g}"
        console.print(
            f"[{colours[target['status']]}]{target['status']}[/] {target['target']}: {value}"
        )
    for what in report["errors"]:
        console.print(f"[bold red]ERROR[/] {what} could not be measured (see above)")


def main(
    updates: Annotated[int, typer.Option(min=2, max=10_000, help="Versions published.")] = 100,
    trials: Annotated[int, typer.Option(min=1, max=1000, help="Detection trials.")] = 20,
    detection_budget: Annotated[
        float, typer.Option(min=1, help="Seconds of detection trials at most.")
    ] = 240.0,
    large_registry: Annotated[
        int, typer.Option(min=SMALL_REGISTRY + 1, max=100_000, help="Functions, second digest.")
    ] = 10_000,
    restart_changes: Annotated[
        int, typer.Option(min=2, max=1_000_000, help="Changes in the restarted node's history.")
    ] = 10_000,
    only_restart: Annotated[bool, typer.Option(help="Measure the restart alone.")] = False,
    only: Annotated[
        str,
        typer.Option(
            help="Comma-separated measurements to run, from restart,propagation,digest,"
            "detection (default: all)."
        ),
    ] = "",
    output: Annotated[Path, typer.Option(help="Where to write the JSON results.")] = Path(
        "bench-results-cluster.json"
    ),
) -> None:
    """Measure a 5-node loopback cluster (see the module docstring)."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    workdir = Path(tempfile.mkdtemp(prefix="scatter-bench-cluster-"))
    # Nodes and clients of this run share a secret of their own, never the user's.
    os.environ["XDG_DATA_HOME"] = str(workdir / "xdg-data")
    os.environ["SCATTER_AUTOSTART"] = "0"
    os.environ["SCATTER_DATA_DIR"] = str(workdir / "default-data")
    os.environ.pop("SCATTER_SECRET", None)
    os.environ.pop("SCATTER_ADDRESS", None)
    chosen = set(MEASUREMENTS)
    if only_restart:
        chosen = {"restart"}
    elif only:
        chosen = {part.strip() for part in only.split(",") if part.strip()}
        unknown = chosen - set(MEASUREMENTS)
        if unknown:
            raise typer.BadParameter(
                f"unknown measurement(s) {', '.join(sorted(unknown))}: use {','.join(MEASUREMENTS)}",
                param_hint="--only",
            )
    bench = Bench(workdir)
    report: dict[str, Any] = {
        "machine": machine_info(),
        "settings": {
            "nodes": NODES,
            "updates": updates,
            "trials": trials,
            "detection_budget_s": detection_budget,
            "large_registry": large_registry,
            "restart_changes": restart_changes,
        },
        "propagation": None,
        "detection": None,
        "digest": None,
        "restart": None,
    }
    try:
        if "restart" in chosen:
            try:
                report["restart"] = measure_restart(bench, restart_changes)
            except Exception:
                bench.fail("restart")
        if chosen & {"propagation", "digest"}:
            try:
                with LocalCluster(workdir / "local", NODES, profile="local") as cluster:
                    bench.say(f"{NODES}-node local cluster up")
                    if "propagation" in chosen:
                        try:
                            report["propagation"] = measure_propagation(bench, cluster, updates)
                        except Exception:
                            bench.fail("propagation")
                    if "digest" in chosen:
                        try:
                            report["digest"] = measure_digest(bench, cluster, large_registry)
                        except Exception:
                            bench.fail("digest")
            except Exception:
                bench.fail("local cluster")
        if "detection" in chosen:
            try:
                report["detection"] = measure_detection(bench, trials, detection_budget)
            except Exception:
                bench.fail("detection")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    report["machine"]["load_average_at_end"] = os.getloadavg()
    report["targets"] = check_targets(report)
    report["errors"] = bench.errors
    report["settings"]["wall_s"] = round(time.monotonic() - bench.started, 1)
    output.write_text(json.dumps(report, indent=2) + "\n")
    print_report(report)
    console.print(f"\nwrote {output} in {report['settings']['wall_s']:g} s")
    if bench.errors:
        raise typer.Exit(1)


if __name__ == "__main__":
    import importlib.util

    if importlib.util.find_spec("scatter") is None:
        sys.path.insert(1, str(HERE.parent))
    typer.run(main)
