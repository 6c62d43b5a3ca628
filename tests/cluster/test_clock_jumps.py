"""One node's wall clock jumps back and forward (libfaketime): the registry orders by vector
clocks, never by wall clocks, so what that node publishes is ordered as anywhere else.

If the registry ordered by the ``at`` a change carries (last writer wins by wall clock), a
version published on a node 3 h behind would lose to the one before it, and one published
3 h ahead would beat every version after it for 3 h. Both are checked on real nodes, the
skewed one started with libfaketime preloaded (cluster/faketime.py); ``created_at`` in
``versions()`` shows the skew really reached the registry.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import scatter
from cluster.faketime import faketime_env, faketime_unavailable, set_offset
from cluster.launch import LocalCluster, LocalNode, child_pids, kill_if_alive
from tests.waiting import wait_until

FAKETIME_UNAVAILABLE = faketime_unavailable()
HOURS = 3600

pytestmark = pytest.mark.skipif(
    bool(FAKETIME_UNAVAILABLE), reason=f"no clock jumps: {FAKETIME_UNAVAILABLE}"
)


def _body(tag: str) -> Callable[[], str]:
    def f() -> str:
        return tag

    return f


@pytest.fixture
def three_one_skewable(tmp_path: Path) -> Iterator[tuple[list[LocalNode], Path]]:
    """Three nodes; the third's wall clock follows ``offset`` (starts at +0)."""
    offset = tmp_path / "offset"
    set_offset(offset, 0)
    nodes: list[LocalNode] = []
    workers: list[int] = []
    try:
        for i in range(3):
            options = ["--profile", "local"]
            if nodes:
                options += ["--join", nodes[-1].address]
            env = faketime_env(offset) if i == 2 else {}
            nodes.append(LocalNode(tmp_path / f"node-{i}", options=options, env=env))
            nodes[-1].start()
            workers += child_pids(nodes[-1].pid)
        LocalCluster(tmp_path, 3, nodes=nodes).wait_until_joined(30)
        yield nodes, offset
    finally:
        for node in nodes:
            if node.process is not None and node.process.poll() is None:
                workers += child_pids(node.pid)
            node.stop()
        for pid in workers:  # a node's workers leave with it; any that did not, by PID
            kill_if_alive(pid)


def _publish(node: LocalNode, tag: str) -> int:
    with scatter.Client(node.address, autostart=False) as client:
        return client.publish(_body(tag), name="f").version


def _versions(node: LocalNode) -> list[dict[str, object]]:
    with scatter.Client(node.address, autostart=False) as client:
        return client.versions("f")


def _current_everywhere(nodes: list[LocalNode], version: int) -> None:
    def current(node: LocalNode) -> int | None:
        with scatter.Client(node.address, autostart=False) as client:
            try:
                return client.current_version("f")
            except scatter.FunctionNotFound:
                return None

    for node in nodes:
        wait_until(
            lambda node=node: current(node) == version,  # type: ignore[misc]
            20,
            f"{node.address} has f at version {version}",
        )


def _created_at(node: LocalNode, version: int) -> float:
    (row,) = [row for row in _versions(node) if row["version"] == version]
    return float(row["created_at"])  # type: ignore[arg-type]


@pytest.mark.timeout(120)
def test_versions_published_on_a_node_whose_clock_jumped_are_ordered_by_vector_clock(
    three_one_skewable: tuple[list[LocalNode], Path],
) -> None:
    nodes, offset = three_one_skewable
    first, second, skewed = nodes

    # 3 h behind: its new version must still become current, after the one it has seen.
    set_offset(offset, -3 * HOURS)
    assert _publish(first, "v1") == 1
    _current_everywhere(nodes, 1)
    assert _publish(skewed, "v2-behind") == 2
    _current_everywhere(nodes, 2)
    assert _created_at(first, 2) < _created_at(first, 1) - 2 * HOURS  # the skew is real

    # 3 h ahead: its version must not win over a later one made elsewhere.
    set_offset(offset, +3 * HOURS)
    assert _publish(skewed, "v3-ahead") == 3
    _current_everywhere(nodes, 3)
    assert _publish(second, "v4") == 4
    _current_everywhere(nodes, 4)
    assert _created_at(first, 3) > _created_at(first, 4) + 2 * HOURS
    with scatter.Client(skewed.address, autostart=False) as client:
        assert client.rollback("f") == 3  # a rollback made ahead is ordered like any other
    _current_everywhere(nodes, 3)

    # Healed: the clock is back; the next version through any member is current.
    set_offset(offset, 0)
    assert _publish(first, "v5") == 5
    _current_everywhere(nodes, 5)
    for node in nodes:
        with scatter.Client(node.address, autostart=False) as client:
            assert client.make_callable("f")() == "v5"

    def statuses() -> list[str]:
        found = []
        for node in nodes:
            with scatter.Client(node.address, autostart=False) as client:
                status = client.status()
            found.append(status.replica_hash if not status.pending_changes else "held")
        return found

    wait_until(
        lambda: len(set(statuses())) == 1 and statuses()[0] != "held",
        10,
        "one replica hash on every node",
    )
    assert _versions(second) == _versions(first) == _versions(skewed)


# Found by reading every wall-clock read in scatter/ for this nemesis: `scatter node status`
# shows uptime as the *client's* time.time() minus the node's wall-clock `started_at`.
# A node started while its clock was 3 h behind (then corrected, as NTP steps a clock)
# reports 3 h of uptime after a few seconds; one started ahead reports 0 s for hours, and a
# client on another machine adds its own skew. Ordering is not affected (the registry
# never reads `started_at`); the fix is an uptime measured by the node on its monotonic
# clock (NodeStatus.uptime, now).
@pytest.mark.timeout(60)
def test_node_status_uptime_does_not_jump_with_the_wall_clock(tmp_path: Path) -> None:
    offset = tmp_path / "offset"
    set_offset(offset, -3 * HOURS)
    node = LocalNode(tmp_path / "node", options=["--profile", "local"], env=faketime_env(offset))
    node.start()
    workers = child_pids(node.pid)
    try:
        set_offset(offset, 0)  # the clock is put right, seconds after the start
        shown = subprocess.run(
            [sys.executable, "-m", "scatter", "--address", node.address, "node", "status"],
            capture_output=True,
            text=True,
            timeout=30,
            env=dict(os.environ, SCATTER_AUTOSTART="0"),
        )
        (uptime,) = [line for line in shown.stdout.splitlines() if line.startswith("uptime")]
        assert "h" not in uptime.removeprefix("uptime"), uptime  # up for seconds, not "3h 0m 2s"
    finally:
        workers += child_pids(node.pid) if node.process and node.process.poll() is None else []
        node.stop()
        for pid in workers:
            kill_if_alive(pid)
