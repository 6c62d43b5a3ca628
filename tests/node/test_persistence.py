"""What a node keeps on disk: the registry, its identity, and nothing else."""

from __future__ import annotations

from pathlib import Path

import diskcache
import pytest

import scatter
from cluster.launch import LocalNode


def add(a: int, b: int) -> int:
    return a + b


def echo(text: str) -> str:
    return text


@pytest.mark.timeout(90)
def test_node_killed_and_restarted_serves_same_functions_at_same_versions(
    tmp_path: Path,
) -> None:
    first = LocalNode(tmp_path / "node").start()
    try:
        with scatter.Client(first.address, autostart=False) as client:
            client.publish(add)
            client.publish(lambda_free_add_v2 := _add_v2(), name="add")
            client.rollback("add")  # current is 1 of 2
            client.publish(echo)
            before_versions = client.versions("add")
            before_functions = client.functions()
            node_id = client.status().node_id
        first.kill()  # SIGKILL: no goodbye, no flush
        assert lambda_free_add_v2(1, 1) == 1002
    finally:
        first.kill()
    second = LocalNode(tmp_path / "node", port=first.port).start()
    try:
        with scatter.Client(second.address, autostart=False) as client:
            assert client.status().node_id == node_id
            assert client.versions("add") == before_versions
            assert client.functions() == before_functions
            assert client.make_callable("add")(1, 1) == 2
            assert client.make_callable("add", version=2)(1, 1) == 1002
            assert client.make_callable("echo")("back") == "back"
            client.publish(_add_v2(), name="add")
            assert client.current_version("add") == 3  # numbering carried over the restart
    finally:
        second.stop()


def _add_v2():  # type: ignore[no-untyped-def]
    def add(a: int, b: int) -> int:
        return a + b + 1000

    return add


@pytest.mark.timeout(60)
def test_store_holds_registry_entries_only(client: scatter.Client, node: LocalNode) -> None:
    client.publish(add)
    client.publish(echo)
    secret = "argument-that-must-never-be-stored-" * 3
    remote = client.make_callable("echo")
    for i in range(300):
        assert remote(f"{secret}{i}") == f"{secret}{i}"
    client.make_callable("add")(123456789, 987654321)
    cache = diskcache.Cache(str(node.data_dir / "registry"))
    try:
        allowed = {"change", "record", "body", "fn"}
        for key in cache.iterkeys():
            assert key in ("format", "identity", "members", "snapshot", "void") or (
                isinstance(key, tuple) and key[0] in allowed
            ), key
            value = cache[key]
            blob = value if isinstance(value, bytes) else str(value).encode()
            assert secret.encode() not in blob
            assert b"1111111110" not in blob  # the result of the add call
    finally:
        cache.close()
    for path in node.data_dir.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
