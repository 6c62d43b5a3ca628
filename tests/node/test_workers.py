"""Worker processes live as long as their node, and no longer."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

import scatter
from cluster.launch import LocalNode, process_gone, wait_until


def add(a: int, b: int) -> int:
    return a + b


def _worker_pids(node_pid: int) -> list[int]:
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == node_pid and fields[0] != "Z":
            pids.append(int(stat.parent.name))
    return pids


@pytest.mark.timeout(60)
def test_workers_outlive_the_spawning_thread(client: scatter.Client) -> None:
    # Workers once died 10 s after start: PR_SET_PDEATHSIG follows the thread that
    # spawned them, and trio's process-spawning thread exits after 10 s idle.
    client.publish(add)
    remote = client.make_callable("add")
    started = time.monotonic()
    while time.monotonic() - started < 12.5:
        assert remote(1, 2) == 3
        time.sleep(0.05)


@pytest.mark.timeout(60)
def test_workers_exit_when_their_node_is_killed(client: scatter.Client, node: LocalNode) -> None:
    client.publish(add)
    assert client.make_callable("add")(1, 2) == 3
    workers = _worker_pids(node.pid)
    assert workers, "the node has worker processes"
    node.kill()
    for pid in workers:
        wait_until(lambda pid=pid: process_gone(pid), 10, f"worker {pid} exits after its node")


@pytest.mark.timeout(60)
def test_connection_to_a_worker_that_died_while_idle_is_replaced(
    client: scatter.Client, node: LocalNode
) -> None:
    import os
    import signal

    client.publish(add)
    remote = client.make_callable("add")
    assert remote(1, 2) == 3
    for pid in _worker_pids(node.pid):
        os.kill(pid, signal.SIGKILL)
    time.sleep(1.2)  # the scenario: idle long enough that the pool looks before reusing
    assert remote(2, 3) == 5
    stats = client.statistics()
    # The dead worker's connection was noticed before sending, not after a send timeout.
    assert (stats.stale_connections_dropped, stats.undelivered_retries) == (1, 0)
    assert stats.leases == 2


@pytest.mark.timeout(60)
def test_second_node_on_the_same_data_dir_is_refused(node: LocalNode) -> None:
    second = LocalNode(node.data_dir)
    try:
        with pytest.raises(RuntimeError, match="is in use by the node pid"):
            second.start()
    finally:
        second.kill()
    with scatter.Client(node.address, autostart=False) as client:
        assert client.status().pid == node.pid


@pytest.mark.timeout(60)
def test_each_client_connection_gets_its_own_worker(node: LocalNode) -> None:
    # What lets CPU-bound calls from several clients use several cores, and keeps a hung
    # call from holding up anyone else's.
    clients = [scatter.Client(node.address, autostart=False) for _ in range(3)]
    try:
        clients[0].publish(add)
        for client in clients:
            assert client.make_callable("add")(1, 2) == 3
        endpoints = {client._idle[0].endpoint for client in clients}
        assert len(endpoints) == 3
        assert clients[0].status().leases == 3
    finally:
        for client in clients:
            client.close()
