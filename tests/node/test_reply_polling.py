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
from cluster.launch import wait_until
from scatter._client import ReplyPolling


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


@pytest.mark.timeout(30)
def test_a_poll_returns_as_soon_as_the_reply_is_readable(
    pair: tuple[zmq.Socket[bytes], zmq.Socket[bytes]],
) -> None:
    caller, answerer = pair
    polling = ReplyPolling()
    answer_later = threading.Timer(0.00005, answerer.send, args=(b"reply",))
    answer_later.start()
    polling.wait(caller)
    answer_later.join()
    # Either it caught the reply or the window ran out first (a slow machine); both
    # leave the reply for the blocking recv that follows a poll.
    assert caller.recv() == b"reply"


def sleepy(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


@pytest.mark.timeout(60)
def test_calls_slower_than_the_window_stop_polling(client: scatter.Client) -> None:
    client.publish(sleepy)
    remote = client.make_callable("sleepy")
    for _ in range(30):
        assert remote(0.005) == 0.005  # 20x the window: every poll runs out
    assert remote._polling.misses > ReplyPolling.MAX_MISSES


def hold(started: str, release: str) -> bool:
    """Say it is running, then run until told to stop (or 10 s)."""
    Path(started).touch()
    deadline = time.monotonic() + 10
    while not Path(release).exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    return True


@pytest.mark.timeout(60)
def test_concurrent_calls_from_one_client_do_not_poll(
    client: scatter.Client, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Polling threads would take the GIL from each other: only a client's sole call polls.
    client.publish(sleepy)
    client.publish(hold)
    remote, holder = client.make_callable("sleepy"), client.make_callable("hold")
    waits: list[str] = []
    real_wait = ReplyPolling.wait

    def recording_wait(self: ReplyPolling, sock: zmq.Socket[bytes]) -> None:
        waits.append(threading.current_thread().name)
        real_wait(self, sock)

    monkeypatch.setattr(ReplyPolling, "wait", recording_wait)
    remote(0.0)
    assert waits == ["MainThread"]  # alone: it polls

    started, release = tmp_path / "started", tmp_path / "release"
    thread = threading.Thread(target=holder, args=(str(started), str(release)), name="holder")
    thread.start()
    try:
        wait_until(started.exists, 30, "the holding call runs")
        waits.clear()
        assert remote(0.0) == 0.0
        assert "MainThread" not in waits
    finally:
        release.touch()
        thread.join(30)
