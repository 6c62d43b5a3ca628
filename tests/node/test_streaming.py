"""Generator functions stream their items to the caller (scatter/_node/_worker.py,
``Stream``; scatter/_client/_calls.py, ``RemoteStream``), on real node processes."""

from __future__ import annotations

import asyncio
import gc
import inspect
import os
import signal
import time
from collections.abc import AsyncIterator, Generator, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio
import zmq

import scatter
from cluster.launch import LocalNode, process_gone
from scatter import _wire
from tests.raw_sockets import dealer
from tests.waiting import holds_for, wait_until


def count(n: int) -> Iterator[int]:
    for i in range(n):
        print("making", i)
        yield i


def squares(n: int) -> Generator[int, None, None]:
    yield from (i * i for i in range(n))


async def ticks(n: int) -> AsyncIterator[str]:
    for i in range(n):
        await asyncio.sleep(0)
        yield f"tick {i}"


def gated(path: str) -> Iterator[str]:
    yield "first"
    while not Path(path).exists():  # the caller opens the gate once it has the first item
        time.sleep(0.01)
    yield "second"


def mixed() -> Iterator[int]:
    yield 1
    yield "two"  # type: ignore[misc]


def failing() -> Iterator[int]:
    yield 1
    raise KeyError("no more")


def endless(marker: str, progress: str) -> Iterator[int]:
    try:
        i = 0
        while True:
            # Written whole, then renamed: a reader never sees the file half written.
            Path(progress + ".new").write_text(str(i))
            os.replace(progress + ".new", progress)
            yield i
            i += 1
    finally:
        Path(marker).touch()


def slow_second(marker: str) -> Iterator[int]:
    try:
        yield 1
        time.sleep(600)
        yield 2
    finally:
        Path(marker).touch()


def pids() -> Iterator[int]:
    while True:
        yield os.getpid()


def add(a: int, b: int) -> int:
    return a + b



async def fed(n: int) -> AsyncIterator[int]:
    """Items made by a task of the generator's own, which runs between items too."""
    queue: asyncio.Queue[int] = asyncio.Queue()

    async def produce() -> None:
        for i in range(n):
            await queue.put(i)
            await asyncio.sleep(0.002)

    producer = asyncio.create_task(produce())
    try:
        for _ in range(n):
            yield await queue.get()
    finally:
        producer.cancel()


async def fed_by_a_blocking_task(n: int) -> AsyncIterator[int]:
    """Like ``fed``, but its task holds the loop in ``time.sleep`` (as blocking code in an
    async function does): a call's deadline alarm lands there while it runs."""
    queue: asyncio.Queue[int] = asyncio.Queue()

    async def produce() -> None:
        for i in range(n):
            time.sleep(0.3)
            await queue.put(i)
            await asyncio.sleep(0)

    producer = asyncio.create_task(produce())
    try:
        for _ in range(n):
            yield await queue.get()
    finally:
        producer.cancel()


async def doubled(n: int) -> int:
    await asyncio.sleep(0.01)
    return 2 * n


async def snooze(seconds: float) -> int:
    await asyncio.sleep(seconds)
    return 0


async def leaves_a_task(marker: str) -> int:
    async def forever() -> None:
        try:
            await asyncio.sleep(600)
        finally:
            Path(marker).touch()

    asyncio.get_running_loop().create_task(forever())
    return 1


async def cancels_itself() -> int:
    task = asyncio.current_task()
    assert task is not None
    task.cancel()
    await asyncio.sleep(0)
    return 0


@pytest.mark.timeout(90)
def test_call_async_of_a_generator_is_an_async_iterator(
    client: scatter.Client, tmp_path: Path
) -> None:
    client.publish(ticks)
    client.publish(endless)
    client.publish(mixed)
    marker, progress = tmp_path / "closed", tmp_path / "progress"

    async def main() -> None:
        items = await client.make_callable("ticks").call_async(3)
        assert [item async for item in items] == ["tick 0", "tick 1", "tick 2"]
        endless_remote = client.make_callable("endless")
        async with await endless_remote.call_async(str(marker), str(progress)) as numbers:
            async for number in numbers:
                if number == 20:  # past the window: credit flows under the event loop
                    break
        assert marker.exists(), "aclose() returned before the generator's finally ran"
        marker.unlink()
        wrong = await client.make_callable("mixed").call_async()
        assert await wrong.__anext__() == 1
        with pytest.raises(scatter.ValidationError):
            await wrong.__anext__()

    asyncio.run(main())
    trio.run(main)


@pytest.mark.timeout(90)
def test_a_generator_streams_its_items_each_validated(
    client: scatter.Client, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for fn in (count, squares, ticks, gated, mixed, failing):
        client.publish(fn)
    remote = client.make_callable("count")
    assert str(inspect.signature(remote)) == "(n: int) -> collections.abc.Iterator[int]"
    capsys.readouterr()
    assert list(remote(3)) == [0, 1, 2]
    lines = capsys.readouterr().out.splitlines()  # each item's output came with it
    assert [line.split(") ", 1)[1] for line in lines] == ["making 0", "making 1", "making 2"]
    assert all(line.startswith("(count pid=") for line in lines)
    assert list(remote(0)) == []
    assert list(remote(50)) == list(range(50))  # past the window: credit comes back
    assert list(client.make_callable("squares")(4)) == [0, 1, 4, 9]
    assert list(client.make_callable("ticks")(2)) == ["tick 0", "tick 1"]

    # Each item arrives as it is made: the second is made only once the first is here.
    gate = tmp_path / "gate"
    items = client.make_callable("gated").call(str(gate), timeout=20)
    assert next(items) == "first"
    gate.touch()
    assert list(items) == ["second"]

    items = client.make_callable("mixed")()
    assert next(items) == 1
    with pytest.raises(scatter.ValidationError, match="item 1 of mixed") as caught:
        next(items)
    assert caught.value.parameter == "return"
    assert list(items) == []  # it ended

    items = client.make_callable("failing")()
    assert next(items) == 1
    with pytest.raises(KeyError):
        next(items)
    assert list(remote.call(2, timeout=5)) == [0, 1]  # the connection went back, clean

    with pytest.raises(scatter.ScatterError, match="generator function"):
        remote.map([1, 2])


@pytest.mark.timeout(90)
def test_back_pressure_and_closing_early_stop_the_remote_generator(
    client: scatter.Client, tmp_path: Path
) -> None:
    client.publish(endless)
    remote = client.make_callable("endless")
    marker, progress = tmp_path / "closed", tmp_path / "progress"

    def made() -> int:
        return int(progress.read_text()) if progress.exists() else -1

    items = remote(str(marker), str(progress))
    assert next(items) == 0
    # The worker runs STREAM_WINDOW items ahead, then waits for the consumer.
    window = _wire.STREAM_WINDOW
    wait_until(lambda: made() == window - 1, 20, f"the worker made {window} items")
    holds_for(lambda: made() == window - 1, 0.5, "the worker waiting for credit")
    assert [next(items) for _ in range(window)] == list(range(1, window + 1))
    assert not marker.exists()
    items.close()
    assert marker.exists(), "close() returned before the generator's finally ran"
    assert list(items) == []

    # Garbage collecting the iterator closes it too, and so does leaving a with block.
    marker.unlink()
    items = remote(str(marker), str(progress))
    assert next(items) == 0
    del items
    gc.collect()
    wait_until(marker.exists, 20, "the collected iterator's generator closed")
    marker.unlink()
    with remote(str(marker), str(progress)) as items:
        for item in items:
            if item == 3:
                break
    assert marker.exists()
    client.publish(add)  # and the client goes on
    assert client.make_callable("add")(1, 2) == 3


@pytest.mark.timeout(90)
def test_an_item_past_its_timeout_ends_the_stream_and_closes_the_generator(
    client: scatter.Client, tmp_path: Path
) -> None:
    client.publish(slow_second)
    marker = tmp_path / "closed"
    items = client.make_callable("slow_second").call(str(marker), timeout=1)
    assert next(items) == 1
    with pytest.raises(scatter.CallTimeout, match="for item 1"):
        next(items)
    assert marker.exists()


def _call(call_id: int, name: str, arguments: dict[str, Any], timeout: float = 0.0) -> bytes:
    args = msgspec.Raw(msgspec.msgpack.encode(arguments))
    return _wire.encoder.encode(_wire.Call(call_id, name, 0, 0, "", timeout, args))


def _receive(sock: zmq.Socket[bytes]) -> Any:
    assert sock.poll(20_000), "no frame from the worker"
    return _wire.stream_reply_decoder.decode(sock.recv())


@pytest.mark.timeout(90)
def test_a_worker_serves_other_calls_while_a_stream_waits_and_expires_a_silent_caller(
    client: scatter.Client, tmp_path: Path
) -> None:
    client.publish(endless)
    client.publish(add)
    leased = client.request(lambda i: _wire.Lease(i))
    context = zmq.Context()
    streaming = dealer(context, leased.endpoint)
    other = dealer(context, leased.endpoint)
    try:
        marker, progress = tmp_path / "closed", tmp_path / "progress"
        streaming.send(_call(1, "endless", {"marker": str(marker), "progress": str(progress)}))
        items = [_receive(streaming) for _ in range(_wire.STREAM_WINDOW)]
        assert [msgspec.msgpack.decode(item.value) for item in items] == list(range(8))
        # Out of credit, the stream waits; the same worker answers a plain call meanwhile.
        other.send(_call(2, "add", {"a": 1, "b": 2}))
        reply = _receive(other)
        assert isinstance(reply, _wire.Result) and msgspec.msgpack.decode(reply.value) == 3
        streaming.send(_wire.encoder.encode(_wire.More(1, 2)))
        assert [msgspec.msgpack.decode(_receive(streaming).value) for _ in range(2)] == [8, 9]
        streaming.send(_wire.encoder.encode(_wire.Cancel(1)))
        end = _receive(streaming)
        assert isinstance(end, _wire.Result) and end.id == 1
        assert marker.exists()
        # A stray More or Cancel (its stream has ended) gets no reply at all.
        streaming.send(_wire.encoder.encode(_wire.More(1, 5)))
        streaming.send(_wire.encoder.encode(_wire.Cancel(1)))
        other.send(_call(3, "add", {"a": 2, "b": 2}))
        assert msgspec.msgpack.decode(_receive(other).value) == 4
        assert not streaming.poll(200)

        # A caller that grants no credit within the timeout: the stream ends, closed.
        marker.unlink()
        streaming.send(
            _call(4, "endless", {"marker": str(marker), "progress": str(progress)}, timeout=1)
        )
        for _ in range(_wire.STREAM_WINDOW):
            assert isinstance(_receive(streaming), _wire.Yielded)
        expired = _receive(streaming)
        assert isinstance(expired, _wire.Failure) and expired.kind == "timeout", expired
        assert "asked for no item" in expired.message
        assert marker.exists()
    finally:
        streaming.close(linger=0)
        other.close(linger=0)
        context.destroy(linger=0)


@pytest.mark.timeout(60)
def test_a_caller_that_vanishes_mid_stream_gets_its_generator_closed(
    client: scatter.Client, tmp_path: Path
) -> None:
    client.publish(endless)
    leased = client.request(lambda i: _wire.Lease(i))
    context = zmq.Context()
    try:
        caller = dealer(context, leased.endpoint)
        marker, progress = tmp_path / "closed", tmp_path / "progress"
        caller.send(_call(1, "endless", {"marker": str(marker), "progress": str(progress)}, 1.0))
        assert isinstance(_receive(caller), _wire.Yielded)
        caller.close(linger=0)  # gone without a Cancel, as a killed process would be
        wait_until(marker.exists, 20, "the worker closed the abandoned generator")
    finally:
        context.destroy(linger=0)
    client.publish(add)
    assert client.make_callable("add")(2, 3) == 5


def test_a_generator_without_an_iterator_annotation_is_refused() -> None:
    def numbers(n: int) -> list[int]:
        yield from range(n)  # type: ignore[misc]

    async def words(n: int) -> Iterator[str]:
        yield "x"

    from scatter._publish import prepare_publish

    with pytest.raises(scatter.NotScatterable, match=r"annotate its return as Iterator\[T\]"):
        prepare_publish(numbers)
    with pytest.raises(scatter.NotScatterable, match=r"AsyncIterator\[T\]"):
        prepare_publish(words)


@pytest.mark.timeout(60)
def test_scatter_call_prints_a_generators_items_one_line_each(
    client: scatter.Client,
) -> None:
    from typer.testing import CliRunner

    from scatter._cli import app

    client.publish(squares)
    result = CliRunner().invoke(app, ["--address", client.address, "call", "squares", "4"])
    assert result.exit_code == 0, result.output
    assert result.stdout == "0\n1\n4\n9\n"


@pytest.mark.timeout(90)
def test_an_async_stream_dropped_after_its_worker_died_gives_its_connection_back(
    node: LocalNode, client: scatter.Client
) -> None:
    # Found in review: __del__ of an async stream sent its Cancel and discarded its
    # connection under one suppress; a dead worker made the send raise, and the pool's
    # slot (and the worker's claim) leaked: with max_connections=1, no call ever again.
    client.publish(pids)
    client.publish(add)
    with scatter.Client(node.address, autostart=False, max_connections=1) as small:

        async def take_one_and_drop() -> int:
            items = await small.make_callable("pids").call_async()
            pid = await items.__anext__()
            os.kill(pid, signal.SIGKILL)
            wait_until(lambda: process_gone(pid), 10, "the worker is gone")
            del items  # never closed: garbage collected
            gc.collect()
            return pid

        asyncio.run(take_one_and_drop())
        assert small.make_callable("add").call(2, 3, timeout=20) == 5


@pytest.mark.timeout(90)
def test_async_calls_between_the_items_of_an_async_stream_cancel_only_their_own_tasks(
    client: scatter.Client, tmp_path: Path
) -> None:
    # Found in review: each async call, once done, cancelled every task on the worker's
    # one event loop, so a stream of an async generator lost the task that fed it
    # between two items (and then waited for an item that never came). Each call (and
    # each stream) cancels only the tasks it made: a call's leftovers still go.
    for fn in (fed, doubled, snooze, leaves_a_task, cancels_itself):
        client.publish(fn)
    leased = client.request(lambda i: _wire.Lease(i))
    context = zmq.Context()
    streaming = dealer(context, leased.endpoint)  # one worker, two callers
    other = dealer(context, leased.endpoint)
    items = 40
    leftover = tmp_path / "leftover-cancelled"
    interleaved: list[tuple[str, dict[str, Any], float]] = [
        ("doubled", {"n": 21}, 0.0),
        ("snooze", {"seconds": 600.0}, 0.5),  # interrupted at its deadline
        ("leaves_a_task", {"marker": str(leftover)}, 0.0),
        ("cancels_itself", {}, 0.0),
    ]
    try:
        streaming.send(_call(1, "fed", {"n": items}, timeout=10))
        received: list[int] = []
        replies: list[Any] = []
        call_id = 100
        while True:
            frame = _receive(streaming)
            if not isinstance(frame, _wire.Yielded):
                break
            received.append(msgspec.msgpack.decode(frame.value))
            streaming.send(_wire.encoder.encode(_wire.More(1, 1)))
            if len(received) % 5 == 1:  # an async call between two items, several times
                name, arguments, timeout = interleaved[len(replies) % len(interleaved)]
                call_id += 1
                other.send(_call(call_id, name, arguments, timeout=timeout))
                replies.append(_receive(other))
        assert isinstance(frame, _wire.Result), frame
        assert received == list(range(items))
        kinds = [type(reply).__name__ for reply in replies]
        assert len(replies) == 8 and isinstance(replies[0], _wire.Result), kinds
        assert msgspec.msgpack.decode(replies[0].value) == 42
        assert isinstance(replies[1], _wire.Failure) and replies[1].kind == "timeout", replies[1]
        # A call's own leftover task is still cancelled when it returns (its finally ran).
        assert isinstance(replies[2], _wire.Result) and leftover.exists()
    finally:
        streaming.close(linger=0)
        other.close(linger=0)
        context.destroy(linger=0)


@pytest.mark.timeout(90)
def test_a_deadline_that_lands_in_a_streams_task_interrupts_only_its_own_call(
    client: scatter.Client,
) -> None:
    # The worker interrupts a call with SIGALRM, raised in whatever Python code runs. On
    # the one event loop that may be a stream's task: the call's own tasks are cancelled
    # instead, and the stream's task goes on (before, it died with the interrupt, the call
    # slept on, and its worker was killed kill_grace later).
    for fn in (fed_by_a_blocking_task, snooze):
        client.publish(fn)
    leased = client.request(lambda i: _wire.Lease(i))
    context = zmq.Context()
    streaming = dealer(context, leased.endpoint)
    other = dealer(context, leased.endpoint)
    items = 6
    try:
        streaming.send(_call(1, "fed_by_a_blocking_task", {"n": items}, timeout=20))
        first = _receive(streaming)
        assert isinstance(first, _wire.Yielded), first
        received = [msgspec.msgpack.decode(first.value)]
        # The producer holds the loop 0.3 s at a time: the call's 0.2 s alarm lands there.
        other.send(_call(2, "snooze", {"seconds": 600.0}, timeout=0.2))
        reply = _receive(other)
        assert isinstance(reply, _wire.Failure) and reply.kind == "timeout", reply
        while True:
            frame = _receive(streaming)
            if not isinstance(frame, _wire.Yielded):
                break
            received.append(msgspec.msgpack.decode(frame.value))
        assert isinstance(frame, _wire.Result), frame
        assert received == list(range(items))
        other.send(_call(3, "snooze", {"seconds": 0.0}))  # the same worker, still serving
        done = _receive(other)
        assert isinstance(done, _wire.Result), done
    finally:
        streaming.close(linger=0)
        other.close(linger=0)
        context.destroy(linger=0)
