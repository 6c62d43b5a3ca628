"""pyzmq bridged into Trio, without lost wake-ups.

pyzmq has no Trio integration. A zmq socket exposes ``ZMQ_FD``, which is *edge*
triggered: it becomes readable when the socket's state may have changed, and reading
``ZMQ_EVENTS`` both reports the state and re-arms the edge. Two rules follow, and this
module is where they live:

Rule 1: never wait on the fd before asking ``zmq.EVENTS``. A send or receive may consume
        the edge that announced the next message; if we then slept on the fd we would
        sleep forever with a message queued (the classic lost wake-up). So every wait is
        "try the operation without blocking; on EAGAIN, re-read EVENTS; sleep on the fd
        only while EVENTS says not ready".
Rule 2: one task receives from a socket, and sends happen without awaiting (ROUTER
        sends never block: they queue or drop), so two tasks never wait on the same fd
        (Trio raises BusyResourceError if they do).

``test_control_socket_under_load_loses_no_wakeup`` hammers a node's control socket from
many client threads at once: every request must be answered.
"""

from __future__ import annotations

import trio
import zmq


class TrioSocket:
    """A non-blocking zmq socket with awaitable receive for one Trio task."""

    def __init__(self, sock: zmq.Socket[bytes]) -> None:
        self.sock = sock
        self._fd: int = sock.getsockopt(zmq.FD)  # type: ignore[assignment]

    async def _wait_readable(self) -> None:
        # Rule 1: EVENTS first, the fd only while it says nothing is queued.
        while not self._events() & zmq.POLLIN:
            await trio.lowlevel.wait_readable(self._fd)

    def _events(self) -> int:
        events: int = self.sock.getsockopt(zmq.EVENTS)  # type: ignore[assignment]
        return events

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

    def send_multipart_nowait(self, frames: list[bytes]) -> None:
        """Send without blocking (rule 2); raises ``zmq.Again`` if the peer's queue is full."""
        self.sock.send_multipart(frames, zmq.NOBLOCK)

    def close(self) -> None:
        self.sock.close(linger=0)
