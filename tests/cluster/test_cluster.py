"""Real clusters on loopback: membership, replication, catch-up and conflicts."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import scatter
from cluster.launch import LocalCluster, LocalNode
from tests.waiting import holds_for, wait_until

ROOT = Path(__file__).resolve().parents[2]
# A grace of 3 s, compaction after every stable change: history bounded within a test.
FAST_HISTORY = {"SCATTER_HISTORY_GRACE": "3", "SCATTER_COMPACT_AFTER": "1"}


def add(a: int, b: int) -> int:
    return a + b


def _add_v2() -> object:
    def add(a: int, b: int) -> int:
        return a + b + 100

    return add


def client(node: LocalNode) -> scatter.Client:
    return scatter.Client(node.address, autostart=False)


def _current(node: LocalNode, name: str) -> int | None:
    with client(node) as c:
        try:
            return c.current_version(name)
        except scatter.FunctionNotFound:
            return None


def _everywhere(nodes: list[LocalNode], name: str, version: int | None, timeout: float = 20.0) -> None:
    for node in nodes:
        wait_until(
            lambda node=node: _current(node, name) == version,
            timeout,
            f"{node.address} has {name} at version {version}",
        )


def _state_of(observer: LocalNode, victim: LocalNode) -> str:
    with client(observer) as c:
        found = [m["state"] for m in c.members() if m["address"] == victim.address]
    return found[0] if found else "unknown"


@pytest.fixture
def five(tmp_path: Path) -> Iterator[LocalCluster]:
    with LocalCluster(tmp_path, 5) as cluster:
        yield cluster


@pytest.mark.timeout(120)
def test_changes_through_any_member_reach_every_member(five: LocalCluster) -> None:
    nodes = five.nodes
    with client(nodes[0]) as first:
        first.publish(add)
        first.publish(_add_v2(), name="add")  # type: ignore[arg-type]
    _everywhere(nodes, "add", 2)
    with client(nodes[4]) as last:
        assert last.make_callable("add")(1, 2) == 103  # the body came along, checked
    with client(nodes[2]) as third:
        assert third.rollback("add") == 1
    _everywhere(nodes, "add", 1)
    with client(nodes[4]) as last:
        assert last.make_callable("add")(1, 2) == 3
    with client(nodes[3]) as fourth:
        fourth.vaporize("add")
    _everywhere(nodes, "add", None)


@pytest.mark.timeout(150)
def test_a_frozen_node_and_a_killed_node_catch_up_and_nothing_vaporized_returns(
    five: LocalCluster,
) -> None:
    nodes = five.nodes
    frozen, killed = nodes[1], nodes[3]
    with client(nodes[0]) as first:
        first.publish(add)
        first.publish(_add_v2(), name="gone")  # type: ignore[arg-type]
    _everywhere(nodes, "gone", 1)
    frozen.pause()
    killed.kill()
    try:
        with client(nodes[2]) as third:
            third.publish(_add_v2(), name="add")  # type: ignore[arg-type]
            third.vaporize("gone")
    finally:
        frozen.resume()
    restarted = LocalNode(killed.data_dir, port=killed.port, options=killed.options).start()
    five.nodes[3] = restarted
    _everywhere(five.nodes, "add", 2)
    _everywhere(five.nodes, "gone", None)
    # And it stays gone: no anti-entropy round brings it back from anyone.
    holds_for(lambda: _current(restarted, "gone") is None, 2.0, "gone stays vaporized")
    with client(restarted) as again:
        assert again.make_callable("add")(1, 1) == 102


@pytest.mark.timeout(120)
def test_a_killed_member_is_declared_dead_and_a_briefly_frozen_one_refutes(
    tmp_path: Path,
) -> None:
    # The LAN profile: suspicion lasts at least 4 s, so a 1.5 s freeze is survivable.
    with LocalCluster(tmp_path, 4, profile="lan") as cluster:
        nodes = cluster.nodes
        frozen = nodes[2]
        frozen.pause()
        wait_until(
            lambda: _state_of(nodes[0], frozen) == "suspect" or _state_of(nodes[1], frozen) == "suspect",
            10,
            "the frozen member is suspected",
        )
        frozen.resume()
        for observer in (nodes[0], nodes[1], nodes[3]):
            wait_until(
                lambda observer=observer: _state_of(observer, frozen) == "alive",
                15,
                f"{observer.address} sees the resumed member alive",
            )
        with client(frozen) as c:
            me = next(m for m in c.members() if m["address"] == frozen.address)
        assert me["incarnation"] & 0xFFFFFFFF >= 1  # it refuted: a higher incarnation
        victim = nodes[3]
        victim.kill()
        for observer in nodes[:3]:
            wait_until(
                lambda observer=observer: _state_of(observer, victim) == "dead",
                30,
                f"{observer.address} declares the killed member dead",
            )


@pytest.mark.timeout(120)
def test_concurrent_changes_on_two_nodes_converge_and_show_the_conflict(tmp_path: Path) -> None:
    a = LocalNode(tmp_path / "a", options=["--profile", "local"]).start()
    b = LocalNode(tmp_path / "b", options=["--profile", "local"]).start()
    try:
        with client(a) as on_a, client(b) as on_b:  # neither knows of the other yet
            on_a.publish(add)
            on_b.publish(_add_v2(), name="add")  # type: ignore[arg-type]
        b.stop()
        b = LocalNode(b.data_dir, port=b.port, options=["--profile", "local", "--join", a.address])
        b.start()
        wait_until(
            lambda: all(len(_versions(n)) == 2 for n in (a, b)), 20, "both hold both versions"
        )
        history_a, history_b = _versions(a), _versions(b)
        assert history_a == history_b  # one deterministic rule, the same everywhere
        assert [v["conflict"] for v in history_a] == [False, True]  # the moved one shows it
        assert _current(a, "add") == _current(b, "add") == 2
        result = subprocess.run(
            [sys.executable, "-m", "scatter", "--address", a.address, "versions", "add"],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
            env={**os.environ, "COLUMNS": "200"},
        )
        assert result.returncode == 0, result.stderr
        assert "proposed as v1, renumbered" in result.stdout
    finally:
        a.stop()
        b.stop()


def _versions(node: LocalNode) -> list[dict[str, object]]:
    with client(node) as c:
        try:
            return [
                {k: v for k, v in row.items() if k in ("version", "conflict", "content_id", "origin")}
                for row in c.versions("add")
            ]
        except scatter.FunctionNotFound:
            return []


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "scatter", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )


@pytest.mark.timeout(120)
def test_join_status_and_leave_from_the_command_line(tmp_path: Path) -> None:
    first = LocalNode(tmp_path / "first", options=["--profile", "local"]).start()
    second = LocalNode(tmp_path / "second")  # only for its port and directory
    pid = None
    try:
        host_port = first.address.removeprefix("tcp://")
        joined = _cli(
            "node", "join", host_port, "--address", second.address,
            "--data-dir", str(second.data_dir), "--profile", "local", "--background",
        )
        assert joined.returncode == 0, joined.stderr
        pid = int(joined.stdout.split("pid ")[1].split(",")[0])
        wait_until(lambda: _state_of(first, second) == "alive", 20, "the joined node is alive")
        status = _cli("--address", first.address, "node", "status")
        assert status.returncode == 0, status.stderr
        assert second.address in status.stdout and "alive" in status.stdout
        left = _cli("--address", second.address, "node", "leave")
        assert left.returncode == 0, left.stderr
        assert "left its cluster" in left.stdout
        # Gone for good: forgotten by the member, out of its table.
        wait_until(lambda: _state_of(first, second) == "unknown", 20, "the member is gone")
    finally:
        if pid is not None:
            from cluster.launch import kill_if_alive

            kill_if_alive(pid)
        first.stop()


@pytest.mark.timeout(90)
def test_a_peer_with_another_secret_gets_nothing_through(tmp_path: Path) -> None:
    member = LocalNode(tmp_path / "member", options=["--profile", "local"]).start()
    stranger = LocalNode(
        tmp_path / "stranger",
        options=["--profile", "local", "--join", member.address],
        env={"SCATTER_SECRET": "another-cluster-secret-entirely-0123456789"},
    )
    stranger.start()
    try:
        with client(member) as c:
            c.publish(add)
            holds_for(
                lambda: [m["address"] for m in c.members()] == [member.address],
                3.0,
                "the stranger never becomes a member",
            )
            assert c.make_callable("add")(2, 2) == 4  # and the member serves on
        assert "refused a client" in member.log()
    finally:
        stranger.stop()
        member.stop()


def _dead_to(others: list[LocalNode], gone: LocalNode) -> None:
    """Until ``gone`` is dead to every one of ``others``: a change made after that is
    pushed to live members only, so none waits queued for its return (it would arrive
    as changes when it restarts, not through the full state transfer under test)."""
    for node in others:
        wait_until(lambda node=node: _state_of(node, gone) == "dead", 30, f"{gone.address} is dead")


def _compacted_past_the_grace(stayed: list[LocalNode], changes: int) -> None:
    for node in stayed:
        with client(node) as c:
            wait_until(
                lambda c=c: c.status().compacted_changes >= changes,
                60,
                "the nodes that stayed compact without the killed one, once past the grace",
            )


def _restarted(gone: LocalNode) -> LocalNode:
    """``gone`` started again from its data directory, on its port, as it was."""
    return LocalNode(gone.data_dir, port=gone.port, options=gone.options, env=gone.env).start()


@pytest.mark.timeout(150)
def test_a_node_back_after_the_history_grace_catches_up_and_nothing_comes_back(
    tmp_path: Path,
) -> None:
    # A grace of 3 s and compaction after every stable change: the two that stay fold
    # their history without the killed one, which then lies below their snapshot.
    env = FAST_HISTORY
    with LocalCluster(tmp_path, 3, env=env) as three:
        nodes = three.nodes
        gone = nodes[2]
        with client(gone) as third:
            third.publish(add)
            third.publish(_add_v2(), name="doomed")  # type: ignore[arg-type]
        _everywhere(nodes, "doomed", 1)
        gone.kill()
        _dead_to(nodes[:2], gone)
        with client(nodes[0]) as first:
            first.publish(_add_v2(), name="add")  # type: ignore[arg-type]
            first.vaporize("doomed")
        _compacted_past_the_grace(nodes[:2], 4)
        restarted = nodes[2] = _restarted(gone)
        _everywhere(nodes, "add", 2)
        _everywhere(nodes, "doomed", None)
        holds_for(lambda: _current(restarted, "doomed") is None, 2.0, "doomed stays vaporized")
        with client(restarted) as again:
            # It lies below their snapshot (the changes were made once it was dead to
            # both, so none was queued for it): a member sends it a full state transfer
            # at its first digest.
            assert again.status().compacted_changes >= 4
            assert again.make_callable("add")(1, 1) == 102


def _scaled(factor: int) -> object:
    def scaled(x: int) -> int:
        return x * factor

    return scaled


def _settled(nodes: list[LocalNode]) -> bool:
    """Every node holds the same replica, with every live version's body."""
    statuses = []
    for node in nodes:
        with client(node) as c:
            statuses.append(c.status())
    return len({s.replica_hash for s in statuses}) == 1 and not any(
        s.missing_bodies or s.pending_changes for s in statuses
    )


@pytest.mark.timeout(150)
def test_bodies_that_do_not_fit_one_message_come_in_parts(tmp_path: Path) -> None:
    # One body per node-to-node message: a set's publish (one change, six bodies), then
    # a full state transfer (a node back after the grace) each need several; the
    # receivers ask for the rest (PeerBodiesWanted). Before, a transfer was one frame:
    # past 64 MiB or 4,096 bodies it never arrived.
    env = {
        "SCATTER_MAX_PUSH_BYTES": "1",
        "SCATTER_HISTORY_GRACE": "3",
        "SCATTER_COMPACT_AFTER": "1",
    }
    with LocalCluster(tmp_path, 3, env=env) as three:
        nodes = three.nodes
        kit = scatter.FunctionSet("kit", address=nodes[0].address)
        for factor in range(2, 8):
            kit.function(_scaled(factor), name=f"times{factor}")  # type: ignore[arg-type]
        kit.publish()
        wait_until(lambda: _settled(nodes), 30, "every node holds the set's six bodies")
        gone = nodes[2]
        gone.kill()
        _dead_to(nodes[:2], gone)
        with client(nodes[0]) as first:
            for factor in range(10, 16):
                first.publish(_scaled(factor), name=f"times{factor}")  # type: ignore[arg-type]
        _compacted_past_the_grace(nodes[:2], 7)
        restarted = nodes[2] = _restarted(gone)
        wait_until(lambda: _settled(nodes), 60, "the node back holds every body")
        with client(restarted) as again:
            assert again.status().compacted_changes >= 7  # it took the transfer
            for factor in [*range(2, 8), *range(10, 16)]:
                assert again.make_callable(f"times{factor}")(3) == 3 * factor
        assert "have no body" not in restarted.log()


def _unconfirmed(node: LocalNode) -> int:
    with client(node) as c:
        return c.status().unconfirmed_changes


@pytest.mark.timeout(150)
def test_a_member_gone_for_good_is_forgotten_and_refused_when_it_comes_back(
    tmp_path: Path,
) -> None:
    # A grace of 3 s, compaction after every stable change: what the two that stay fold
    # once the third is dead past the grace, they keep for it (unconfirmed) until it is
    # forgotten; then nothing.
    env = FAST_HISTORY
    with LocalCluster(tmp_path, 3, env=env) as three:
        nodes = three.nodes
        gone, stayed = nodes[2], nodes[:2]
        with client(gone) as third:
            gone_id = third.status().node_id
            third.publish(add)
        _everywhere(nodes, "add", 1)
        with client(stayed[1]) as second:
            second_id = second.status().node_id
        refused = _cli("--address", stayed[0].address, "node", "forget", second_id)
        assert refused.returncode != 0 and "not dead or gone" in refused.stderr, refused
        gone.kill()
        _dead_to(stayed, gone)
        with client(stayed[0]) as first:
            first.publish(_add_v2(), name="add")  # type: ignore[arg-type]
        for node in stayed:
            wait_until(lambda node=node: _unconfirmed(node) > 0, 60, "kept for the dead member")
        forgot = _cli("--address", stayed[0].address, "node", "forget", gone_id)
        assert forgot.returncode == 0, forgot.stderr
        with client(stayed[1]) as second:
            second.rollback("add")  # one more change to fold, the forget with it
        for node in stayed:
            wait_until(lambda node=node: _unconfirmed(node) == 0, 60, "nothing kept any more")
            with client(node) as c:
                status = c.status()
                assert status.forgotten == [gone_id]
                assert gone.address not in [m["address"] for m in status.members]
        shown = _cli("--address", stayed[1].address, "node", "status")
        assert f"forgotten for good: {gone_id}" in shown.stdout, shown.stdout
        # Back from its old data directory after all (its operator was wrong): refused,
        # told so, and from then on it refuses changes itself.
        back = nodes[2] = _restarted(gone)
        wait_until(lambda: "the cluster forgot this node" in back.log(), 30, "it is told")
        with client(back) as again:
            with pytest.raises(scatter.ScatterError, match="forgot this node"):
                again.publish(_scaled(7), name="stray")  # type: ignore[arg-type]
            assert again.status().forgotten_by in (
                client(stayed[0]).status().node_id,
                second_id,
            )
        holds_for(
            lambda: all(_state_of(node, back) == "unknown" for node in stayed),
            3.0,
            "the forgotten member stays out",
        )


@pytest.mark.timeout(150)
def test_a_node_that_leaves_hands_its_changes_over_and_starts_afresh(tmp_path: Path) -> None:
    env = FAST_HISTORY
    with LocalCluster(tmp_path, 3, env=env) as three:
        nodes = three.nodes
        leaving, stayed = nodes[2], nodes[:2]
        with client(leaving) as third:
            left_id = third.status().node_id
            third.publish(add)
        left = _cli("--address", leaving.address, "node", "leave")
        assert left.returncode == 0, left.stderr
        leaving.stop()  # exited already (the CLI waits for it): reaped
        for node in stayed:
            assert _current(node, "add") == 1  # handed over before it went
            with client(node) as c:
                wait_until(lambda c=c: c.status().forgotten == [left_id], 30, "forgotten")
        with client(stayed[0]) as first:
            first.publish(_add_v2(), name="add")  # type: ignore[arg-type]
        for node in stayed:
            wait_until(lambda node=node: _unconfirmed(node) == 0, 30, "nothing kept for it")
        # Started again from its data directory: a new node, that catches up.
        again = nodes[2] = _restarted(leaving)
        assert "left its cluster for good" in again.log()
        with client(again) as c:
            assert c.status().node_id != left_id
        _everywhere(nodes, "add", 2, timeout=30.0)
        wait_until(lambda: _state_of(stayed[0], again) == "alive", 30, "the new node is a member")
