"""Scatter against an older Scatter, in the same run: is a change faster or slower?

    python -m cluster.bench_ab --before c470b62            # the working tree against it
    python -m cluster.bench_ab --before c470b62 --after HEAD --rounds 7 --clients 1,4

``cluster/bench.py`` gives each figure as a ratio to raw pyzmq in the same round, which
says how Scatter compares with the baseline, not whether a change made it slower: two
runs of it on a shared 2-core machine differ by more than the changes worth finding
(10-20%). This runs both trees in the same rounds instead. Each tree gets a node of its
own (its code: ``git archive`` of the commit, or the working tree), ``add`` published
through its own client code, and client processes of its own code, so an older tree
speaks its own protocol. Rounds alternate the trees (A B, then B A), each tree's clients
released together and run for the same time, and the report gives, for every client
count, the medians across rounds of:

* calls per second (all clients together) and the p50 and p99 of one call;
* CPU per call: the clients' (their own ``process_time``), and the node's with its
  workers' (from ``/proc``), which unlike wall time hardly moves with other load;
* ``after / before`` of each, taken within each round, then the median: the verdict.

Only the public API is used in the clients (``scatter.connect``, ``make_callable``),
so any tree since the seed runs. Nothing is asserted: it prints and writes JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from cluster.launch import LocalNode, child_pids

_REPO = Path(__file__).resolve().parent.parent

# The client, run with the tree's code on PYTHONPATH: publish once, or warm up, say
# READY, wait for GO on stdin, call for the given seconds, print one JSON line.
_CLIENT = r"""
import json, sys, time
import scatter

def add(a: int, b: int) -> int:
    return a + b

address, mode, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
client = scatter.connect(address)
if mode == "publish":
    client.publish(add)
    assert client.make_callable("add")(1, 2) == 3
    sys.exit(0)
f = client.make_callable("add")
for i in range(1000):
    f(i, 1)
print("READY", flush=True)
sys.stdin.readline()
times = []
clock = time.perf_counter
cpu0 = time.process_time()
end = clock() + seconds
i = 0
while True:
    started = clock()
    if started > end:
        break
    f(i, 1)
    times.append(clock() - started)
    i += 1
cpu = time.process_time() - cpu0
times.sort()
print(json.dumps({"calls": len(times), "p50": times[len(times) // 2],
                  "p99": times[int(len(times) * 0.99)], "cpu": cpu}), flush=True)
"""


def tree(commit: str, scratch: Path) -> Path:
    """The code of ``commit`` (``git archive``); the working tree for "."; a directory
    holding a ``scatter`` package as it is (a variant made by hand, to try an idea)."""
    if commit == ".":
        return _REPO
    if (Path(commit) / "scatter" / "__init__.py").is_file():
        return Path(commit).resolve()
    archive = subprocess.run(
        ["git", "archive", "--format=tar", commit, "scatter"],
        capture_output=True,
        check=True,
        cwd=_REPO,
    ).stdout
    tree = scratch / f"tree-{commit}"
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(tree, filter="data")
    return tree


def _env(code: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(code)
    env.pop("SCATTER_ADDRESS", None)
    return env


def start_node(code: Path, data_dir: Path) -> LocalNode:
    # `python -m scatter...` looks in the working directory first, then PYTHONPATH.
    saved = os.environ.get("PYTHONPATH"), os.getcwd()
    try:
        os.chdir(code)
        os.environ["PYTHONPATH"] = str(code)
        node = LocalNode(data_dir).start()
    finally:
        if saved[0] is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved[0]
        os.chdir(saved[1])
    where = Path(os.readlink(f"/proc/{node.pid}/cwd"))
    if where != code.resolve():
        node.stop()
        raise RuntimeError(f"the node runs the code in {where}, not {code}")
    return node


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _node_cpu(node: LocalNode) -> float:
    total = 0.0
    for pid in [node.pid, *child_pids(node.pid)]:
        # A worker may exit between the listing and the read.
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            total += _cpu_seconds(pid)
    return total


def _measure(code: Path, node: LocalNode, clients: int, seconds: float) -> dict[str, float]:
    """One tree, ``clients`` processes released together: calls/s, p50, p99, CPU/call."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _CLIENT, node.address, "call", str(seconds)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=_env(code),
            cwd=code,
        )
        for _ in range(clients)
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if line.strip() != "READY":
                raise RuntimeError(f"a client of {code} did not start: {line!r}")
        node_cpu = _node_cpu(node)
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("GO\n")
            proc.stdin.flush()
        results = []
        for proc in procs:
            assert proc.stdout is not None
            results.append(json.loads(proc.stdout.readline()))
        node_cpu = _node_cpu(node) - node_cpu
        for proc in procs:
            proc.wait(timeout=30)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    calls = sum(r["calls"] for r in results)
    return {
        "calls_per_s": calls / seconds,
        "p50_us": statistics.median(r["p50"] for r in results) * 1e6,
        "p99_us": max(r["p99"] for r in results) * 1e6,
        "client_cpu_us": sum(r["cpu"] for r in results) / calls * 1e6,
        "node_cpu_us": node_cpu / calls * 1e6,
    }


_METRICS = ("calls_per_s", "p50_us", "p99_us", "client_cpu_us", "node_cpu_us")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cluster.bench_ab", description=__doc__)
    parser.add_argument(
        "--before", default="c470b62", help="commit (or directory) to compare against"
    )
    parser.add_argument(
        "--after", default=".", help='commit, directory, or "." for the working tree'
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=2.0, help="per measurement")
    parser.add_argument("--clients", default="1,4", help="client counts, comma-separated")
    parser.add_argument("--output", type=Path, default=Path("bench-ab.json"))
    args = parser.parse_args(argv)
    counts = [int(c) for c in args.clients.split(",")]
    labels = ("before", "after")
    with tempfile.TemporaryDirectory(prefix="scatter-bench-ab-") as tmp:
        scratch = Path(tmp)
        trees = {"before": tree(args.before, scratch), "after": tree(args.after, scratch)}
        nodes: dict[str, LocalNode] = {}
        try:
            for label in labels:
                nodes[label] = start_node(trees[label], scratch / f"node-{label}")
                subprocess.run(
                    [sys.executable, "-c", _CLIENT, nodes[label].address, "publish", "0"],
                    check=True,
                    env=_env(trees[label]),
                    cwd=trees[label],
                    timeout=60,
                )
            rows: dict[int, dict[str, list[dict[str, float]]]] = {
                k: {label: [] for label in labels} for k in counts
            }
            for round_ in range(args.rounds):
                order = labels if round_ % 2 == 0 else labels[::-1]
                for k in counts:
                    for label in order:
                        rows[k][label].append(_measure(trees[label], nodes[label], k, args.seconds))
                print(f"round {round_ + 1}/{args.rounds} done", file=sys.stderr, flush=True)
        finally:
            for node in nodes.values():
                node.stop()
    report: dict[str, Any] = {"before": args.before, "after": args.after, "clients": {}}
    print(f"\nafter ({args.after}) against before ({args.before}), {args.rounds} rounds:")
    for k in counts:
        entry: dict[str, Any] = {}
        print(f"\n{k} client(s)            before      after   after/before (per round)")
        for metric in _METRICS:
            before = [r[metric] for r in rows[k]["before"]]
            after = [r[metric] for r in rows[k]["after"]]
            ratios = [a / b for a, b in zip(after, before, strict=True) if b]
            entry[metric] = {
                "before": statistics.median(before),
                "after": statistics.median(after),
                "ratio": statistics.median(ratios),
                "per_round": ratios,
            }
            per_round = ", ".join(f"{r:.2f}" for r in ratios)
            print(
                f"  {metric:15} {entry[metric]['before']:10,.1f} {entry[metric]['after']:10,.1f}"
                f"   {entry[metric]['ratio']:.3f}x ({per_round})"
            )
        report["clients"][str(k)] = entry
    args.output.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
