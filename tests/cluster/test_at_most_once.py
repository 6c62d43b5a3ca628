"""The relay and at most once (issue 10, items 1 and 3), on real loopback clusters.

Functions here append a line to a file (``O_APPEND``) before they return or sleep: what
ran is on disk, whatever the caller saw. Each test says which line may be there (at most
once) and which must never be (a call its caller gave up on never starts).

The function a test calls through node A needs a module only node B has on its
``PYTHONPATH``: A's workers cannot load it, so A routes the call to B (a direct route to
B's worker, or the relay through A).
"""

from __future__ import annotations

import asyncio
import importlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cloudpickle
import msgspec
import pytest

import scatter
from cluster.launch import LocalCluster, LocalNode, child_pids, kill_if_alive, process_gone
from scatter import _wire
from scatter._client import _callid, _connections
from scatter._client._routes import RelaySender
from scatter._publish import prepare_publish
from tests.waiting import holds_for, wait_until

MODULE = "scatter_at_most_once_on_b"
MODULE_SOURCE = """
import time


def append(path, token, sleep):
    with open(path, "a") as f:
        f.write(token + "\\n")
    time.sleep(sleep)
    return token
"""


def _write_module(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{MODULE}.py").write_text(MODULE_SOURCE)


def _appender_needing_the_module(directory: Path) -> Callable[[str, str, float], str]:
    sys.path.insert(0, str(directory))
    try:
        module = importlib.import_module(MODULE)
    finally:
        sys.path.remove(str(directory))

    def append(path: str, token: str, sleep: float) -> str:
        return str(module.append(path, token, sleep))

    return append


def _publish_by_reference(c: scatter.Client, fn: Callable[..., Any], name: str) -> int:
    fields = prepare_publish(fn, name=name)
    fields["body"] = cloudpickle.dumps(fn)  # the module by reference: only B loads it
    published: _wire.Published = c.request(lambda i: _wire.Publish(id=i, **fields))
    return published.version


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


@pytest.fixture
def module_dir(tmp_path: Path) -> Iterator[Path]:
    directory = tmp_path / "only-b"
    _write_module(directory)
    yield directory
    sys.modules.pop(MODULE, None)


def _two_nodes(root: Path, module_dir: Path, env_a: dict[str, str] | None = None) -> LocalCluster:
    path = os.pathsep.join(filter(None, [str(module_dir), os.environ.get("PYTHONPATH", "")]))
    a = LocalNode(root / "a", options=["--profile", "local"], env=env_a or {})
    cluster = LocalCluster(root, 2, nodes=[a])
    try:
        a.start()
        b = LocalNode(
            root / "b",
            options=["--profile", "local", "--join", a.address],
            env={"PYTHONPATH": path},
        )
        cluster.nodes.append(b)
        b.start()
        cluster.wait_until_joined(30)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _published_on_b_seen_on_a(cluster: LocalCluster, module_dir: Path) -> int:
    a, b = cluster.nodes
    with scatter.Client(b.address, autostart=False) as through_b:
        version = _publish_by_reference(
            through_b, _appender_needing_the_module(module_dir), "append"
        )

    def a_has_it() -> bool:
        with scatter.Client(a.address, autostart=False) as c:
            try:
                return c.current_version("append") == version
            except scatter.FunctionNotFound:
                return False

    wait_until(a_has_it, 20, "A holds append")
    return version


def _kill_node_and_workers(node: LocalNode) -> None:
    """B's machine dies: its node and its workers, all SIGKILLed at once."""
    workers = child_pids(node.pid)
    os.kill(node.pid, signal.SIGKILL)
    for pid in workers:
        kill_if_alive(pid)
    wait_until(lambda: process_gone(node.pid), 10, "B's node is gone")


@pytest.mark.timeout(120)
def test_a_client_forced_to_the_relay_gets_the_result_of_a_function_only_b_can_run(
    tmp_path: Path, module_dir: Path
) -> None:
    cluster = _two_nodes(tmp_path, module_dir)
    out = tmp_path / "out.txt"
    try:
        _published_on_b_seen_on_a(cluster, module_dir)
        a, _b = cluster.nodes
        with scatter.Client(a.address, autostart=False, routes="relay") as through_a:
            append = through_a.make_callable("append")
            assert append(str(out), "one", 0.0) == "one"  # A's workers cannot: relayed
            assert append(str(out), "two", 0.0) == "two"
            # From asyncio too: the relay's request waits in one of the pool's threads.
            assert asyncio.run(append.call_async(str(out), "three", 0.0)) == "three"
            senders = list(through_a._routes._senders.values())
            assert senders and all(isinstance(s, RelaySender) for s in senders)
            # No connection to any worker of B: every call went through A's node.
            assert all(
                not pool.idle and pool.counts["leases"] == 0 for pool in through_a._routes.pools()
            )
        assert _lines(out) == ["one", "two", "three"]
    finally:
        cluster.stop()


@pytest.mark.timeout(120)
def test_a_client_that_cannot_reach_b_s_worker_falls_back_to_the_relay_by_itself(
    tmp_path: Path, module_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cluster = _two_nodes(tmp_path, module_dir)
    out = tmp_path / "out.txt"
    try:
        _published_on_b_seen_on_a(cluster, module_dir)
        a, b = cluster.nodes
        # This client cannot reach B's workers: their endpoints (B's Unix sockets, under
        # B's data directory) lead to a port where nothing listens.
        closed = f"tcp://127.0.0.1:{_closed_port()}"
        original = _connections.WorkerConnection.__init__

        def unreachable_b(self: Any, context: Any, lease: int, endpoint: str, *rest: Any) -> None:
            if str(b.data_dir) in endpoint:
                endpoint = closed
            original(self, context, lease, endpoint, *rest)

        monkeypatch.setattr(_connections.WorkerConnection, "__init__", unreachable_b)
        with scatter.Client(a.address, autostart=False) as through_a:
            append = through_a.make_callable("append")
            assert append(str(out), "one", 0.0) == "one"  # direct route failed unsent: relayed
            assert append(str(out), "two", 0.0) == "two"  # straight to the relay now
            senders = list(through_a._routes._senders.values())
            assert any(isinstance(s, RelaySender) for s in senders)
        assert _lines(out) == ["one", "two"]
    finally:
        cluster.stop()


def _closed_port() -> int:
    from cluster.launch import free_port

    return free_port()


@pytest.mark.timeout(120)
def test_a_relayed_call_whose_reply_is_lost_ran_at_most_once_and_says_it_may_have(
    tmp_path: Path, module_dir: Path
) -> None:
    # A drops the replies of the calls it relays (a test hook): the reply is lost.
    cluster = _two_nodes(tmp_path, module_dir, {"SCATTER_TEST_DROP_RELAYED_REPLIES": "1"})
    out = tmp_path / "out.txt"
    try:
        _published_on_b_seen_on_a(cluster, module_dir)
        a, _b = cluster.nodes
        with scatter.Client(a.address, autostart=False, routes="relay") as through_a:
            append = through_a.make_callable("append")
            with pytest.raises((scatter.CallTimeout, scatter.Unreachable)) as caught:
                append.call(str(out), "lost", 0.0, timeout=0.5)
            assert caught.value.may_have_run
        assert _lines(out) == ["lost"]
    finally:
        cluster.stop()


@pytest.mark.timeout(120)
def test_a_call_id_sent_twice_runs_once_through_the_relay_and_at_the_worker(
    tmp_path: Path, module_dir: Path
) -> None:
    cluster = _two_nodes(tmp_path, module_dir)
    out = tmp_path / "out.txt"
    try:
        version = _published_on_b_seen_on_a(cluster, module_dir)
        a, b = cluster.nodes
        with scatter.Client(a.address, autostart=False) as through_a:
            b_id = _node_id(b)
            description = through_a.describe("append")
            args = msgspec.msgpack.encode({"path": str(out), "token": "once", "sleep": 0.0})
            frame = _wire.encoder.encode(
                _wire.Call(
                    next(_callid.ids),
                    "append",
                    0,
                    version,
                    description.signature_id,
                    5.0,
                    msgspec.Raw(args),
                    _callid.caller,
                )
            )

            def relay() -> _wire.Failure | _wire.Result:
                relayed: _wire.Relayed = through_a.request(
                    lambda i: _wire.Relay(i, b_id, "append", 0, description.content_id, frame, 5.0),
                    timeout=20,
                )
                return _wire.worker_reply_decoder.decode(relayed.reply)

            first, again = relay(), relay()  # the client retried the same call id
            assert isinstance(first, _wire.Result)
            assert isinstance(again, _wire.Failure) and again.kind == "duplicate"
        # Straight to a worker of B, twice: the worker refuses the repeat too.
        with scatter.Client(b.address, autostart=False) as through_b:
            worker = through_b._pool.checkout(time.monotonic() + 10)
            assert worker is not None
            straight = _same_call(frame, next(_callid.ids))  # a new id, sent twice
            replies = [
                _wire.worker_reply_decoder.decode(worker.request(straight, 5.0)) for _ in "12"
            ]
            through_b._pool.checkin(worker)
        assert isinstance(replies[0], _wire.Result)
        assert isinstance(replies[1], _wire.Failure) and replies[1].kind == "duplicate"
        assert _lines(out) == ["once", "once"]  # one through the relay, one straight
    finally:
        cluster.stop()


def _same_call(frame: bytes, call_id: int) -> bytes:
    call = _wire.call_decoder.decode(frame)
    return _wire.encoder.encode(msgspec.structs.replace(call, id=call_id))


def _node_id(node: LocalNode) -> str:
    with scatter.Client(node.address, autostart=False) as c:
        return c.status().node_id


@pytest.mark.timeout(120)
@pytest.mark.parametrize("routes", ["auto", "relay"])
def test_a_forwarded_call_whose_member_is_killed_mid_call_ran_at_most_once_and_says_so(
    tmp_path: Path, module_dir: Path, routes: str
) -> None:
    cluster = _two_nodes(tmp_path, module_dir)
    out = tmp_path / "out.txt"
    try:
        _published_on_b_seen_on_a(cluster, module_dir)
        a, b = cluster.nodes
        with scatter.Client(a.address, autostart=False, routes=routes) as through_a:  # type: ignore[arg-type]
            append = through_a.make_callable("append")
            killer = threading.Thread(
                target=lambda: (
                    wait_until(lambda: _lines(out), 30, "the call started on B"),
                    _kill_node_and_workers(b),
                )
            )
            killer.start()
            try:
                with pytest.raises(scatter.ScatterError) as caught:
                    append.call(str(out), "killed", 30.0, timeout=40)
            finally:
                killer.join(60)
            assert caught.value.may_have_run, repr(caught.value)
            assert isinstance(caught.value, scatter.WorkerCrashed | scatter.CallTimeout)
        assert _lines(out) == ["killed"]
    finally:
        cluster.stop()


def _slow() -> Callable[[str, str, float], str]:
    def slow(path: str, token: str, sleep: float) -> str:
        import time

        with open(path, "a") as f:
            f.write(token + "\n")
        time.sleep(sleep)
        return token

    return slow


@pytest.fixture
def one_worker(tmp_path: Path) -> Iterator[LocalNode]:
    node = LocalNode(tmp_path / "n", options=["--max-workers", "1"])
    with node:  # started by entering, stopped by PID on the way out
        yield node


def _without_claims(monkeypatch: pytest.MonkeyPatch) -> None:
    """Clients of this test claim no worker before a call, as a client on another
    machine cannot: a call may then be queued behind another on a shared worker."""
    monkeypatch.setattr(_connections.ConnectionPool, "_claims_next_to", lambda self, endpoint: None)


@pytest.mark.timeout(120)
def test_a_call_queued_behind_a_busy_worker_past_its_callers_timeout_never_starts(
    tmp_path: Path, one_worker: LocalNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    _without_claims(monkeypatch)
    out = tmp_path / "out.txt"
    with (
        scatter.Client(one_worker.address, autostart=False) as busy,
        scatter.Client(one_worker.address, autostart=False) as late,
    ):
        busy.publish(_slow(), name="slow")  # type: ignore[arg-type]
        slow_for_busy, slow_for_late = busy.make_callable("slow"), late.make_callable("slow")
        holder = threading.Thread(
            target=lambda: slow_for_busy.call(str(out), "busy", 5.0, timeout=30)
        )
        holder.start()
        try:
            wait_until(lambda: _lines(out) == ["busy"], 20, "the worker is busy")
            with pytest.raises(scatter.CallTimeout):
                # Queued on the one worker, 5 s busy: the caller gives up at 0.5 s + 3 s.
                slow_for_late.call(str(out), "late", 0.0, timeout=0.5)
        finally:
            holder.join(30)
        # The worker came free after its caller had given up: the call never starts.
        holds_for(lambda: "late" not in _lines(out), 1.5, "the late call has not run")
    assert _lines(out) == ["busy"]


@pytest.mark.timeout(120)
def test_a_queued_call_its_worker_reaches_too_late_is_refused_and_says_it_did_not_run(
    tmp_path: Path, one_worker: LocalNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    _without_claims(monkeypatch)
    out = tmp_path / "out.txt"
    with (
        scatter.Client(one_worker.address, autostart=False) as busy,
        scatter.Client(one_worker.address, autostart=False) as late,
    ):
        busy.publish(_slow(), name="slow")  # type: ignore[arg-type]
        slow_for_busy, slow_for_late = busy.make_callable("slow"), late.make_callable("slow")
        holder = threading.Thread(
            target=lambda: slow_for_busy.call(str(out), "busy", 1.5, timeout=30)
        )
        holder.start()
        try:
            wait_until(lambda: _lines(out) == ["busy"], 20, "the worker is busy")
            with pytest.raises(scatter.CallTimeout) as caught:
                # Free after 1.5 s: past this call's 0.5 s, before its caller gives up.
                slow_for_late.call(str(out), "late", 0.0, timeout=0.5)
            assert caught.value.may_have_run is False  # a retry is safe
        finally:
            holder.join(30)
    assert _lines(out) == ["busy"]
