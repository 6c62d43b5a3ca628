"""The pyzmq <-> Trio bridge: a send from one task must not strand the receiving task."""

from __future__ import annotations

import math
import sys
import textwrap
import time

import pytest
import trio
import zmq

from scatter._transport._zmq_trio import TrioSocket

# A sync DEALER in its own process (a thread would queue behind the Trio thread for the
# GIL): request after reply, each with a deadline, until REQUESTS or BUDGET_S. Prints
# "answered stranded", stranded being the first request not answered in time, or -1.
CALLER = textwrap.dedent(
    """
    import sys, time, zmq
    address, requests, budget, deadline = sys.argv[1], int(sys.argv[2]), *map(float, sys.argv[3:])
    context = zmq.Context()
    dealer = context.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(address)
    stop_at = time.monotonic() + budget
    answered, stranded = 0, -1
    while answered < requests and time.monotonic() < stop_at:
        request = answered.to_bytes(4, "big")
        dealer.send(request)
        if not dealer.poll(int(deadline * 1000)):
            # Nothing else ever reaches the server's socket: a request whose wake-up
            # was lost stays unread, so stop at the first one.
            stranded = answered
            break
        assert dealer.recv() == request
        answered += 1
    print(answered, stranded)
    dealer.close(linger=0)
    context.term()
    """
)
REQUESTS = 4_000
BUDGET_S = 5.0  # the caller stops after REQUESTS or this long, whichever comes first
REQUEST_DEADLINE_S = 1.0  # a reply on loopback takes well under a millisecond
PAUSE_S = 0.002  # between the notifier's notices
WORK_S = 0.002  # the notifier's work before each notice


@pytest.mark.timeout(30)
def test_send_from_another_task_does_not_strand_the_receiver() -> None:
    # One ROUTER, three Trio tasks: the receiver (the only task that receives), a replier
    # that sends the replies it is handed, and a notifier that sends to a listener peer
    # that never answers (like a node's lease reply, sent from its own task to a client
    # that then talks to its worker). A caller process makes requests one after another.
    #
    # ZMQ_FD is edge-triggered: a send processes the socket's mailbox, and if a request's
    # "readable" command is in it, that send consumes the fd edge the parked receiver was
    # waiting for. Here no later message re-arms the fd (the caller waits for its reply,
    # the listener never sends), so unless the send wakes the receiver, the request stays
    # unread. Every request must be answered within REQUEST_DEADLINE_S.
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    router: zmq.Socket[bytes] = context.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    address = f"tcp://127.0.0.1:{port}"
    listener: zmq.Socket[bytes] = context.socket(zmq.DEALER)
    listener.setsockopt(zmq.LINGER, 0)
    listener.setsockopt(zmq.IDENTITY, b"listener")
    listener.connect(address)
    sock = TrioSocket(router)
    caller: list[trio.CompletedProcess[bytes]] = []

    async def receive(to_replier: trio.MemorySendChannel[list[bytes]]) -> None:
        while True:
            to_replier.send_nowait(await sock.recv_multipart())

    async def reply(from_receiver: trio.MemoryReceiveChannel[list[bytes]]) -> None:
        async for frames in from_receiver:
            sock.send_multipart_nowait(frames)

    async def notify() -> None:
        # Each notice takes WORK_S of work on the Trio thread before it is sent (a lease
        # may start a worker first). WORK_S is longer than libzmq's command throttle
        # (3M TSC ticks, ~1 ms: a send only reads the mailbox if that long has passed
        # since the last send that did), so the send reads the mailbox; and it is long
        # enough for the caller's next request to arrive meanwhile, after the loop last
        # polled the fd. That send then consumes the request's edge.
        while True:
            await trio.sleep(PAUSE_S)
            done_at = time.perf_counter() + WORK_S
            while time.perf_counter() < done_at:
                pass
            sock.send_multipart_nowait([b"listener", b"notice"])

    async def main() -> None:
        to_replier, from_receiver = trio.open_memory_channel[list[bytes]](math.inf)
        args = [str(REQUESTS), str(BUDGET_S), str(REQUEST_DEADLINE_S)]
        # Cancelling run_process kills the caller by its PID.
        with trio.fail_after(BUDGET_S + REQUEST_DEADLINE_S + 10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(receive, to_replier)
                nursery.start_soon(reply, from_receiver)
                nursery.start_soon(notify)
                caller.append(
                    await trio.run_process(
                        [sys.executable, "-c", CALLER, address, *args],
                        capture_stdout=True,
                        capture_stderr=True,
                        check=False,
                    )
                )
                nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    finally:
        listener.close(linger=0)
        sock.close()
        context.term()
    assert caller[0].returncode == 0, caller[0].stderr.decode()
    answered, stranded = map(int, caller[0].stdout.split())
    assert stranded == -1, (
        f"request {stranded} was not answered within {REQUEST_DEADLINE_S} s "
        f"(after {answered} answered): the receiver slept through it"
    )
    assert answered > 0
