"""When a sync caller polls for its reply, and when it sleeps on the socket at once.

The speed this buys is measured by ``cluster/bench.py``; these tests check the policy
only, on real sockets, with outcomes that do not depend on how fast the machine is.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

import scatter
from scatter._client import ReplyPolling
from tests.waiting import wait_until


@pytest.fixture
def pair() -> Iterator[tuple[zmq.Socket[bytes], zmq.Socket[bytes]]]:
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    caller, answerer = context.socket(zmq.PAIR), context.socket(zmq.PAIR)
    caller.bind("inproc://reply-polling")
    answerer.connect("inproc://reply-polling")
    try:
        yield caller, answerer
    finally:
        caller.close(linger=0)
        answerer.close(linger=0)
        context.term()


def _calls_that_poll(polling: ReplyPolling, calls: int) -> int:
    return sum(polling.wanted() for _ in range(calls))


@pytest.mark.timeout(30)
def test_replies_that_miss_the_window_stop_polling_but_probes_go_on(
    pair: tuple[zmq.Socket[bytes], zmq.Socket[bytes]],
) -> None:
    caller, answerer = pair
    polling = ReplyPolling()
    assert _calls_that_poll(polling, 100) == 100  # a new function polls
    for _ in range(20):
        polling.wait(caller)  # nothing ever arrives: each wait runs out its window
    assert polling.misses > ReplyPolling.MAX_MISSES
    assert _calls_that_poll(polling, 10 * ReplyPolling.PROBE_EVERY) == 10

    # Probes whose replies are there in time bring polling back.
    for _ in range(40):
        answerer.send(b"reply")
        polling.wait(caller)
        assert caller.recv() == b"reply"
    assert polling.misses < ReplyPolling.MAX_MISSES
    assert _calls_that_poll(polling, 100) == 100


def _a_few_misses(polling: ReplyPolling, caller: zmq.Socket[bytes]) -> float:
    for _ in range(3):
        polling.wait(caller)  # nothing to read: each wait runs out its window
    assert polling.misses > 0
    return polling.misses


@pytest.mark.timeout(30)
def test_a_reply_already_there_is_a_hit_and_stays_for_the_recv(
    pair: tuple[zmq.Socket[bytes], zmq.Socket[bytes]],
) -> None:
    caller, answerer = pair
    polling = ReplyPolling()
    misses = _a_few_misses(polling, caller)
    answerer.send(b"reply")
    wait_until(lambda: caller.poll(0), 10, "the reply is readable")
    polling.wait(caller)
    assert polling.misses < misses  # counted as a reply that came in time
    assert caller.recv(zmq.NOBLOCK) == b"reply"  # looking did not consume it


class _LongWindow(ReplyPolling):
    WINDOW = 20.0  # far longer than the reply takes: only readability can end the wait


@pytest.mark.timeout(60)
def test_a_poll_returns_when_the_reply_arrives_not_at_the_end_of_its_window(
    pair: tuple[zmq.Socket[bytes], zmq.Socket[bytes]],
) -> None:
    # With the real 250 us window, whether a reply sent "soon" lands inside it depends on
    # the scheduler; a 20 s window makes the outcome certain.
    caller, answerer = pair
    polling = _LongWindow()
    polling.misses = misses = 0.5  # as after some misses (three 20 s windows are too long)
    answer_later = threading.Timer(0.05, answerer.send, args=(b"reply",))
    started = time.monotonic()
    answer_later.start()
    polling.wait(caller)
    elapsed = time.monotonic() - started
    answer_later.join()
    assert caller.poll(0), "the wait returned before the reply was readable"
    assert elapsed < _LongWindow.WINDOW / 2, elapsed
    assert polling.misses < misses
    assert caller.recv(zmq.NOBLOCK) == b"reply"


def sleepy(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


@pytest.fixture
def polled_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The thread name of every call that polled for its reply, in order."""
    waits: list[str] = []
    real_wait = ReplyPolling.wait

    def recording_wait(self: ReplyPolling, sock: zmq.Socket[bytes]) -> None:
        waits.append(threading.current_thread().name)
        real_wait(self, sock)

    monkeypatch.setattr(ReplyPolling, "wait", recording_wait)
    return waits


@pytest.mark.timeout(60)
def test_calls_slower_than_the_window_stop_polling(
    client: scatter.Client, polled_calls: list[str]
) -> None:
    client.publish(sleepy)
    remote = client.make_callable("sleepy")
    assert remote(0.005) == 0.005
    assert polled_calls == ["MainThread"]  # a new function polls
    # Each reply comes 20x the window late: every poll is a miss, and after a few of them
    # calls sleep at once. The first probe is due at call PROBE_EVERY, past these 50.
    assert ReplyPolling.PROBE_EVERY > 50
    for _ in range(29):
        assert remote(0.005) == 0.005
    assert len(polled_calls) < 10, polled_calls
    polled_calls.clear()
    for _ in range(20):
        assert remote(0.005) == 0.005
    assert polled_calls == []


def hold(started: str, release: str) -> bool:
    """Say it is running, then run until told to stop (or 10 s)."""
    Path(started).touch()
    deadline = time.monotonic() + 10
    while not Path(release).exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    return True


@pytest.mark.timeout(60)
def test_concurrent_calls_from_one_client_do_not_poll(
    client: scatter.Client, polled_calls: list[str], tmp_path: Path
) -> None:
    # Polling threads would take the GIL from each other: only a client's sole call polls.
    client.publish(sleepy)
    client.publish(hold)
    remote, holder = client.make_callable("sleepy"), client.make_callable("hold")
    remote(0.0)
    assert polled_calls == ["MainThread"]  # alone: it polls

    started, release = tmp_path / "started", tmp_path / "release"
    thread = threading.Thread(target=holder, args=(str(started), str(release)), name="holder")
    thread.start()
    try:
        wait_until(started.exists, 30, "the holding call runs")
        polled_calls.clear()
        assert remote(0.0) == 0.0
        assert "MainThread" not in polled_calls
    finally:
        release.touch()
        thread.join(30)
