"""Whether a sync caller polls for a reply before it sleeps on the socket."""

from __future__ import annotations

import os
import time

import zmq

# Plain ints: pyzmq's flag enums make `events & zmq.POLLIN` cost ~0.6 us (Python-level
# IntFlag arithmetic) against ~0.03 us, several times per call.
POLLIN = int(zmq.POLLIN)
POLLOUT = int(zmq.POLLOUT)


class ReplyPolling:
    """Whether a sync caller polls for a function's reply before sleeping on the socket.

    A sleeping caller costs two thread wake-ups per call (zmq's I/O thread, then the
    caller), 30-70 us each when they cross cores on a small VM. Polling for the reply,
    yielding the core between looks, skips both: one-client ``add`` runs about 1.7x as
    many calls per second in ``cluster/bench.py``. It only pays while the reply comes
    within the window, so each function keeps a moving average of how often its polls
    ran out. Above ``MAX_MISSES``, calls sleep at once, and one in ``PROBE_EVERY`` polls
    anyway to notice when polling would pay again. So functions slower than the window,
    and short ones on a machine with no core to spare (their replies come late: several
    busy clients on two cores), stop polling and burn no CPU waiting. Threads race on
    the average harmlessly: it is a hint, one float store at a time.

    Also counting a long yield as a miss (a contended core) was tried and measured: it
    halved the one-client gain and bought nothing with four clients.
    """

    WINDOW = 0.00025  # seconds polled before sleeping
    MAX_MISSES = 0.2
    # A probe on a busy machine wastes up to WINDOW of CPU: 1 in 64 keeps that near 4 us
    # per call, and still notices within a few hundred calls that polling pays again.
    PROBE_EVERY = 64

    __slots__ = ("calls", "misses")

    def __init__(self) -> None:
        self.misses = 0.0
        self.calls = 0

    def wanted(self) -> bool:
        self.calls = calls = self.calls + 1
        return self.misses < self.MAX_MISSES or calls % self.PROBE_EVERY == 0

    def wait(self, sock: zmq.Socket[bytes]) -> None:
        """Poll ``sock`` until it is readable or the window ends."""
        give_up = time.perf_counter() + self.WINDOW
        while True:
            events: int = sock.getsockopt(zmq.EVENTS)  # type: ignore[assignment]
            if events & POLLIN:
                self.misses -= self.misses * 0.0625
                return
            if time.perf_counter() > give_up:
                self.misses += (1.0 - self.misses) * 0.0625
                return
            # sched_yield, not a busy loop: the worker or the I/O thread may be waiting
            # for this very core; it also drops the GIL for the caller's other threads.
            os.sched_yield()
