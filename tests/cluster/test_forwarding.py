"""Run here, or forward: calls through a node that cannot run them (issue 10, item 1)."""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cloudpickle
import pytest

import scatter
from cluster.launch import LocalCluster, LocalNode
from scatter import _wire
from scatter._publish import prepare_publish
from tests.waiting import wait_until

MODULE = "scatter_only_on_b"


def client(node: LocalNode) -> scatter.Client:
    return scatter.Client(node.address, autostart=False)


def _write_module(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{MODULE}.py").write_text("def triple(x):\n    return 3 * x\n")


def _function_needing_the_module(directory: Path) -> Callable[[int], int]:
    """A function whose body needs ``MODULE`` to load (a module reference in its closure,
    as an installed package would be): the test process imports it from ``directory``."""
    sys.path.insert(0, str(directory))
    try:
        module = importlib.import_module(MODULE)
    finally:
        sys.path.remove(str(directory))

    def triple(x: int) -> int:
        return int(module.triple(x))

    return triple


def _publish_by_reference(c: scatter.Client, fn: Callable[..., Any], name: str) -> int:
    """Publish ``fn`` with its modules by reference (plain cloudpickle), as a package a
    node must have installed: Scatter ships a caller's own modules by value otherwise."""
    fields = prepare_publish(fn, name=name)
    fields["body"] = cloudpickle.dumps(fn)
    published: _wire.Published = c.request(lambda i: _wire.Publish(id=i, **fields))
    return published.version


def _cluster(root: Path, env_a: dict[str, str], env_b: dict[str, str]) -> LocalCluster:
    a = LocalNode(root / "a", options=["--profile", "local"], env=env_a)
    cluster = LocalCluster(root, 2, nodes=[a])
    try:
        a.start()
        b = LocalNode(
            root / "b", options=["--profile", "local", "--join", a.address], env=env_b
        )
        cluster.nodes.append(b)
        b.start()
        cluster.wait_until_joined(30)
    except BaseException:
        cluster.stop()
        raise
    return cluster


@pytest.fixture
def module_dir(tmp_path: Path) -> Iterator[Path]:
    directory = tmp_path / "only-b"
    _write_module(directory)
    yield directory
    sys.modules.pop(MODULE, None)


def _has(c: scatter.Client, name: str, version: int) -> bool:
    try:
        return c.current_version(name) == version
    except scatter.FunctionNotFound:
        return False


def _node_id(node: LocalNode) -> str:
    with client(node) as c:
        return c.status().node_id


@pytest.mark.timeout(120)
def test_a_function_whose_module_only_b_has_runs_on_b_when_called_through_a(
    tmp_path: Path, module_dir: Path
) -> None:
    path = os.pathsep.join(filter(None, [str(module_dir), os.environ.get("PYTHONPATH", "")]))
    cluster = _cluster(tmp_path, {}, {"PYTHONPATH": path})
    try:
        a, b = cluster.nodes
        with client(b) as through_b:
            version = _publish_by_reference(
                through_b, _function_needing_the_module(module_dir), "triple"
            )
        with client(a) as through_a:
            wait_until(lambda: _has(through_a, "triple", version), 20, "A has triple")
            triple = through_a.make_callable("triple")
            assert triple(14) == 42  # forwarded: A's workers cannot load it
            assert [triple(n) for n in range(5)] == [0, 3, 6, 9, 12]  # straight to B now
            leased_from = set().union(*(p.nodes_leased for p in through_a._routes.pools()))
            assert leased_from == {_node_id(b)}
        assert "missing module `scatter_only_on_b`" in a.log()  # A learned it, and said so
    finally:
        cluster.stop()


@pytest.mark.timeout(120)
def test_a_function_whose_module_no_node_has_fails_naming_the_module_and_the_nodes(
    tmp_path: Path, module_dir: Path
) -> None:
    cluster = _cluster(tmp_path, {}, {})
    try:
        a, b = cluster.nodes
        with client(b) as through_b:
            version = _publish_by_reference(
                through_b, _function_needing_the_module(module_dir), "triple"
            )
        with client(a) as through_a:
            wait_until(lambda: _has(through_a, "triple", version), 20, "A has triple")
            triple = through_a.make_callable("triple")
            with pytest.raises(scatter.RemoteError) as caught:
                triple(14)
        message = str(caught.value)
        assert "cannot run on any member" in message
        assert "missing module `scatter_only_on_b`" in message
        assert _node_id(a) in message and _node_id(b) in message
    finally:
        cluster.stop()


def add(a: int, b: int) -> int:
    return a + b


def _add_v2() -> Callable[[int, int], int]:
    def add(a: int, b: int) -> int:
        return a + b + 100

    return add


@pytest.mark.timeout(120)
def test_a_call_pinned_to_a_version_a_lacks_is_forwarded(tmp_path: Path) -> None:
    # A drops every change its peers send (a test hook): it never holds add.
    cluster = _cluster(tmp_path, {"SCATTER_TEST_HOLD_PEER_CHANGES": "1"}, {})
    try:
        a, b = cluster.nodes
        with client(b) as through_b:
            through_b.publish(add)
            assert through_b.publish(_add_v2(), name="add").version == 2  # type: ignore[arg-type]
        with client(a) as through_a:
            with pytest.raises(scatter.FunctionNotFound):
                through_a.current_version("add")  # A lacks it indeed
            pinned = through_a.make_callable("add", version=2)  # described by B
            assert pinned(1, 2) == 103
            assert pinned(2, 2) == 104
            assert through_a.make_callable("add", version=1)(1, 2) == 3
            with pytest.raises(scatter.VersionNotFound):
                through_a.make_callable("add", version=9)  # exists nowhere
    finally:
        cluster.stop()


def _stream_needing_the_module(directory: Path) -> Callable[[int], Iterator[int]]:
    """A generator function whose body needs ``MODULE`` to load (see above)."""
    sys.path.insert(0, str(directory))
    try:
        module = importlib.import_module(MODULE)
    finally:
        sys.path.remove(str(directory))

    def triples(n: int) -> Iterator[int]:
        for i in range(n):
            yield int(module.triple(i))

    return triples


@pytest.mark.timeout(120)
def test_map_and_a_stream_of_a_function_only_b_can_load_take_routes_through_a(
    tmp_path: Path, module_dir: Path
) -> None:
    path = os.pathsep.join(filter(None, [str(module_dir), os.environ.get("PYTHONPATH", "")]))
    cluster = _cluster(tmp_path, {}, {"PYTHONPATH": path})
    try:
        a, b = cluster.nodes
        with client(b) as through_b:
            triple = _publish_by_reference(
                through_b, _function_needing_the_module(module_dir), "triple"
            )
            triples = _publish_by_reference(
                through_b, _stream_needing_the_module(module_dir), "triples"
            )
        with client(a) as through_a:
            wait_until(lambda: _has(through_a, "triple", triple), 20, "A has triple")
            wait_until(lambda: _has(through_a, "triples", triples), 20, "A has triples")
            # map first, on a fresh callable: A's workers refuse every call unrun, and
            # those calls go to B through a route, in order.
            mapped = through_a.make_callable("triple")
            assert list(mapped.map(range(40), parallel=3)) == [3 * n for n in range(40)]
            assert list(mapped.map(range(5))) == [0, 3, 6, 9, 12]  # straight to B now
            # A stream, on a fresh callable: its first frame is A's refusal.
            streamed = through_a.make_callable("triples")
            assert list(streamed(6)) == [0, 3, 6, 9, 12, 15]
            assert list(streamed(3)) == [0, 3, 6]
            leased_from = set().union(*(p.nodes_leased for p in through_a._routes.pools()))
            assert leased_from == {_node_id(b)}
    finally:
        cluster.stop()
