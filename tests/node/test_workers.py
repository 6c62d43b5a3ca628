"""Worker processes live as long as their node, and no longer."""

from __future__ import annotations

import os
import signal
import time

import pytest

import scatter
from cluster.launch import LocalNode, child_pids, process_gone
from scatter._client import _IDLE_CHECK_AFTER
from tests.waiting import holds_for, wait_until


def add(a: int, b: int) -> int:
    return a + b


def worker_pid() -> int:
    return os.getpid()




@pytest.mark.timeout(60)
def test_workers_outlive_the_spawning_thread(client: scatter.Client, node: LocalNode) -> None:
    # Workers once died 10 s after start: PR_SET_PDEATHSIG follows the thread that
    # spawned them, and trio's process-spawning thread exits after 10 s idle. The scenario
    # is time passing, so the test watches the workers for longer than that.
    client.publish(worker_pid)
    remote = client.make_callable("worker_pid")
    serving = remote()
    workers = child_pids(node.pid)
    assert serving in workers
    holds_for(
        lambda: all(not process_gone(pid) for pid in workers),
        12.5,
        f"every worker of the node ({workers}) is alive",
    )
    assert remote() == serving  # the same process still answers on the same connection


@pytest.mark.timeout(60)
def test_workers_exit_when_their_node_is_killed(client: scatter.Client, node: LocalNode) -> None:
    client.publish(add)
    assert client.make_callable("add")(1, 2) == 3
    workers = child_pids(node.pid)
    assert workers, "the node has worker processes"
    node.kill()
    for pid in workers:
        wait_until(lambda pid=pid: process_gone(pid), 10, f"worker {pid} exits after its node")


@pytest.mark.timeout(60)
def test_connection_to_a_worker_that_died_while_idle_is_replaced(
    client: scatter.Client, node: LocalNode
) -> None:
    client.publish(add)
    remote = client.make_callable("add")
    assert remote(1, 2) == 3
    last_call = time.monotonic()
    workers = child_pids(node.pid)
    for pid in workers:
        os.kill(pid, signal.SIGKILL)
    for pid in workers:
        wait_until(lambda pid=pid: process_gone(pid), 10, f"worker {pid} dies")
    # The scenario: the connection sat idle past the point where the client looks at it
    # before reuse (the client's own threshold, whatever it is).
    wait_until(
        lambda: time.monotonic() - last_call > _IDLE_CHECK_AFTER,
        _IDLE_CHECK_AFTER + 10,
        "the connection has been idle long enough to be checked",
    )
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
        clients[0].publish(worker_pid)
        pids = {client.make_callable("worker_pid")() for client in clients}
        assert len(pids) == 3, pids
        assert clients[0].status().leases == 3
    finally:
        for client in clients:
            client.close()
