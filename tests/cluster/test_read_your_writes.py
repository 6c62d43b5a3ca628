"""Read your writes on any node (the calls issue, item 2), on real 3-node loopback clusters.

Every node runs with the test hook ``SCATTER_TEST_REGISTRY_GOSSIP=0``: no node pushes
its changes, gossips them or starts anti-entropy, so a change made through node A reaches
node C only when C pulls it, because a client showed C a registry clock C lacks. Without
read your writes, C would not hear of it for as long as a test runs: node B, through
which nobody reads, never does (each test checks that, so none passes by gossip).
"""

from __future__ import annotations

import os
import select
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import scatter
from cluster.launch import LocalCluster, LocalNode, kill_if_alive
from scatter import _wire
from scatter._client._control import _READS
from scatter._client._session import SESSION
from scatter._core._vclock import VectorClock

GOSSIP_OFF = {"SCATTER_TEST_REGISTRY_GOSSIP": "0"}


def client(node: LocalNode) -> scatter.Client:
    return scatter.Client(node.address, autostart=False)


def _adding(value: int) -> Callable[[int], int]:
    def plus(x: int) -> int:
        return x + value

    return plus


@pytest.fixture
def three(tmp_path: Path) -> Iterator[LocalCluster]:
    with LocalCluster(tmp_path, 3, env=GOSSIP_OFF) as cluster:
        yield cluster


def _changes_held(node: LocalNode) -> int:
    # Status carries no clock: it never makes a node pull.
    with client(node) as c:
        return c.status().changes


@pytest.mark.timeout(300)
def test_scatter_through_a_and_call_through_c_200_times_in_a_row(three: LocalCluster) -> None:
    a, b, c = three.nodes
    with client(a) as on_a, client(c) as on_c:
        on_a.publish(_adding(0), name="follow")
        following = on_c.make_callable("follow")  # made before every update below
        for i in range(200):
            # A new name, described and called through C at once: FunctionNotFound
            # unless C pulls the change the client saw.
            on_a.publish(_adding(i), name=f"fresh_{i}")
            assert on_c.make_callable(f"fresh_{i}")(1) == 1 + i, i
            # A new body of a name C knows: a callable made earlier runs the new one,
            # through a worker connection C leased long ago.
            on_a.publish(_adding(1000 + i), name="follow")
            assert following(1) == 1001 + i, i
    assert _changes_held(b) == 0  # no gossip: C learned all of it through its pulls
    assert _changes_held(c) == 401


@pytest.mark.timeout(180)
def test_describe_versions_and_calls_through_c_see_a_rollback_and_a_vaporize_through_a(
    three: LocalCluster,
) -> None:
    a, b, c = three.nodes
    with client(a) as on_a, client(c) as on_c:
        on_a.publish(_adding(1), name="h")
        on_a.publish(_adding(2), name="h")
        assert on_a.rollback("h") == 1
        assert on_c.current_version("h") == 1
        assert on_c.describe("h").version == 1
        assert [(row["version"], row["current"]) for row in on_c.versions("h")] == [
            (1, True),
            (2, False),
        ]
        h = on_c.make_callable("h")
        assert h(10) == 11
        assert on_a.rollback("h", to=2) == 2
        assert h(10) == 12  # the call itself sees the rollback
        assert [(row["name"], row["version"]) for row in on_c.functions()] == [("h", 2)]
        on_a.vaporize("h")
        with pytest.raises(scatter.FunctionNotFound, match="vaporized"):
            on_c.versions("h")
        with pytest.raises(scatter.FunctionNotFound, match="vaporized"):
            h(10)
        assert on_c.functions() == []
    assert _changes_held(b) == 0


@pytest.mark.timeout(180)
def test_a_change_whose_node_died_before_anyone_pulled_it_costs_the_bound_and_says_so(
    three: LocalCluster,
) -> None:
    a, b, c = three.nodes
    with client(a) as on_a, client(c) as on_c:
        on_a.publish(_adding(1), name="kept")
        kept = on_c.make_callable("kept")  # C pulled "kept"
        on_a.publish(_adding(2), name="lost")
        a.kill()  # nobody else holds "lost", and nobody ever will
        with pytest.raises(scatter.FunctionNotFound) as lost:
            on_c.describe("lost")
        message = str(lost.value)
        assert "no function named 'lost'" in message
        assert "had not yet received 1 registry change(s) the client has seen" in message
        assert "waited 2.0 s for them" in message
        # A call lets the node catch up once, gives up at the bound, and runs what C has;
        # later calls do not wait again for the same change.
        assert kept(1) == 2
        assert "had not yet received" in on_c._control.lagging
        assert on_c._control.settled == SESSION.generation
        assert kept(2) == 3
    assert _changes_held(b) == 0


def _read_from_child(read_end: int, pid: int, timeout: float) -> str:
    """What the forked child wrote before exiting; AssertionError if it said nothing."""
    deadline = time.monotonic() + timeout
    chunks = []
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"the forked child {pid} said nothing in {timeout:g} s (hung)")
        ready, _, _ = select.select([read_end], [], [], left)
        if ready:
            chunk = os.read(read_end, 4096)
            if not chunk:
                return b"".join(chunks).decode()
            chunks.append(chunk)


@pytest.mark.timeout(180)
def test_every_client_of_a_process_reads_what_any_of_them_wrote(three: LocalCluster) -> None:
    a, b, c = three.nodes
    with client(a) as writer:
        writer.publish(_adding(7), name="shared")

    # Another Client object, made afterwards, in another thread, through another node.
    def read_through_c() -> int:
        with client(c) as reader:
            result: int = reader.make_callable("shared")(1)
            return result

    with ThreadPoolExecutor(1) as threads:
        assert threads.submit(read_through_c).result(timeout=60) == 8

    # The module-level API's default client, through the third node.
    default = scatter.connect(b.address, autostart=False)
    try:
        assert scatter.make_callable("shared")(2) == 9
        assert scatter.current_version("shared") == 1
    finally:
        default.close()

    # A forked child has seen what its parent saw.
    with client(a) as writer:
        writer.publish(_adding(40), name="forked")
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report, and never return into pytest
        try:
            os.close(read_end)
            with client(c) as in_child:
                result = in_child.make_callable("forked")(2)
            os.write(write_end, f"{result}".encode())
        except BaseException as exc:
            os.write(write_end, f"raised {exc!r}".encode())
        finally:
            os._exit(0)
    os.close(write_end)
    try:
        said = _read_from_child(read_end, pid, timeout=60)
    finally:
        os.close(read_end)
        kill_if_alive(pid)
        os.waitpid(pid, 0)
    assert said == "42"


@pytest.mark.timeout(120)
def test_on_one_node_a_client_sends_no_clock_and_never_catches_up(
    node: LocalNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The one-node fast path pays nothing: the node answers each change with its clock,
    # which then dominates all this process saw, so no read of that client carries one
    # and no call asks for a CatchUp.
    monkeypatch.setattr(SESSION, "state", (0, VectorClock()))  # a fresh process's
    monkeypatch.setattr(SESSION, "generation", 0)
    sent: list[object] = []
    encoder = _wire.encoder

    class Recording:
        def encode(self, message: object) -> bytes:
            sent.append(message)
            return encoder.encode(message)

    monkeypatch.setattr(_wire, "encoder", Recording())
    with client(node) as c:
        c.publish(_adding(1), name="alone")
        assert SESSION.generation == 1 and c._control.confirmed == 1
        alone = c.make_callable("alone")
        assert [alone(i) for i in range(3)] == [1, 2, 3]
        c.publish(_adding(2), name="alone")
        assert alone(1) == 3
        assert c.current_version("alone") == 2 and len(c.versions("alone")) == 2
        reads = [m for m in sent if isinstance(m, _READS)]
        assert len(reads) == 3 and all(m.clock is None for m in reads)
        with client(node) as other:  # another client of the process, same node
            assert other.make_callable("alone")(1) == 3
            # Its first read carries the clock (it has not seen this node hold it yet),
            # answered at once; then it knows, and its call does not ask again.
            theirs = [m for m in sent if isinstance(m, _READS)][3:]
            assert [m.clock for m in theirs if m.clock is not None] == [SESSION.state[1]]
            assert other._control.confirmed == SESSION.generation
    assert not [m for m in sent if isinstance(m, _wire.CatchUp)]
