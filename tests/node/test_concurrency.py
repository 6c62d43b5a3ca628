"""Many clients at once: processes, threads, async callers, and the control socket."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import trio

import scatter
from cluster.launch import LocalNode

CLIENT = textwrap.dedent(
    """
    import sys
    import scatter
    scatter.connect(sys.argv[1], autostart=False)
    add = scatter.make_callable("add")
    offset = int(sys.argv[2])
    wrong = 0
    for i in range(int(sys.argv[3])):
        if add(offset, i) != offset + i:
            wrong += 1
    print(f"done {wrong}")
    """
)


def add(a: int, b: int) -> int:
    return a + b


@pytest.mark.timeout(120)
def test_eight_client_processes_make_500_calls_each(client: scatter.Client, node: LocalNode) -> None:
    client.publish(add)
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", CLIENT, node.address, str(1000 * k), "500"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for k in range(8)
    ]
    try:
        outputs = [p.communicate(timeout=100) for p in processes]
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
                p.wait()
    for process, (out, err) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, err
        assert out.strip() == "done 0"


@pytest.mark.timeout(60)
def test_one_callable_shared_by_threads(client: scatter.Client) -> None:
    client.publish(add)
    remote = client.make_callable("add")
    failures: list[BaseException] = []

    def hammer(offset: int) -> None:
        try:
            for i in range(200):
                assert remote(offset, i) == offset + i
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=hammer, args=(k * 10_000,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(50)
    assert failures == []
    assert not any(t.is_alive() for t in threads)


@pytest.mark.timeout(60)
def test_control_socket_under_load_loses_no_wakeup(node: LocalNode) -> None:
    # The node's pyzmq<->Trio bridge must answer every request when many arrive at
    # once (an edge-triggered ZMQ_FD misread would leave requests queued forever).
    failures: list[BaseException] = []
    answered = [0] * 8

    def hammer(k: int) -> None:
        try:
            with scatter.Client(node.address, autostart=False) as c:
                for _ in range(300):
                    assert c.status().pid == node.pid
                    answered[k] += 1
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=hammer, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(50)
    assert failures == []
    assert answered == [300] * 8


@pytest.mark.timeout(60)
def test_async_callers_on_trio_and_asyncio(client: scatter.Client) -> None:
    client.publish(add)
    remote = client.make_callable("add")

    async def with_trio() -> list[int]:
        results = [0] * 20

        async def one(i: int) -> None:
            results[i] = await remote.call_async(i, i)

        async with trio.open_nursery() as nursery:
            for i in range(20):
                nursery.start_soon(one, i)
        return results

    assert trio.run(with_trio) == [2 * i for i in range(20)]

    async def with_asyncio() -> list[int]:
        return list(await asyncio.gather(*(remote.call_async(i, 1) for i in range(20))))

    assert asyncio.run(with_asyncio()) == [i + 1 for i in range(20)]


@pytest.mark.timeout(60)
def test_sync_call_inside_a_running_event_loop(client: scatter.Client) -> None:
    # A Jupyter kernel runs an asyncio loop; a plain call from a cell must just work.
    client.publish(add)
    remote = client.make_callable("add")

    async def cell() -> int:
        return remote(2, 3)

    assert asyncio.run(cell()) == 5


@pytest.mark.timeout(60)
def test_async_calls_wait_on_the_socket_not_in_threads(client: scatter.Client) -> None:
    client.publish(add)
    remote = client.make_callable("add")
    assert remote(1, 1) == 2  # a warm connection in the pool: no lease needed below

    async def sequential() -> tuple[list[int], int]:
        results = [await remote.call_async(i, 1) for i in range(50)]
        # Counted inside the loop: asyncio.run joins its executor's threads on the way out.
        return results, threading.active_count()

    threads_before = threading.active_count()
    expected = [i + 1 for i in range(50)]
    assert trio.run(sequential) == (expected, threads_before)
    assert asyncio.run(sequential()) == (expected, threads_before)


@pytest.mark.timeout(60)
def test_cancelled_async_call_leaves_the_client_usable(client: scatter.Client) -> None:
    def slow(seconds: float) -> float:
        time.sleep(seconds)
        return seconds

    client.publish(add)
    client.publish(slow)
    remote_slow = client.make_callable("slow")
    remote_add = client.make_callable("add")

    # Cancelled 0.2 s into a 3 s call: the cancellation ends the wait, not the reply.
    async def with_trio() -> int:
        started = time.monotonic()
        with trio.move_on_after(0.2) as scope:
            await remote_slow.call_async(3.0)
            raise AssertionError("not cancelled")
        assert scope.cancelled_caught
        assert time.monotonic() - started < 2.0
        return int(await remote_add.call_async(2, 3))

    assert trio.run(with_trio) == 5

    async def with_asyncio() -> int:
        started = time.monotonic()
        with pytest.raises(TimeoutError) as raised:
            await asyncio.wait_for(remote_slow.call_async(3.0), 0.2)
        assert not isinstance(raised.value, scatter.ScatterError)  # asyncio's, not a CallTimeout
        assert time.monotonic() - started < 2.0
        return int(await remote_add.call_async(4, 5))

    assert asyncio.run(with_asyncio()) == 9
    assert remote_add(1, 2) == 3


@pytest.mark.timeout(60)
def test_async_call_errors_are_the_sync_ones(client: scatter.Client) -> None:
    def boom(x: int) -> int:
        raise ValueError(f"no {x}")

    client.publish(boom)
    remote = client.make_callable("boom")

    async def main() -> None:
        with pytest.raises(scatter.RemoteError, match="no 3"):
            await remote.call_async(3)
        with pytest.raises(scatter.ValidationError):
            await remote.call_async("x")
        with pytest.raises(TypeError, match="missing 1 required"):
            await remote.call_async()

    trio.run(main)
    asyncio.run(main())
