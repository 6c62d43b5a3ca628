"""A callable across processes: a forked child, pickling, and multiprocessing pools."""

from __future__ import annotations

import multiprocessing
import multiprocessing.forkserver
import os
import pickle
import select
import time
from collections.abc import Iterator

import pytest

import scatter
from cluster.launch import LocalNode, kill_if_alive
from scatter import _api
from scatter._config import default_data_dir
from scatter._security import read_user_secret


def add(a: int, b: int) -> int:
    return a + b


@pytest.fixture
def forget_unpickled_clients(node: LocalNode) -> Iterator[None]:
    # Unpickling in this process makes a client per address: close the test's own.
    yield
    for clients in (_api._by_address, _api._tcp_by_address):
        leftover = clients.pop(node.address, None)
        if leftover is not None:
            leftover.close()
    _api._unpickled.clear()


def _read_from_child(read_end: int, pid: int, timeout: float) -> str:
    """What the child wrote before exiting; AssertionError if it said nothing in time."""
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


def test_a_forked_child_calls_through_connections_of_its_own(client: scatter.Client) -> None:
    client.publish(add)
    remote = client.make_callable("add")
    assert remote(1, 2) == 3  # the parent now has a pooled connection, and a control socket
    parent_connection = client._pool.idle[-1]
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report, and never return into pytest
        try:
            os.close(read_end)
            result = remote.call(20, 22, timeout=10)
            reused = parent_connection in client._pool.idle
            os.write(write_end, f"{result} reused={reused}".encode())
        except BaseException as exc:
            os.write(write_end, f"raised {exc!r}".encode())
        finally:
            os._exit(0)
    os.close(write_end)
    try:
        said = _read_from_child(read_end, pid, timeout=30)
    finally:
        os.close(read_end)
        kill_if_alive(pid)
        os.waitpid(pid, 0)
    assert said == "42 reused=False"
    assert remote(2, 2) == 4  # the parent's connections were left alone
    assert client._pool.idle[-1] is parent_connection


def test_a_callable_pickles_by_reference_without_the_secret(
    client: scatter.Client, forget_unpickled_clients: None
) -> None:
    client.publish(add)
    pinned = client.make_callable("add", version=1)
    data = pickle.dumps(pinned)
    secret = read_user_secret(default_data_dir())
    assert secret is not None
    assert secret.encode() not in data
    assert b"Client" not in data and b"zmq" not in data
    again = pickle.loads(data)
    assert again is not pinned and again._client is not client
    assert pickle.loads(pickle.dumps(again)) is again  # once per process, not once per task
    assert (again(2, 3), again.version, again.pinned) == (5, 1, True)
    assert type(again) is scatter.RemoteFunction  # described now: the plain call path
    following = pickle.loads(pickle.dumps(client.make_callable("add")))
    assert (following(1, 1), following.pinned) == (2, False)


def test_an_unpickled_pinned_callable_refuses_another_body_under_its_version(
    client: scatter.Client, forget_unpickled_clients: None
) -> None:
    client.publish(add)
    pinned = client.make_callable("add", version=1)
    data = pickle.dumps(pinned)
    content_id = pinned._version.content_id
    assert content_id.encode() in data
    # Same reference, another content id: what a pickle made against another node's v1 holds.
    forged = data.replace(content_id.encode(), b"0" * len(content_id))
    stranger = pickle.loads(forged)  # unpickling never fails: the callable describes at first use
    with pytest.raises(scatter.VersionNotFound, match="another body"):
        stranger(1, 2)


@pytest.mark.parametrize("start_method", ["fork", "spawn", "forkserver"])
def test_pool_map_runs_a_callable_in_child_processes(
    client: scatter.Client,
    node: LocalNode,
    start_method: str,
    monkeypatch: pytest.MonkeyPatch,
    forget_unpickled_clients: None,
) -> None:
    client.publish(add)
    remote = client.make_callable("add")
    assert remote(0, 0) == 0  # used before the children exist: forked ones inherit it
    # The children find the secret as any client does: here SCATTER_SECRET.
    secret = read_user_secret(default_data_dir())
    assert secret is not None
    monkeypatch.setenv("SCATTER_SECRET", secret)
    context = multiprocessing.get_context(start_method)
    pool = context.Pool(2)
    try:
        results = pool.starmap_async(remote, [(i, i) for i in range(20)], chunksize=2).get(
            timeout=120
        )
    finally:
        pool.terminate()
        pool.join()
        if start_method == "forkserver":
            multiprocessing.forkserver._forkserver._stop()  # type: ignore[attr-defined]
    assert results == [2 * i for i in range(20)]
