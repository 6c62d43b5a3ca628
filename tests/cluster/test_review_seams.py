"""Review of the seams between forwarding, read your writes and failover (issue 10).

Each test runs real node processes on loopback, bounded in time, stopped by PID.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import scatter
from cluster.launch import LocalCluster, LocalNode, process_gone
from tests.cluster.test_forwarding import MODULE, _publish_by_reference, _write_module
from tests.waiting import wait_until

GOSSIP_OFF = {"SCATTER_TEST_REGISTRY_GOSSIP": "0"}


def client(node: LocalNode) -> scatter.Client:
    return scatter.Client(node.address, autostart=False)


@pytest.fixture
def module_dir(tmp_path: Path) -> Iterator[Path]:
    directory = tmp_path / "only-b"
    _write_module(directory)
    yield directory
    sys.modules.pop(MODULE, None)


def _needing_the_module(directory: Path, plus: int) -> Callable[[int], int]:
    """A function whose body needs ``MODULE`` to load: only B can run it."""
    sys.path.insert(0, str(directory))
    try:
        module = importlib.import_module(MODULE)
    finally:
        sys.path.remove(str(directory))

    def triple(x: int) -> int:
        return int(module.triple(x)) + plus

    return triple


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def _two(root: Path, env_a: dict[str, str], env_b: dict[str, str]) -> LocalCluster:
    a = LocalNode(root / "a", options=["--profile", "local"], env=env_a)
    cluster = LocalCluster(root, 2, nodes=[a])
    try:
        a.start()
        b = LocalNode(root / "b", options=["--profile", "local", "--join", a.address], env=env_b)
        cluster.nodes.append(b)
        b.start()
        cluster.wait_until_joined(30)
    except BaseException:
        cluster.stop()
        raise
    return cluster


@pytest.mark.timeout(120)
def test_a_routed_call_after_this_process_changed_the_function_runs_the_change(
    tmp_path: Path, module_dir: Path
) -> None:
    # Forwarding x read your writes: a callable whose calls go straight to member B's
    # worker (a route) must see this process's later change made through its node A,
    # even when B has not received it yet (gossip off: B gets it only by a pull).
    path = os.pathsep.join(filter(None, [str(module_dir), os.environ.get("PYTHONPATH", "")]))
    cluster = _two(tmp_path, GOSSIP_OFF, {**GOSSIP_OFF, "PYTHONPATH": path})
    try:
        a, b = cluster.nodes
        with client(b) as through_b, client(a) as through_a:
            _publish_by_reference(through_b, _needing_the_module(module_dir, 0), "triple")
            triple = through_a.make_callable("triple")  # A pulls v1 for this read
            assert triple(14) == 42  # A cannot load it: routed to B's worker
            version = _publish_by_reference(
                through_a, _needing_the_module(module_dir, 1000), "triple"
            )
            assert version == 2
            # This process made v2; read your writes: the next call runs v2 (B can pull it
            # from A; A cannot load it), never v1 silently.
            assert triple(14) == 1042
    finally:
        cluster.stop()


def _appending_then_raising(path: str) -> Callable[[str], int]:
    def record(marker: str) -> int:
        import scatter as s

        with open(path, "a") as out:
            out.write(marker + "\n")
        # As a scattered function that calls another one whose pinned version is gone:
        # the function's own exception, raised after it ran.
        raise s.VersionNotFound(f"{marker}: the version it needed was vaporized")

    return record


@pytest.mark.timeout(120)
def test_a_function_that_raises_version_not_found_runs_once_and_raises_it(
    tmp_path: Path,
) -> None:
    # Forwarding x at most once: the function's own exception, rebuilt on the caller as
    # scatter.VersionNotFound, is not a worker's refusal: the call ran, and is never sent
    # again through a route to another member.
    ran = tmp_path / "ran.txt"
    with LocalCluster(tmp_path / "c", 2) as cluster:
        a, _b = cluster.nodes
        with client(a) as through_a:
            through_a.publish(_appending_then_raising(str(ran)), name="record")  # type: ignore[arg-type]
            record = through_a.make_callable("record")
            with pytest.raises(scatter.RemoteError) as caught:
                record("once")
        assert ran.read_text().splitlines() == ["once"]
        assert "the version it needed was vaporized" in str(caught.value)
        assert "cannot run on any member" not in str(caught.value)


@pytest.mark.timeout(120)
def test_a_route_to_a_member_killed_since_fails_over_the_member_not_the_callers_node(
    tmp_path: Path, module_dir: Path
) -> None:
    # Forwarding x failover: a routed callable whose member B is SIGKILLed. Its next call
    # was never delivered (B's worker is gone), so it leases again through node A, which
    # forwards to B (still alive in A's table for a moment). A must move on once B is
    # declared dead, not wait 10 s for B and let the call time out blaming A ("it is
    # stopped, or very busy") while A is fine.
    path = os.pathsep.join(filter(None, [str(module_dir), os.environ.get("PYTHONPATH", "")]))
    cluster = _two(tmp_path, {}, {"PYTHONPATH": path})
    try:
        a, b = cluster.nodes
        with client(b) as through_b, client(a) as through_a:
            _publish_by_reference(through_b, _needing_the_module(module_dir, 0), "triple")
            triple = through_a.make_callable("triple")
            assert triple(14) == 42  # routed to B's worker
            workers = _children(b.pid)
            b.kill()
            for pid in workers:  # they exit on their pipe's EOF
                wait_until(lambda pid=pid: process_gone(pid), 10, f"B's worker {pid} exits")
            with pytest.raises(scatter.ScatterError) as caught:
                try:
                    triple.call(14, timeout=8)
                except scatter.WorkerCrashed:  # sent before the disconnect was seen
                    triple.call(14, timeout=8)
            assert not isinstance(caught.value, scatter.CallTimeout), caught.value
            assert "cannot run on any member" in str(caught.value)
    finally:
        cluster.stop()
