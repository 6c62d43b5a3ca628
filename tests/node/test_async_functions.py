"""``async def`` functions run on the worker's event loop, with the sync call's timeouts
and isolation (scatter/_node/_worker.py, ``Worker.run_coroutine``)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
import trio

import scatter
from cluster.launch import LocalNode, child_pids
from tests.waiting import wait_until


async def double(n: int) -> int:
    await asyncio.sleep(0.01)
    return 2 * n


async def liar(n: int) -> int:
    await asyncio.sleep(0)
    return str(n)  # type: ignore[return-value]


async def refuse(n: int) -> int:
    await asyncio.sleep(0)
    raise ValueError(f"no {n}")


async def loop_and_pid() -> list[int]:
    return [id(asyncio.get_running_loop()), os.getpid()]


@pytest.mark.timeout(90)
def test_an_async_function_is_awaited_on_the_worker(client: scatter.Client) -> None:
    for fn in (double, liar, refuse, loop_and_pid):
        client.publish(fn)
    remote = client.make_callable("double")
    assert remote(21) == 42
    assert list(remote.map(range(5))) == [0, 2, 4, 6, 8]

    async def main() -> int:
        return int(await remote.call_async(4))

    assert asyncio.run(main()) == 8
    assert trio.run(main) == 8

    with pytest.raises(scatter.ValidationError) as caught:
        client.make_callable("liar")(3)
    assert caught.value.parameter == "return"

    with pytest.raises(ValueError, match="no 5") as raised:
        client.make_callable("refuse")(5)
    trace = raised.value.remote_traceback  # type: ignore[attr-defined]
    assert 'raise ValueError(f"no {n}")' in trace
    assert "base_events.py" not in trace and "_worker.py" not in trace

    # One loop per worker process, reused by every call it runs.
    first = client.make_callable("loop_and_pid")
    seen = {tuple(first()) for _ in range(5)}
    by_pid = {pid: {loop for loop, p in seen if p == pid} for _, pid in seen}
    assert all(len(loops) == 1 for loops in by_pid.values()), seen


@pytest.mark.timeout(90)
def test_a_hung_coroutine_is_stopped_at_its_deadline_and_its_finally_runs(
    client: scatter.Client, node: LocalNode, tmp_path: Path
) -> None:
    async def hang(marker: str) -> int:
        try:
            await asyncio.sleep(600)
        finally:
            Path(marker).touch()
        return 0

    async def spin() -> int:
        while True:  # Python code holding the loop: the alarm interrupts it
            pass

    async def leave_a_task(marker: str) -> int:
        async def later() -> None:
            try:
                await asyncio.sleep(600)
            except asyncio.CancelledError:
                Path(marker).touch()
                raise

        asyncio.get_running_loop().create_task(later())
        return 1

    for fn in (hang, spin, leave_a_task, loop_and_pid):
        client.publish(fn)
    pid_of = client.make_callable("loop_and_pid")
    workers = set(child_pids(node.pid))

    marker = tmp_path / "finally-ran"
    with pytest.raises(scatter.CallTimeout, match="timeout of 1 s"):
        client.make_callable("hang").call(str(marker), timeout=1)
    assert marker.exists(), "the coroutine's finally did not run when it was interrupted"
    with pytest.raises(scatter.CallTimeout):
        client.make_callable("spin").call(timeout=1)

    left = tmp_path / "leftover-cancelled"
    assert client.make_callable("leave_a_task")(str(left)) == 1
    assert left.exists(), "a task the call left behind was not cancelled at its end"
    # The workers answered again, interrupted rather than killed and replaced.
    assert pid_of()[1] in workers
    assert set(child_pids(node.pid)) == workers


@pytest.mark.timeout(90)
def test_a_coroutine_that_ignores_cancellation_costs_its_worker_only(
    client: scatter.Client, node: LocalNode
) -> None:
    async def stubborn() -> int:
        while True:
            try:
                await asyncio.sleep(600)
            except asyncio.CancelledError:
                continue

    client.publish(stubborn)
    client.publish(double)
    with pytest.raises((scatter.CallTimeout, scatter.WorkerCrashed)):
        client.make_callable("stubborn").call(timeout=1)
    # The worker ended itself kill_grace after the deadline; the node serves on.
    wait_until(lambda: client.make_callable("double")(1) == 2, 30, "the node serves again")
