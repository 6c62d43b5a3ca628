"""The benchmark's workloads: the same three functions for every system under test.

Scatter ships these by value (it pickles the defining module by value), the baseline and
zeroapi servers import them, so every system runs exactly this code.
"""

from __future__ import annotations

import time

# Clients per workload in the concurrent runs: cpu uses one client per core of this
# 2-core machine, the cheap calls use more so the server, not the client, is the limit.
CONCURRENT_CLIENTS = {"add": 4, "total": 4, "cpu": 2}
WORKLOADS = tuple(CONCURRENT_CLIENTS)
CPU_TARGET_S = 0.005


def add(a: int, b: int) -> int:
    return a + b


def total(xs: list[float]) -> float:
    return sum(xs)


def cpu(n: int) -> int:
    """Pure-Python busy work (holds the GIL throughout): about 5 ms for the calibrated n."""
    acc = 0
    for i in range(n):
        acc = (acc + i * i) % 1_000_003
    return acc


def calibrate_cpu(target_s: float = CPU_TARGET_S) -> int:
    """The loop count for which cpu(n) takes about target_s here, measured once."""

    def best_of(n: int, repeats: int) -> float:
        # The fastest run is the one least disturbed by anything else on the machine.
        best = float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            cpu(n)
            best = min(best, time.perf_counter() - started)
        return best

    n = 20_000
    for _ in range(3):  # two refinements are enough to land within a few percent
        n = max(1, round(n * target_s / best_of(n, 5)))
    return n


def total_payload() -> list[float]:
    return [i * 0.5 for i in range(1000)]


def call_args(workload: str, cpu_loops: int) -> tuple[object, ...]:
    """The positional arguments each call of the workload gets (the same for all systems)."""
    if workload == "add":
        return (123_456, 654_321)
    if workload == "total":
        return (total_payload(),)
    if workload == "cpu":
        return (cpu_loops,)
    raise ValueError(f"unknown workload {workload!r}")


def expected(workload: str, cpu_loops: int) -> object:
    """The right answer, checked once per client before timing starts."""
    return {"add": add, "total": total, "cpu": cpu}[workload](*call_args(workload, cpu_loops))
