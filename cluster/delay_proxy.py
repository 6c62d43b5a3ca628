"""A TCP relay that holds what it carries: the chaos rig's delay and reordering faults.

``tc netem`` is missing from this kernel (no ``sch_netem``), so the rig delays
node-to-node traffic in user space. nftables NAT rules (``cluster/chaos.py``,
``Network.redirect``) send a chosen node's new connections to a peer's port here instead;
the relay asks the kernel where each one was going (``SO_ORIGINAL_DST``) and connects
there itself. Its own connections come from the rig's process, outside every node's
cgroup, so the rules do not send them back here.

What is delayed, what is reordered, and what is not:

- **Delayed**: every chunk the relay reads from one end is held for a random time drawn
  from ``[low, high]`` seconds, independently per chunk and per direction, before it is
  written to the other end. A chunk is never released before the chunk read before it in
  the same direction, so a long hold also holds what follows it (as a slow link does).
- **Reordered**: messages on *different* connections. Each node has one connection to
  each peer it sends to (a ZeroMQ DEALER to the peer's ROUTER, carrying SWIM gossip,
  registry changes and digests one way), so a message A sends B after one it sent C may
  reach B first; a change A pushes to C may reach C after B gossiped C a later change
  that depends on it (C must hold it until its causal past arrives); an ack may overtake
  the probe it answers, forwarded by a third node.
- **Not reordered**: bytes within one TCP connection. TCP delivers a connection's bytes in
  order on every real network, and reordering them would only break ZMTP/CURVE framing
  (a decryption failure and a dropped connection), a fault no network produces.

A relayed connection ends when either end closes it (the other end is closed once what
was read from the first has been written). ``stop`` stops reading, writes what it holds
(within its hold times), then closes every connection, as a link coming back after a
reroute: what was still in a sender's kernel buffers is lost, as on any reset connection.
"""

from __future__ import annotations

import contextlib
import math
import random
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass

import trio

SO_ORIGINAL_DST = 80  # <linux/netfilter_ipv4.h>, at level SOL_IP: the address before DNAT
CHUNK_BYTES = 65536
# Chunks held per direction before the relay stops reading that end: the sender then
# meets a full TCP window, as behind a slow link, instead of the relay's memory growing.
HELD_CHUNKS = 1024


def original_destination(sock: trio.socket.SocketType) -> tuple[str, int]:
    """Where a redirected connection was going (``struct sockaddr_in`` from conntrack)."""
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    (port,) = struct.unpack_from("!H", raw, 2)
    return socket.inet_ntoa(raw[4:8]), port


@dataclass
class RelayCounts:
    connections: int = 0  # relayed to their destination
    refused: int = 0  # whose destination did not accept (a killed node, say)
    chunks: int = 0  # written on, both directions
    bytes: int = 0
    holding: int = 0  # chunks read and not yet written on (nor dropped)
    dropped: int = 0  # chunks held when their connection closed: lost, as on a reset


class DelayProxy:
    """Listens on a loopback port; relays each connection with every chunk held a while.

    Runs its own Trio loop in a thread, so the caller (the nemesis, a test) stays
    synchronous. ``destination`` says where an accepted connection goes: by default where
    it was going before nftables redirected it. The holds are drawn from ``Random(seed)``;
    which chunk gets which hold depends on timing, as everything on a network does.

    Resource handling: the listener, every relayed connection and the thread end in
    :meth:`stop` (also called by leaving a ``with`` block).
    """

    def __init__(
        self,
        low: float,
        high: float,
        *,
        seed: int | str = 0,
        destination: Callable[[trio.socket.SocketType], tuple[str, int]] = original_destination,
        host: str = "127.0.0.1",
    ) -> None:
        if not 0 <= low <= high:
            raise ValueError(f"a hold of {low} to {high} s")
        self.low, self.high = low, high
        self.host = host
        self.port = 0
        self.counts = RelayCounts()
        self._destination = destination
        self._random = random.Random(seed)
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        # Connecting and reading, per connection and direction: what stop() cancels.
        self._stoppable: set[trio.CancelScope] = set()
        self._stopping = False
        self._accepting: trio.CancelScope | None = None
        self._everything: trio.CancelScope | None = None

    def start(self) -> int:
        """Listen and relay in the background; the port it listens on."""
        self._thread = threading.Thread(target=self._run, name="delay-proxy", daemon=True)
        self._thread.start()
        self._ready.wait(10)
        if self._failure is not None:
            raise RuntimeError("the delay proxy did not start") from self._failure
        if not self.port:
            raise RuntimeError("the delay proxy did not start within 10 s")
        return self.port

    def stop(self) -> RelayCounts:
        """Stop accepting and reading, write on what is held, close everything.

        Raises if the relay failed while it ran: its connections would then have been
        refused, a partition passed off as a delay."""
        thread, token = self._thread, self._token
        if thread is not None and token is not None and thread.is_alive():
            with contextlib.suppress(trio.RunFinishedError):  # it ended between look and call
                trio.from_thread.run_sync(self._stop_reading, trio_token=token)
            thread.join(self.high + 5)  # the longest hold, and time for a loaded machine
            if thread.is_alive():
                with contextlib.suppress(trio.RunFinishedError):
                    trio.from_thread.run_sync(self._cancel_everything, trio_token=token)
                thread.join(10)
        if self._failure is not None:
            failure, self._failure = self._failure, None
            raise RuntimeError("the delay proxy failed while it relayed") from failure
        return self.counts

    def __enter__(self) -> DelayProxy:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- inside the relay's Trio loop --

    def _run(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:  # told to start(); the thread has no one else to tell
            self._failure = exc
            self._ready.set()

    async def _main(self) -> None:
        listener = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        with listener:
            await listener.bind((self.host, 0))
            listener.listen(128)
            self._token = trio.lowlevel.current_trio_token()
            with trio.CancelScope() as self._everything:
                async with trio.open_nursery() as nursery:
                    with trio.CancelScope() as self._accepting:
                        self.port = listener.getsockname()[1]
                        self._ready.set()
                        while True:
                            accepted, _ = await listener.accept()
                            nursery.start_soon(self._relay, accepted)

    def _stop_reading(self) -> None:
        self._stopping = True
        if self._accepting is not None:
            self._accepting.cancel()
        for scope in self._stoppable:
            scope.cancel()

    def _cancel_everything(self) -> None:
        if self._everything is not None:
            self._everything.cancel()

    async def _relay(self, accepted: trio.socket.SocketType) -> None:
        async with trio.SocketStream(accepted) as near:
            far = await self._connect(accepted)
            if far is None:
                return
            self.counts.connections += 1
            async with far, trio.open_nursery() as connection:
                for source, sink in ((near, far), (far, near)):
                    held_send, held_receive = trio.open_memory_channel[tuple[float, bytes] | None](
                        HELD_CHUNKS
                    )
                    reading = trio.CancelScope()
                    self._stoppable.add(reading)
                    connection.start_soon(self._read, source, held_send, reading)
                    connection.start_soon(self._write, held_receive, sink, connection.cancel_scope)

    async def _connect(self, accepted: trio.socket.SocketType) -> trio.SocketStream | None:
        """To where ``accepted`` was going; None if it refuses or the relay is stopping."""
        if self._stopping:
            return None
        far = None
        with trio.CancelScope() as connecting:  # cancelled by stop(): far stays None
            self._stoppable.add(connecting)
            try:
                host, port = self._destination(accepted)
                far = await trio.open_tcp_stream(host, port)
            except OSError:
                self.counts.refused += 1
            finally:
                self._stoppable.discard(connecting)
        if far is not None and self._stopping:
            await far.aclose()
            return None
        return far

    async def _read(
        self,
        source: trio.SocketStream,
        held: trio.MemorySendChannel[tuple[float, bytes] | None],
        reading: trio.CancelScope,
    ) -> None:
        release = -math.inf
        try:
            async with held:
                with reading:
                    while True:
                        try:
                            data = await source.receive_some(CHUNK_BYTES)
                        except (trio.BrokenResourceError, trio.ClosedResourceError):
                            data = b""
                        if not data:
                            await held.send(None)  # this end closed: close the other once written
                            return
                        hold = self._random.uniform(self.low, self.high)
                        # Never before the chunk read before it: a connection's bytes keep
                        # their order, as TCP keeps them.
                        release = max(release, trio.current_time() + hold)
                        self.counts.holding += 1
                        try:
                            await held.send((release, data))
                        except trio.Cancelled:
                            self.counts.holding -= 1
                            raise
        finally:
            self._stoppable.discard(reading)

    async def _write(
        self,
        held: trio.MemoryReceiveChannel[tuple[float, bytes] | None],
        sink: trio.SocketStream,
        connection: trio.CancelScope,
    ) -> None:
        async with held:
            try:
                async for item in held:
                    if item is None:
                        break
                    release, data = item
                    try:
                        await trio.sleep_until(release)
                        await sink.send_all(data)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        self.counts.dropped += 1
                        break
                    finally:
                        self.counts.holding -= 1
                    self.counts.chunks += 1
                    self.counts.bytes += len(data)
                else:
                    return  # stopped: the other direction may still be writing what it holds
                connection.cancel()  # one end is gone, so is the connection (both ends)
            finally:
                self._count_dropped(held)

    def _count_dropped(self, held: trio.MemoryReceiveChannel[tuple[float, bytes] | None]) -> None:
        while True:
            try:
                item = held.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                return
            if item is not None:
                self.counts.holding -= 1
                self.counts.dropped += 1
