"""``RemoteFunction.map``: many calls, pipelined over several workers, results in order."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest

import scatter


def add(a: int, b: int) -> int:
    return a + b


def inverse(x: int) -> float:
    return 1 / x


def worker_pid(x: int) -> int:
    return os.getpid()


def record(path: str, x: int) -> int:
    Path(path).joinpath(str(x)).touch()
    return x


def crash_on(x: int) -> int:
    if x == 3:
        os._exit(1)
    return x


def nap(seconds: float) -> float:
    import time

    time.sleep(seconds)
    return seconds


@pytest.mark.timeout(60)
def test_map_returns_every_result_in_order_over_several_workers(client: scatter.Client) -> None:
    client.publish(add)
    client.publish(worker_pid)
    remote = client.make_callable("add")
    assert list(remote.map(range(500), range(500, 1000), parallel=3)) == [
        a + b for a, b in zip(range(500), range(500, 1000), strict=True)
    ]
    assert list(remote.map([], [])) == []
    pids = list(client.make_callable("worker_pid").map(range(40), parallel=2))
    assert len(set(pids)) == 2  # both connections' workers ran calls
    assert client.statistics().idle_connections == 3  # all given back for later calls
    assert remote(1, 2) == 3


@pytest.mark.timeout(60)
def test_a_bad_item_is_refused_before_anything_runs(client: scatter.Client, tmp_path: Path) -> None:
    client.publish(record)
    remote = client.make_callable("record")
    calls_made = tmp_path / "calls"
    calls_made.mkdir()
    with pytest.raises(scatter.ValidationError, match="argument 'x'") as raised:
        remote.map([str(calls_made)] * 3, [1, 2, "three"])
    assert any("item 2 of map" in note for note in raised.value.__notes__)
    assert list(calls_made.iterdir()) == []
    assert list(remote.map([str(calls_made)] * 2, [1, 2])) == [1, 2]
    assert sorted(path.name for path in calls_made.iterdir()) == ["1", "2"]
    with pytest.raises(TypeError, match="at least one iterable"):
        remote.map()
    with pytest.raises(ValueError, match="parallel"):
        remote.map([1], parallel=0)


@pytest.mark.timeout(60)
def test_a_failing_call_raises_where_the_iteration_reaches_it(client: scatter.Client) -> None:
    client.publish(inverse)
    remote = client.make_callable("inverse")
    results = remote.map([1, 2, 0, 4, 5, 6, 7, 8], parallel=2)
    assert next(results) == 1.0
    assert next(results) == 0.5
    with pytest.raises(ZeroDivisionError) as caught:  # the remote class, and RemoteError
        next(results)
    assert isinstance(caught.value, scatter.RemoteError)
    # The connections that still had calls in flight were dropped, not reused.
    assert [remote(x) for x in (1, 2, 4)] == [1.0, 0.5, 0.25]
    assert list(remote.map([4, 5])) == [0.25, 0.2]


@pytest.mark.timeout(60)
def test_stopping_early_leaves_the_client_usable(client: scatter.Client) -> None:
    client.publish(add)
    remote = client.make_callable("add")
    results = remote.map(range(1000), range(1000), parallel=2)
    assert list(itertools.islice(results, 3)) == [0, 2, 4]
    results.close()  # calls still in flight: their connections are discarded
    assert remote(2, 3) == 5
    assert list(remote.map([1], [1])) == [2]


@pytest.mark.timeout(60)
def test_a_crashed_worker_fails_the_map_and_the_node_serves_on(client: scatter.Client) -> None:
    client.publish(crash_on)
    remote = client.make_callable("crash_on")
    with pytest.raises(scatter.WorkerCrashed):
        list(remote.map(range(8), parallel=2))
    assert list(remote.map([0, 1, 2], parallel=2)) == [0, 1, 2]


@pytest.mark.timeout(60)
def test_each_call_of_a_map_has_its_own_timeout(client: scatter.Client) -> None:
    client.publish(nap)
    remote = client.make_callable("nap")
    # Queued behind each other, four 0.2 s calls take 0.8 s on one worker: each call's
    # timeout counts from when its worker starts it, not from when the map began.
    assert list(remote.map([0.2] * 4, parallel=1, timeout=0.6)) == [0.2] * 4
    # Interrupted by its worker at 0.3 s: the worker got the per-call timeout too.
    with pytest.raises(scatter.CallTimeout, match=r"timeout of 0\.3 s and was interrupted"):
        list(remote.map([0.0, 5.0, 0.0], parallel=1, timeout=0.3))
    assert remote(0.0) == 0.0
