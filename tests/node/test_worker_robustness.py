"""A worker survives any one bad input, never outlives its node, and a node start gets
runtime files of its own (see the docstrings of scatter/_node/_worker.py and _slots.py)."""

from __future__ import annotations

import contextlib
import os
import re
import threading
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest
import zmq

import scatter
from cluster.launch import LocalNode, child_pids, kill_if_alive, process_gone, wait_until
from scatter import _wire
from scatter._config import NodeConfig
from tests.raw_sockets import dealer


def worker_pid() -> int:
    return os.getpid()


@pytest.mark.timeout(60)
def test_unsendable_results_are_clear_errors_and_the_worker_keeps_serving(
    client: scatter.Client,
) -> None:
    def big() -> int:
        return 2**70  # once an error: ints beyond 64 bits travel (test_types.py)

    def bigs() -> list[int]:
        return [1, -(2**70)]

    def lock() -> Any:
        return threading.Lock()  # cloudpickle cannot pickle a lock

    def lock_as_int() -> int:
        return threading.Lock()  # type: ignore[return-value]

    def thing_as_int() -> int:
        return object()  # type: ignore[return-value]  # pickles, but is no int

    class Unprintable(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no words")

    def unprintable() -> int:
        raise Unprintable

    for fn in (worker_pid, big, bigs, lock, lock_as_int, thing_as_int, unprintable):
        client.publish(fn)
    pid = client.make_callable("worker_pid")
    first = pid()

    assert client.make_callable("big")() == 2**70
    assert client.make_callable("bigs")() == [1, -(2**70)]
    assert pid() == first

    for name in ("lock", "lock_as_int"):
        with pytest.raises(scatter.ValidationError) as caught:
            client.make_callable(name)()
        assert str(caught.value).startswith(f"the result of {name} (version 1) cannot be sent: ")
        assert "cannot serialize a value of type lock" in str(caught.value)
        assert caught.value.parameter == "return"
        assert pid() == first

    with pytest.raises(scatter.ValidationError) as caught:
        client.make_callable("thing_as_int")()
    assert "does not match its return annotation int: Expected `int`, got `ext`" in str(
        caught.value
    )
    assert caught.value.parameter == "return"
    assert pid() == first

    with pytest.raises(scatter.RemoteError) as remote:
        client.make_callable("unprintable")()
    assert not isinstance(remote.value, scatter.WorkerCrashed)
    assert remote.value.remote_type.endswith("Unprintable")
    assert "str() of the exception raised RuntimeError" in remote.value.remote_message
    assert pid() == first


@pytest.mark.timeout(60)
def test_junk_in_a_call_frame_gets_a_failure_and_the_worker_keeps_serving(
    client: scatter.Client,
) -> None:
    def echo(x: Any) -> Any:
        return x

    class Plain:  # msgspec cannot encode it: a parameter annotated so takes a pickle
        pass

    def hold(x):  # type: ignore[no-untyped-def]
        return 1

    hold.__annotations__ = {"x": Plain, "return": int}

    client.publish(worker_pid)
    client.publish(echo)
    client.publish(hold)
    leased = client.request(lambda i: _wire.Lease(i))
    context = zmq.Context()
    sock = dealer(context, leased.endpoint)

    def call(name: str, args: bytes, timeout: float = 0.0) -> _wire.Result | _wire.Failure:
        sock.send(_wire.encoder.encode(_wire.Call(7, name, 0, 0, "", timeout, msgspec.Raw(args))))
        assert sock.poll(10_000), f"no reply to {name}: the worker died"
        reply: _wire.Result | _wire.Failure = _wire.worker_reply_decoder.decode(sock.recv())
        return reply

    def pid_now() -> int:
        reply = call("worker_pid", msgspec.msgpack.encode({}))
        assert isinstance(reply, _wire.Result), reply
        return int(msgspec.msgpack.decode(reply.value))

    try:
        first = pid_now()
        for junk in (b"junk", b"\x80\x04\x95"):  # not a pickle; a truncated one
            args = msgspec.msgpack.encode({"x": msgspec.msgpack.Ext(1, junk)})
            failure = call("hold", args)
            assert isinstance(failure, _wire.Failure), failure
            assert failure.kind == "validation"
            assert "hold() arguments: a value cannot be decoded on this node" in failure.message
            assert pid_now() == first
            # Under Any no pickle is loaded at all (test_signature_safety.py).
            refused = call("echo", args)
            assert isinstance(refused, _wire.Failure), refused
            assert (refused.kind, refused.parameter) == ("validation", "x")
            assert pid_now() == first
        unknown = call("echo", msgspec.msgpack.encode({"x": msgspec.msgpack.Ext(9, b"")}))
        assert isinstance(unknown, _wire.Failure) and unknown.kind == "validation", unknown
        assert pid_now() == first
        not_a_map = call("echo", msgspec.msgpack.encode([1, 2]))
        assert isinstance(not_a_map, _wire.Failure) and not_a_map.kind == "validation"
        assert pid_now() == first
        for bad_timeout in (-1.0, float("nan")):
            failure = call("echo", msgspec.msgpack.encode({"x": 1}), timeout=bad_timeout)
            assert isinstance(failure, _wire.Failure) and failure.kind == "protocol", failure
            assert pid_now() == first
        assert client.make_callable("echo")([1, "two"]) == [1, "two"]
    finally:
        sock.close()
        context.term()


@pytest.mark.timeout(90)
def test_workers_exit_after_their_node_is_killed_even_mid_call(
    client: scatter.Client, node: LocalNode
) -> None:
    def spin() -> None:
        while True:
            pass

    def nap() -> None:
        time.sleep(1000)

    def stubborn() -> None:
        while True:  # swallows the interrupt: only the kill_grace exit ends it
            with contextlib.suppress(BaseException):
                time.sleep(1000)

    # Long enough that the calls are still running when the node dies, on a busy machine.
    timeout = 2.0
    client.publish(worker_pid)
    hangs = (spin, nap, stubborn)
    for fn in hangs:
        client.publish(fn, timeout=timeout)
    callers = [scatter.Client(node.address, autostart=False) for _ in hangs]
    busy: list[int] = []
    outcomes: dict[str, BaseException | None] = {}
    all_leased = threading.Barrier(len(hangs) + 1)

    def run(caller: scatter.Client, name: str) -> None:
        busy.append(caller.make_callable("worker_pid")())  # leases this caller's worker
        all_leased.wait(30)
        try:
            caller.make_callable(name)()
            outcomes[name] = None
        except BaseException as exc:
            outcomes[name] = exc

    threads = [
        threading.Thread(target=run, args=(c, fn.__name__), daemon=True)
        for c, fn in zip(callers, hangs, strict=True)
    ]
    workers: list[int] = []
    try:
        for thread in threads:
            thread.start()
        all_leased.wait(30)
        wait_until(lambda: client.status().busy_workers == len(hangs), 10, "all calls run")
        workers = child_pids(node.pid)  # busy ones and idle spares
        assert set(busy) <= set(workers) and len(workers) > len(busy)
        node.kill()
        # Generous: a full suite leaves the machine busy (this failed at +10 s twice).
        bound = timeout + NodeConfig.kill_grace + 30
        for pid in workers:
            try:
                wait_until(lambda pid=pid: process_gone(pid), bound, f"worker {pid} exits")
            except AssertionError:
                # Seen twice in full-suite runs, never alone: say where the worker waits.
                status = Path(f"/proc/{pid}/status").read_text().splitlines()[:3]
                waits = [
                    Path(task, "wchan").read_text() for task in Path(f"/proc/{pid}/task").glob("*")
                ]
                slot = Path(f"/proc/{pid}/cmdline").read_text().split("\0--slot\0")[-1][:3]
                raise AssertionError(
                    f"worker {pid} (slot {slot}) did not exit in {bound:g} s: {status}, "
                    f"threads waiting in {waits}; busy workers were {busy}"
                ) from None
        for thread in threads:
            thread.join(10)
        assert len(outcomes) == len(hangs)
        assert all(isinstance(o, scatter.CallTimeout) for o in outcomes.values()), outcomes
        # Interrupted at their deadline, their replies still left after the node died.
        for name in ("spin", "nap"):
            assert f"{name} (version 1) ran past its timeout" in str(outcomes[name])
    finally:
        for pid in workers:
            kill_if_alive(pid)
        for caller in callers:
            caller.close()


def _wakeups(pid: int) -> dict[int, int]:
    """{thread id: voluntary context switches} of a process: how often each thread slept."""
    counts = {}
    for status in Path(f"/proc/{pid}/task").glob("*/status"):
        with contextlib.suppress(OSError):
            match = re.search(r"^voluntary_ctxt_switches:\s+(\d+)", status.read_text(), re.M)
            if match:
                counts[int(status.parent.name)] = int(match.group(1))
    return counts


@pytest.mark.timeout(60)
def test_idle_workers_sleep_until_called(client: scatter.Client, node: LocalNode) -> None:
    # An idle worker blocks on its socket and on its node's pipe; nothing wakes it up.
    # (It used to look for its node every 250 ms.)
    client.publish(worker_pid)
    assert client.make_callable("worker_pid")() in child_pids(node.pid)
    workers = child_pids(node.pid)
    before = {pid: _wakeups(pid) for pid in workers}
    time.sleep(1.5)  # the window observed, not a wait for a condition
    for pid in workers:
        after = _wakeups(pid)
        woke = sum(n - before[pid].get(tid, 0) for tid, n in after.items())
        assert woke <= 1, f"idle worker {pid} woke {woke} times in 1.5 s"


@pytest.mark.timeout(90)
def test_a_restarted_node_gets_runtime_files_of_its_own(tmp_path: Path) -> None:
    first = LocalNode(tmp_path / "node").start()

    def slots_file() -> Path:
        (found,) = (first.data_dir / "run").glob("*/slots")  # this start's run directory
        return found

    slots = slots_file()
    old_workers: list[int] = []
    old_slots = -1
    try:
        with scatter.Client(first.address, autostart=False) as client:
            client.publish(worker_pid)
            client.make_callable("worker_pid")()
        old_workers = child_pids(first.pid)
        old_slots = os.open(slots, os.O_RDONLY)  # keeps the old inode's number taken
        first.kill()
        second = LocalNode(first.data_dir).start()
        try:
            slots = slots_file()
            # A new inode: an orphan of the first start can never write a new worker's slot.
            assert os.stat(slots).st_ino != os.fstat(old_slots).st_ino
            assert os.fstat(old_slots).st_nlink == 0
            with scatter.Client(second.address, autostart=False) as client:
                pid = client.make_callable("worker_pid")()
            live = child_pids(second.pid)
            assert pid in live
            sockets = sorted(p.name for p in slots.parent.glob("*.sock"))
            assert sockets, "workers listen on Unix sockets"
            for name in sockets:
                match = re.fullmatch(r"worker-(\d+)-(\d+)\.sock", name)
                assert match, name
                assert int(match.group(2)) in live, f"{name}: no live worker of this start"
        finally:
            second.stop()
    finally:
        if old_slots >= 0:
            os.close(old_slots)
        first.kill()
        for pid in old_workers:
            kill_if_alive(pid)


def chunk(size: int) -> bytes:
    return b"x" * size


@pytest.mark.timeout(60)
def test_a_worker_never_drops_a_reply_when_its_caller_reads_late(
    client: scatter.Client,
) -> None:
    # Found by the benchmark's map on a loaded machine: "reply 8285 to call 8274". A
    # ROUTER drops a reply once its queue for that peer is full; the worker's queue was
    # 64 replies. Now it is larger, and the worker waits for room instead of dropping.
    client.publish(chunk)
    leased: _wire.Leased = client.request(lambda i: _wire.Lease(i))
    calls = _wire.PEER_REPLY_FRAMES + 64  # more replies than the queue holds
    context = zmq.Context()
    sock = dealer(context, leased.local_endpoint or leased.endpoint)
    try:
        args = msgspec.Raw(msgspec.msgpack.encode({"size": 64 * 1024}))
        for call_id in range(1, calls + 1):
            sock.send(_wire.encoder.encode(_wire.Call(call_id, "chunk", 0, 0, "", 0.0, args)))
        time.sleep(1.0)  # the scenario: a caller that reads late, while replies pile up
        seen = []
        while len(seen) < calls and sock.poll(10_000):
            reply = _wire.worker_reply_decoder.decode(sock.recv())
            assert isinstance(reply, _wire.Result), reply
            seen.append(reply.id)
        assert seen == list(range(1, calls + 1))  # every reply, in order, none dropped
    finally:
        context.destroy(linger=0)
