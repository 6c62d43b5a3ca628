"""What the node stores, and that memory never runs ahead of disk, on real nodes."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

import diskcache
import pytest
import trio

import scatter
from cluster.launch import LocalNode, free_port
from scatter._config import NodeConfig
from scatter._node._server import NodeDriver, serve_node
from scatter._node._store import RegistryStore
from tests.waiting import wait_until


def _billing(rate: int, *names: str) -> list[tuple[Any, str | None, float | None]]:
    """Members of the set "billing" for ``Client.publish_set``."""

    def charge(cents: int) -> int:
        return cents * rate

    def refund(cents: int) -> int:
        return -cents * rate

    return [(f, f.__name__, None) for f in (charge, refund) if f.__name__ in names]


def charge(cents: int) -> int:
    return cents


def _store_keys(data_dir: Path, kind: str) -> list[Any]:
    cache = diskcache.Cache(str(data_dir / "registry"))
    try:
        return [k for k in cache.iterkeys() if isinstance(k, tuple) and k[0] == kind]
    finally:
        cache.close()


@pytest.mark.timeout(90)
def test_vaporizing_a_set_after_a_restart_leaves_no_member_callable(tmp_path: Path) -> None:
    # Before the node core, the workers' entries were rewritten only for names the node
    # remembered in memory: after a restart, a vaporized set's members stayed callable.
    first = LocalNode(tmp_path / "node").start()
    try:
        with scatter.Client(first.address, autostart=False) as client:
            client.publish_set("billing", _billing(1, "charge", "refund"))
            assert client.make_callable("charge", version=1)(2) == 2
    finally:
        first.stop()
    second = LocalNode(tmp_path / "node", port=first.port).start()
    try:
        with scatter.Client(second.address, autostart=False) as client:
            client.vaporize("billing")
            assert client.functions() == []
            for version in (None, 1):
                with pytest.raises(scatter.FunctionNotFound, match="vaporized"):
                    client.make_callable("charge", version=version)(2)
    finally:
        second.stop()


@pytest.mark.timeout(60)
def test_a_retired_member_can_be_pinned_as_its_error_says(client: scatter.Client) -> None:
    client.publish_set("billing", _billing(1, "charge", "refund"))
    client.publish_set("billing", _billing(1, "refund"))
    with pytest.raises(scatter.FunctionNotFound, match="pin one of its versions"):
        client.make_callable("charge")(1)
    assert client.make_callable("charge", version=1)(3) == 3


@pytest.mark.timeout(60)
def test_bodies_are_stored_once_and_freed_with_their_last_version(
    client: scatter.Client, node: LocalNode
) -> None:
    def big_factory(tag: int) -> Any:
        ballast = bytes([tag]) * 5_000_000  # a closure over a large value: a 5 MB body

        def big(i: int) -> int:
            return len(ballast) + i

        return big

    for tag in (1, 2, 3):
        client.publish(big_factory(tag), name="big")
    client.publish(big_factory(3), name="same_body")  # the same body under another name
    assert client.make_callable("big")(1) == 5_000_001
    assert len(_store_keys(node.data_dir, "body")) == 3
    client.vaporize("big")
    assert len(_store_keys(node.data_dir, "body")) == 1  # same_body still uses one
    client.vaporize("same_body")
    assert _store_keys(node.data_dir, "body") == []
    # Changes stay (history) but carry no body: 15 MB of bodies left nothing behind.
    registry_bytes = sum(p.stat().st_size for p in (node.data_dir / "registry").rglob("*"))
    assert registry_bytes < 5_000_000


@pytest.mark.timeout(90)
def test_a_restarted_node_keeps_its_id_and_a_copied_data_dir_gets_a_new_one(
    tmp_path: Path,
) -> None:
    node = LocalNode(tmp_path / "node").start()
    try:
        with scatter.Client(node.address, autostart=False) as client:
            client.publish(charge)
            first = client.status()
    finally:
        node.stop()
    node = LocalNode(tmp_path / "node", port=node.port).start()
    try:
        with scatter.Client(node.address, autostart=False) as client:
            again = client.status()
            assert (again.node_id, again.incarnation) == (first.node_id, first.incarnation + 1)
            # Each start numbers its changes under a writer of its own: a restored backup
            # can never hand out a change id that peers already hold.
            client.publish(charge, timeout=7.0)
            writers = {v["change_id"].rsplit(":", 1)[0] for v in client.versions("charge")}
            assert len(writers) == 2 and all(w.startswith(first.node_id) for w in writers)
    finally:
        node.stop()
    shutil.copytree(tmp_path / "node", tmp_path / "copy")
    copy = LocalNode(tmp_path / "copy").start()
    try:
        with scatter.Client(copy.address, autostart=False) as client:
            status = client.status()
            assert status.node_id != first.node_id
            assert client.make_callable("charge")(2) == 2  # the registry came along
        assert f"was node {first.node_id} elsewhere" in copy.log()
    finally:
        copy.stop()


class _StoreThatCannotCommit(RegistryStore):
    def commit_changes(self, *args: Any, **kwargs: Any) -> None:
        raise OSError(28, "No space left on device")


def add(a: int, b: int) -> int:
    return a + b


@pytest.mark.timeout(60)
def test_a_change_the_store_refuses_is_answered_with_an_error_and_never_served(
    tmp_path: Path,
) -> None:
    config = NodeConfig.local(
        address=f"tcp://127.0.0.1:{free_port()}", data_dir=tmp_path / "node", min_workers=1
    )

    def as_a_user() -> None:
        with scatter.Client(config.address, autostart=False) as client:
            with pytest.raises(scatter.ScatterError, match="could not store the change"):
                client.publish(add)
            with pytest.raises(scatter.FunctionNotFound):
                client.make_callable("add")
            assert client.functions() == []
            assert client.status().functions == 0  # the node keeps serving

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            driver = await nursery.start(
                lambda task_status: serve_node(
                    config, open_store=_StoreThatCannotCommit, task_status=task_status
                )
            )
            try:
                await trio.to_thread.run_sync(as_a_user)
            finally:
                driver.stop_requested.set()

    trio.run(main)
    # Nothing reached the disk: a restart with a working store finds no change.
    store = RegistryStore(tmp_path / "node" / "registry")
    try:
        assert store.changes() == []
    finally:
        store.close()


@pytest.mark.timeout(90)
def test_a_worker_that_cannot_start_is_retried_and_reported_never_fatal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before the node core, a worker start that failed (OSError, or no READY within
    # 60 s) ended the node with exit 1.
    config = NodeConfig.local(
        address=f"tcp://127.0.0.1:{free_port()}", data_dir=tmp_path / "node", min_workers=1
    )
    working = NodeDriver._worker_command

    def broken(self: NodeDriver, slot: int) -> list[str]:
        return [sys.executable, "-c", "import sys; sys.exit('no module named numpy')"]

    monkeypatch.setattr(NodeDriver, "_worker_command", broken)

    def as_a_user() -> None:
        with scatter.Client(config.address, autostart=False) as client:
            status = wait_until(
                lambda: (s := client.status()).worker_start_failures >= 2 and s,
                30,
                "the node retries the failing start",
            )
            assert "exited while starting" in status.worker_start_error
            assert status.workers == 0
            client.publish(add)  # the registry side keeps serving
            with pytest.raises(scatter.ScatterError, match=r"could not start a worker|no worker"):
                client.make_callable("add")(1, 2)
            monkeypatch.setattr(NodeDriver, "_worker_command", working)  # the fix arrives
            wait_until(lambda: client.status().workers >= 1, 60, "a retry succeeds")
            assert client.make_callable("add")(1, 2) == 3
            assert client.status().worker_start_failures == 0

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            driver = await nursery.start(
                lambda task_status: serve_node(config, task_status=task_status)
            )
            try:
                await trio.to_thread.run_sync(as_a_user)
            finally:
                driver.stop_requested.set()

    trio.run(main)


def double(cents: int) -> int:
    return 2 * cents


@pytest.mark.timeout(90)
def test_a_node_compacts_its_history_and_restarts_from_the_snapshot(tmp_path: Path) -> None:
    # A node alone is its whole cluster: what it applied is stable at once, so with
    # SCATTER_COMPACT_AFTER=1 each change is folded into the snapshot at the next round.
    env = {"SCATTER_COMPACT_AFTER": "1"}
    node = LocalNode(tmp_path / "node", env=env).start()
    try:
        with scatter.Client(node.address, autostart=False) as client:
            for rate in (1, 2, 3):
                client.publish_set("billing", _billing(rate, "charge", "refund"))
            client.publish(charge, name="solo")
            client.publish(double, name="charge_twice")
            client.vaporize("charge_twice")
            client.rollback("billing")
            wait_until(lambda: client.status().compacted_changes == 7, 10, "7 changes compacted")
            status = client.status()
            assert (status.changes, status.stable_changes) == (0, 0)
            before = (client.versions("billing"), client.versions("solo"), client.functions())
        assert _store_keys(node.data_dir, "change") == []
    finally:
        node.stop()
    node = LocalNode(tmp_path / "node", port=node.port, env=env).start()
    try:
        with scatter.Client(node.address, autostart=False) as client:
            again = (client.versions("billing"), client.versions("solo"), client.functions())
            assert again == before
            assert client.make_callable("refund")(3) == -6  # billing 2, rolled back to
            with pytest.raises(scatter.FunctionNotFound, match="vaporized"):
                client.make_callable("charge_twice")
            client.publish(double, name="charge_twice")  # numbering goes on after 1
            assert client.current_version("charge_twice") == 2
    finally:
        node.stop()


@pytest.mark.timeout(60)
def test_a_replica_stored_before_compaction_existed_still_loads(tmp_path: Path) -> None:
    node = LocalNode(tmp_path / "node").start()
    try:
        with scatter.Client(node.address, autostart=False) as client:
            client.publish(charge)
            client.publish(double, name="charge")
    finally:
        node.stop()
    cache = diskcache.Cache(str(tmp_path / "node" / "registry"))
    try:
        assert "snapshot" not in cache  # nothing compacted: the default threshold is 256
        cache.set("format", 2)  # as a release before bounded history left it
    finally:
        cache.close()
    node = LocalNode(tmp_path / "node", port=node.port).start()
    try:
        with scatter.Client(node.address, autostart=False) as client:
            assert client.current_version("charge") == 2
            assert client.make_callable("charge")(4) == 8
    finally:
        node.stop()


def test_what_the_registry_refused_as_void_is_stored_with_the_replica(tmp_path: Path) -> None:
    # Rule 9: a restart must keep refusing a void change and what counts it (the node
    # core's side of it: tests/core/test_history.py). None leaves the record as stored.
    from scatter._core._registry import Snapshot

    store = RegistryStore(tmp_path / "registry")
    try:
        assert store.void() == {}
        store.commit_changes((), {}, void={"n2.1.aaaaaa": 3})
        store.commit_changes((), {})
        assert store.void() == {"n2.1.aaaaaa": 3}
        store.commit_snapshot(Snapshot(), void={"n2.1.aaaaaa": 2, "n3.1.bbbbbb": 1})
        store.commit_snapshot(Snapshot())
        assert store.void() == {"n2.1.aaaaaa": 2, "n3.1.bbbbbb": 1}
        store.commit_snapshot(Snapshot(), replace=True, void={})  # a transfer that counts them
        assert store.void() == {}
        store.commit_changes((), {}, void={"n4.2.cccccc": 5})
    finally:
        store.close()
    reopened = RegistryStore(tmp_path / "registry")
    try:
        assert reopened.void() == {"n4.2.cccccc": 5}
    finally:
        reopened.close()


def test_a_data_directory_whose_node_left_starts_afresh_keeping_its_members(
    tmp_path: Path,
) -> None:
    from scatter._core._membership import MemberInfo, State

    store = RegistryStore(tmp_path / "registry")
    try:
        first, _ = store.open_as_node()
        friend = MemberInfo(node="friend", address="tcp://127.0.0.1:9", incarnation=1,
                            state=State.ALIVE, since=0.0)
        store.commit_members([friend])
        store._cache.set(("change", "x:1"), b"whatever was here")  # the old replica
        again, notice = store.start_afresh()
        assert again.node_id != first.node_id and again.incarnation == 1
        assert again.former == (first.node_id,)  # to forget, should the cluster not have
        assert f"node {first.node_id} of this data directory left" in notice
        assert store.members() == [friend]  # to rejoin through
        assert ("change", "x:1") not in store._cache
        assert store.load_replica()[1] == []
    finally:
        store.close()


def test_a_copied_data_directory_knows_the_id_it_was_so_a_left_one_starts_afresh(
    tmp_path: Path,
) -> None:
    # The node checks both ids against what its replica forgot (_server.run_node).
    store = RegistryStore(tmp_path / "node" / "registry")
    try:
        first, _ = store.open_as_node()
    finally:
        store.close()
    shutil.copytree(tmp_path / "node", tmp_path / "copy")
    copy = RegistryStore(tmp_path / "copy" / "registry")
    try:
        again, notice = copy.open_as_node()
        assert again.node_id != first.node_id and notice
        assert copy.previous_node_id == first.node_id
    finally:
        copy.close()
