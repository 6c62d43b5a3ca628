"""pyzmq bridged into Trio, without lost wake-ups.

pyzmq has no Trio integration. A zmq socket exposes ``ZMQ_FD``, which is *edge*
triggered: it becomes readable when commands reach the socket's mailbox (say, "a peer's
pipe has a message"), and *any* call that processes the mailbox (a send, a receive,
reading ``ZMQ_EVENTS``) clears it again, whichever task makes the call. ``ZMQ_EVENTS``
reports the real state. Three rules follow, and this module is where they live:

Rule 1: never wait on the fd before asking ``zmq.EVENTS``. A send or receive may consume
        the edge that announced the next message; if we then slept on the fd we would
        sleep forever with a message queued (the classic lost wake-up). So every wait is
        "try the operation without blocking; on EAGAIN, re-read EVENTS; sleep on the fd
        only while EVENTS says not ready".
Rule 2: one task receives from a socket, and sends happen without awaiting (ROUTER
        sends never block: they queue or drop), so two tasks never wait on the same fd
        (Trio raises BusyResourceError if they do). All of it on the Trio thread.
Rule 3: a send made while the receiving task sleeps on the fd re-reads EVENTS after it,
        and if a message is waiting, wakes the receiver (it sleeps inside a CancelScope
        it publishes; the send cancels it, and the receiver goes back to Rule 1). Rule 1
        alone is not enough: it covers the task that receives, but a send from another
        task (the node's ``handle_lease`` replies from its own task) can process the
        mailbox while the receiver sleeps, consume the edge of a request that just
        arrived, and leave it unread until some other peer's message re-arms the fd.
        A reviewer saw 3 requests in ~20,000 wait seconds that way. pyzmq's asyncio
        integration does the same (``_schedule_remaining_events`` after every send and
        receive). After a receive nothing is needed: the receiver is the task running,
        and it tries to receive again before it sleeps. A send while nobody sleeps on
        the fd costs nothing extra; otherwise one getsockopt.

Tests: ``test_send_from_another_task_does_not_strand_the_receiver`` (tests/transport)
strands a request within the first few hundred when Rule 3 is missing.
``test_control_socket_under_load_loses_no_wakeup`` (tests/node) hammers a node's control
socket from many client threads at once: every request must be answered. It cannot catch
Rule 3's case, because its peers' own requests re-arm the fd.
"""

from __future__ import annotations

import trio
import zmq


class TrioSocket:
    """A non-blocking zmq socket with awaitable receive for one Trio task."""

    def __init__(self, sock: zmq.Socket[bytes]) -> None:
        self.sock = sock
        self._fd: int = sock.getsockopt(zmq.FD)  # type: ignore[assignment]
        # The receiver's wait on the fd, while it sleeps there (rule 3).
        self._sleeping: trio.CancelScope | None = None

    async def _wait_readable(self) -> None:
        # Rule 1: EVENTS first, the fd only while it says nothing is queued.
        while not self._events() & zmq.POLLIN:
            self._sleeping = trio.CancelScope()
            try:
                with self._sleeping:
                    await trio.lowlevel.wait_readable(self._fd)
            finally:
                self._sleeping = None

    def _events(self) -> int:
        events: int = self.sock.getsockopt(zmq.EVENTS)  # type: ignore[assignment]
        return events

    def _wake_receiver(self) -> None:
        # Rule 3: another task touched the mailbox while the receiver sleeps on the fd.
        if self._sleeping is not None and self._events() & zmq.POLLIN:
            self._sleeping.cancel()

    async def recv_multipart(self) -> list[bytes]:
        while True:
            try:
                frames: list[bytes] = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                await self._wait_readable()
                continue
            # Let other tasks run between messages even under a flood.
            await trio.lowlevel.checkpoint()
            return frames

    async def recv_multipart_with_user(self) -> tuple[list[bytes], str]:
        """Frames and the ZAP ``User-Id`` of the peer that sent them ("" without ZAP)."""
        frames, user, _fd = await self.recv_multipart_with_source()
        return frames, user

    async def recv_multipart_with_source(self) -> tuple[list[bytes], str, int]:
        """Frames, the ZAP ``User-Id`` of their sender ("" without ZAP), and the file
        descriptor of the connection they came on (-1 if libzmq cannot say): what a
        socket monitor's ``EVENT_DISCONNECTED`` names when that connection closes."""
        while True:
            try:
                frames: list[zmq.Frame] = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                await self._wait_readable()
                continue
            await trio.lowlevel.checkpoint()
            try:
                user = frames[-1].get("User-Id") or ""
            except zmq.ZMQError:  # no ZAP handler named one
                user = ""
            try:
                fd = int(frames[-1].get(zmq.SRCFD))
            except zmq.ZMQError:
                fd = -1
            return [frame.bytes for frame in frames], str(user), fd

    def send_multipart_nowait(self, frames: list[bytes]) -> None:
        """Send without blocking (rule 2); raises ``zmq.Again`` if the peer's queue is full."""
        try:
            self.sock.send_multipart(frames, zmq.NOBLOCK)
        finally:
            # Even a refused send may have processed the mailbox.
            if not self.sock.closed:
                self._wake_receiver()

    def close(self) -> None:
        self.sock.close(linger=0)
