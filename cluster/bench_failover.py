"""Failover time: from a node's SIGKILL to its client's first successful call through
another member (issue 10, item 4).

    python cluster/bench_failover.py                # 10 trials, about a minute
    python cluster/bench_failover.py --trials 20

One 3-node loopback cluster (``cluster.launch.LocalCluster``, ``local`` profile), stopped by
PID at the end. A trial: a fresh ``Client`` given only the victim's address (it learns the
other members from it) makes a callable and calls it once (a pooled worker connection);
the victim is SIGKILLed; the clock starts just before the kill, and the same callable is
called in a loop (each call ``timeout=5``) until a call succeeds through another member
(``Client.address_in_use`` moved). Errors on the way (a call that reached a worker of the
dead node) are counted, not retried differently. The victim is then started again from its
data directory and the next trial waits until every node sees all three alive; victims
take turns. Percentiles are nearest-rank. A fresh ``XDG_DATA_HOME``, never the user's.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cluster.launch import LocalCluster


def add(a: int, b: int) -> int:
    return a + b


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=10)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="scatter-failover-"))
    os.environ["XDG_DATA_HOME"] = str(root / "xdg")
    os.environ["SCATTER_AUTOSTART"] = "0"
    import scatter

    samples: list[float] = []
    errors: list[str] = []
    with LocalCluster(root, 3) as cluster:
        with scatter.Client(cluster.nodes[0].address, autostart=False) as first:
            first.publish(add)
        for trial in range(args.trials):
            victim = cluster.nodes[trial % 3]
            cluster.wait_until_joined(60)
            with scatter.Client(victim.address, autostart=False) as client:
                remote = client.make_callable("add")
                assert remote(1, 2) == 3
                started = time.monotonic()
                victim.process.kill()  # type: ignore[union-attr]  # SIGKILL, not reaped yet
                while True:
                    try:
                        value = remote.call(2, 3, timeout=5)
                    except scatter.ScatterError as exc:
                        errors.append(f"{type(exc).__name__}: {exc}")
                        continue
                    if client.address_in_use != victim.address:
                        samples.append(time.monotonic() - started)
                        assert value == 5
                        break
            victim.kill()  # reaps it
            victim.start()
            print(f"trial {trial + 1}: {samples[-1] * 1000:.0f} ms", flush=True)
    report = {
        "trials": len(samples),
        "p50_ms": round(percentile(samples, 50) * 1000, 1),
        "max_ms": round(max(samples) * 1000, 1),
        "samples_ms": [round(s * 1000, 1) for s in samples],
        "errors_on_the_way": errors,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
