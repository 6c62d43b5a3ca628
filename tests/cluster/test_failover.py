"""Clients in a cluster (issue 10, item 4): a client learns its node's members and fails
over to another live member when its node is unreachable before a request was delivered.

Real 3-node loopback clusters (``LocalCluster``, stopped by PID); a node is SIGKILLed
(``LocalNode.kill``), and its workers, which exit once their node is gone, are waited for
and killed by PID if they linger.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import scatter
from cluster.launch import LocalCluster, LocalNode, child_pids, kill_if_alive, process_gone
from scatter._cli import app
from tests.waiting import wait_until


def add(a: int, b: int) -> int:
    return a + b


def ticks(n: int) -> Iterator[int]:
    import time

    for i in range(n):
        time.sleep(0.05)
        yield i


def _add_ten(a: int, b: int) -> int:
    return a + b + 10


@pytest.fixture
def three(tmp_path: Path) -> Iterator[LocalCluster]:
    with LocalCluster(tmp_path, 3) as cluster:
        yield cluster


def _holds(node: LocalNode, name: str, version: int) -> bool:
    with scatter.Client(node.address, autostart=False) as c:
        try:
            return c.current_version(name) >= version
        except scatter.FunctionNotFound:
            return False


def _kill_with_its_workers(node: LocalNode) -> None:
    workers = child_pids(node.pid)
    node.kill()
    try:
        wait_until(lambda: all(process_gone(w) for w in workers), 15, "the workers exit")
    finally:
        for worker in workers:
            kill_if_alive(worker)


@pytest.mark.timeout(120)
def test_a_client_holding_callables_keeps_calling_through_another_member_after_its_node_is_killed(
    three: LocalCluster, caplog: pytest.LogCaptureFixture
) -> None:
    a, b, c = three.nodes
    caplog.set_level(logging.WARNING, logger="scatter.client")
    # Given only A's address: it learns the other members from A.
    with scatter.Client(a.address, autostart=False) as client:
        client.publish(add)
        client.publish(ticks)
        for node in (b, c):
            wait_until(lambda node=node: _holds(node, "ticks", 1), 20, f"{node.address} has ticks")
        remote_add = client.make_callable("add")
        remote_ticks = client.make_callable("ticks")
        assert remote_add(1, 2) == 3
        assert [m["address"] for m in client.members() if m["in_use"]] == [a.address]
        in_flight = remote_ticks(1000)  # a stream on one of A's workers
        assert next(in_flight) == 0

        _kill_with_its_workers(a)

        # The call in flight on the dead node: a clear error, which says it may have run.
        with pytest.raises(scatter.WorkerCrashed, match="may have run"):
            for _ in in_flight:
                pass
        # Later calls, through the callables made before: another member runs them.
        assert [remote_add(i, 1) for i in range(20)] == [i + 1 for i in range(20)]
        assert list(remote_ticks(3)) == [0, 1, 2]
        assert list(remote_add.map(range(5), range(5))) == [0, 2, 4, 6, 8]
        assert client.address_in_use in (b.address, c.address)
        assert client.failed_over_from == a.address
        # Control requests too: a change through the new member, seen by the next call
        # (the process's session clock came along).
        client.publish(_add_ten, name="add")  # type: ignore[arg-type]
        assert remote_add(1, 2) == 13
        assert client.make_callable("add")(2, 2) == 14
        in_use = [m["address"] for m in client.members() if m["in_use"]]
        assert in_use == [client.address_in_use]
    failovers = [r for r in caplog.records if r.name == "scatter.client"]
    assert len(failovers) == 1, [r.getMessage() for r in failovers]  # once, not per call
    assert a.address in failovers[0].getMessage()


@pytest.mark.timeout(120)
def test_connect_with_several_addresses_uses_a_live_one_and_node_status_says_which(
    three: LocalCluster, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    a, b, c = three.nodes
    _kill_with_its_workers(a)
    addresses = [a.address, b.address, c.address]
    client = scatter.connect(addresses)
    try:
        assert not client.config.autostart  # several addresses never start a node
        assert client.address == ",".join(addresses)  # what a pickled callable carries
        scatter.scatter(add)
        assert scatter.make_callable("add")(2, 3) == 5
        assert client.address_in_use == b.address
        assert client.failed_over_from == a.address
    finally:
        client.close()
    result = CliRunner().invoke(
        app, ["--address", ",".join(addresses), "node", "status"], env={"COLUMNS": "200"}
    )
    assert result.exit_code == 0, result.output
    assert re.search(
        rf"client uses\s+{re.escape(b.address)} \(failed over from {re.escape(a.address)}",
        result.output,
    ), result.output


@pytest.mark.timeout(60)
def test_a_change_that_may_have_reached_a_killed_node_is_not_sent_again(
    tmp_path: Path,
) -> None:
    # A node that reads a request and dies before it answers: a change sent there may
    # have been made, so the client does not send it to another member.
    from scatter import _wire

    cluster = LocalCluster(tmp_path, 2)
    cluster.start()
    try:
        a, b = cluster.nodes
        with scatter.Client(a.address, autostart=False) as client:
            connected, paused = threading.Event(), threading.Event()
            outcome: list[BaseException] = []

            def change() -> None:
                # Control sockets are per thread: this one's connection is up (a
                # handshake done) before the node stops reading, so the change leaves
                # on a live connection and may reach the node.
                client.status()
                connected.set()
                paused.wait(20)
                try:
                    client.request(lambda i: _wire.Rollback(i, "nothing", None), timeout=10)
                except BaseException as exc:
                    outcome.append(exc)

            thread = threading.Thread(target=change, daemon=True)
            thread.start()
            assert connected.wait(20)
            a.pause()  # it reads nothing more; killed below while the change waits
            paused.set()
            time.sleep(0.3)  # the request leaves (the kernel takes it for the paused node)
            _kill_with_its_workers(a)
            thread.join(20)
            assert outcome and isinstance(outcome[0], scatter.Unreachable), outcome
            assert "may have been made" in str(outcome[0])
            assert client.address_in_use == a.address  # not moved for it
            # A read afterwards moves on.
            assert client.status().address == b.address
    finally:
        cluster.stop()
