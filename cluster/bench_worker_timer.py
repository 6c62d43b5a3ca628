"""What a worker's own deadline costs per call: ``Worker.handle`` timed in one process.

    python -m cluster.bench_worker_timer [--before COMMIT]

Runs one real node (for its store and slots file), then calls ``Worker.handle`` in this
process on one ``add`` frame, in interleaved rounds, three ways:

* ``before``: the worker module of ``COMMIT`` (default 58eee0c, no timer), if git has it;
* ``no timer``: today's worker with ``setitimer`` replaced by a no-op builtin;
* ``timer``: today's worker as it runs.

and prints the fastest round's per-call time of each (the least disturbed by other work
on the machine) and the ratios. No network: the call's path inside the worker only,
where the timer's share is largest.

``--end-to-end`` also times whole calls (client, socket, worker and back) against two
nodes in interleaved rounds: one running ``COMMIT``'s code (``git archive``), one today's.
"""

from __future__ import annotations

import argparse
import importlib.util
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec

import scatter
from cluster import bench_ab
from cluster.launch import LocalNode
from scatter import _wire
from scatter._node import _worker


def add(a: int, b: int) -> int:
    return a + b


def _worker_before(commit: str, data_dir: Path, run_dir: Path, scratch: Path) -> Any | None:
    try:
        source = subprocess.run(
            ["git", "show", f"{commit}:scatter/_node/_worker.py"],
            capture_output=True,
            check=True,
            cwd=Path(__file__).resolve().parent.parent,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    path = scratch / "_worker_before.py"
    path.write_bytes(source)
    spec = importlib.util.spec_from_file_location("scatter._node._worker_before", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    try:
        return module.Worker(data_dir, 255, 30.0, 1 << 20, run_dir=run_dir)
    except TypeError:  # a worker from before per-incarnation run directories
        try:
            return module.Worker(data_dir, 255, 30.0, 1 << 20)
        except FileNotFoundError:  # it looks for a slots file this node no longer makes
            print(f"the worker of {commit} cannot run beside this node: not timed")
            return None


_REPO = Path(__file__).resolve().parent.parent


def _end_to_end(commit: str, scratch: Path, rounds: int, calls: int) -> dict[str, list[float]]:
    # Each node runs its own tree's code (bench_ab: git archive, then a node in it).
    tree = bench_ab.tree(commit, scratch)
    nodes: dict[str, LocalNode] = {}
    try:
        for name, code in (("before", tree), ("after", _REPO)):
            nodes[name] = bench_ab.start_node(code, scratch / name)
    except BaseException:
        for node in nodes.values():
            node.stop()
        raise
    clients = {name: scatter.Client(n.address, autostart=False) for name, n in nodes.items()}
    try:
        remotes = {}
        for name, client in clients.items():
            client.publish(add)
            remotes[name] = client.make_callable("add")
            for _ in range(2000):
                remotes[name](1, 2)
        times: dict[str, list[float]] = {name: [] for name in remotes}
        for _ in range(rounds):
            for name, remote in remotes.items():
                started = time.perf_counter()
                for _ in range(calls):
                    remote(1, 2)
                times[name].append((time.perf_counter() - started) / calls)
        return times
    finally:
        for client in clients.values():
            client.close()
        for node in nodes.values():
            node.stop()


def _per_call(handle: Any, frames: list[bytes]) -> float:
    started = time.perf_counter()
    for frame in frames:
        handle(frame)
    return (time.perf_counter() - started) / len(frames)


def _frames(call: _wire.Call, first_id: int, calls: int) -> list[bytes]:
    """``calls`` frames of ``call`` with fresh ids: a worker refuses a repeated id."""
    encode = _wire.encoder.encode
    return [encode(msgspec.structs.replace(call, id=i)) for i in range(first_id, first_id + calls)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cluster.bench_worker_timer")
    parser.add_argument("--before", default="58eee0c")
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--calls", type=int, default=5_000)
    parser.add_argument("--end-to-end", action="store_true")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="scatter-bench-timer-") as tmp:
        data_dir = Path(tmp) / "node"
        with LocalNode(data_dir) as node, scatter.Client(node.address, autostart=False) as c:
            c.publish(add)
            assert c.make_callable("add")(1, 2) == 3
            args_payload = msgspec.msgpack.encode({"a": 1, "b": 2})
            # As a client sends it: a caller id, so the worker's at-most-once table runs.
            call = _wire.Call(1, "add", 0, 0, "", 0.0, msgspec.Raw(args_payload), b"caller")
            # The node's run directory is per incarnation (run/<n>/): the newest is its.
            run_dir = max((data_dir / "run").iterdir(), key=lambda d: d.stat().st_mtime)
            timed = _worker.Worker(data_dir, 254, 30.0, 1 << 20, run_dir=run_dir)
            untimed = _worker.Worker(data_dir, 253, 30.0, 1 << 20, run_dir=run_dir)
            untimed.arm = max  # type: ignore[assignment]  # a builtin taking two numbers
            signal.signal(signal.SIGALRM, timed.on_alarm)
            variants: dict[str, Any] = {"no timer": untimed, "timer": timed}
            before = _worker_before(args.before, data_dir, run_dir, Path(tmp))
            if before is not None:
                variants = {"before": before, **variants}
            for worker in variants.values():
                _per_call(worker.handle, _frames(call, 1, 2000))  # warm: routes, loaded body
            times: dict[str, list[float]] = {name: [] for name in variants}
            for round_ in range(args.rounds):
                frames = _frames(call, 10_000 + round_ * args.calls, args.calls)
                for name, worker in variants.items():
                    times[name].append(_per_call(worker.handle, frames))
            signal.setitimer(signal.ITIMER_REAL, 0)
        if args.end_to_end:
            whole = _end_to_end(args.before, Path(tmp), args.rounds // 3, args.calls // 5)
    best = {name: min(t) for name, t in times.items()}
    for name, t in times.items():
        print(
            f"{name:>9}: {best[name] * 1e6:6.2f} us per call "
            f"(median of rounds {statistics.median(t) * 1e6:.2f})"
        )
    print(f"timer / no timer: {best['timer'] / best['no timer']:.3f}")
    if "before" in best:
        print(f"timer / before:   {best['timer'] / best['before']:.3f}")
    if args.end_to_end:
        fastest = {name: min(t) for name, t in whole.items()}
        for name, t in whole.items():
            print(
                f"whole call, {name:>6}: {fastest[name] * 1e6:6.2f} us "
                f"(median of rounds {statistics.median(t) * 1e6:.2f})"
            )
        print(f"whole call, after / before: {fastest['after'] / fastest['before']:.3f}")


if __name__ == "__main__":
    main()
