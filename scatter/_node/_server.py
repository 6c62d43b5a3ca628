"""The node process: a thin Trio driver around the pure node core.

Every decision is the core's (``scatter/_core/_node.py``): this module feeds it events
(frames, persisted writes, worker processes starting and exiting, ticks) and performs
the effects it returns, in order. Task tree (stopping the node is cancelling it)::

    serve_node
    +-- serve_control       the ROUTER at the node's address: frames in, replies out
    +-- persist             the store's writes, one at a time, in a thread
    +-- tick                every supervise_interval: the workers' slots to the core
    +-- run_worker (each)   start one worker process, report it, wait for its exit
    +-- (signal watcher)    SIGTERM / SIGINT stop the node cleanly

Calls do not pass through here: clients lease a worker and talk to it directly
(see ``_worker.py``). Blocking disk work runs in a thread, never on this loop, so
deadlines and (next) membership timers never wait behind a commit.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import gc
import os
import platform
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import IO, Any

import trio
import zmq
from zmq.utils.monitor import parse_monitor_message

from .. import _wire
from .._config import NodeConfig, default_data_dir, parse_address
from .._core import _node as core_effects
from .._core._membership import MemberInfo, State
from .._core._node import NodeCore, NodeFacts
from .._core._registry import Change, Snapshot
from .._exceptions import ConfigError
from .._security import (
    WORKER_CLIENTS_VARIABLE,
    WORKER_KEY_VARIABLE,
    ClientKeys,
    NodeKeys,
    apply_client_keys,
    apply_server_keys,
    call_only_secret,
    client_keys,
    ensure_user_secret,
    node_keys,
)
from .._transport._zmq_trio import TrioSocket
from ._slots import SharedSlots
from ._store import NodeIdentity, RegistryStore

SCATTER_VERSION = "0.1.0"

# A relayed call (core_effects.RelayCall): how long its frame may wait for the member's
# worker to connect before it is answered as not sent; the margin past the call's wait
# and the workers' kill grace before the relay says it may have run; how often a wait
# looks at the connection.
_RELAY_SEND_TIMEOUT = 2.0
_RELAY_MARGIN = 1.0
_RELAY_LOOK_INTERVAL = 0.1

# An event the core and the driver took longer than this (seconds) to handle is logged
# (its kind and time only): the loop did nothing else meanwhile, acks included.
_SLOW_EVENT = 0.1

# Bodies kept in memory for pushes (RecentBodies): at most this many bytes in all, and
# only bodies of at most this size (a big one is rare and is read from the store).
_RECENT_BODIES_BYTES = 16 * 2**20
_RECENT_BODY_MAX = 2**20


Write = core_effects.PersistChanges | core_effects.PersistViews | core_effects.PersistMembers


class PeerSockets:
    """One DEALER per peer address, for one-way node-to-node messages (CURVE, peer key).

    Resource handling: a peer's queue holds at most ``PEER_QUEUE`` messages; past that
    (a dead or slow peer) messages are dropped, as SWIM and anti-entropy expect a lossy
    network. The socket to a member forgotten for good is closed by :meth:`forget`
    (``ClosePeer``); one to a member only dead stays, for it may come back.
    """

    PEER_QUEUE = 64

    def __init__(self, keys: ClientKeys) -> None:
        self._keys = keys
        self._context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self._sockets: dict[str, zmq.Socket[bytes]] = {}

    def send(self, address: str, payload: bytes) -> None:
        sock = self._sockets.get(address)
        if sock is None:
            sock = self._context.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 200)  # a goodbye (leave) gets a moment to leave
            sock.setsockopt(zmq.SNDHWM, self.PEER_QUEUE)
            apply_client_keys(sock, self._keys)
            try:
                sock.connect(address)
            except zmq.ZMQError:
                sock.close(linger=0)
                return
            self._sockets[address] = sock
        with contextlib.suppress(zmq.ZMQError):  # full: dropped, as a lossy network does
            sock.send(payload, zmq.NOBLOCK)

    def forget(self, address: str) -> None:
        sock = self._sockets.pop(address, None)
        if sock is not None:
            sock.close(linger=0)

    def close(self) -> None:
        for sock in self._sockets.values():
            sock.close()
        self._sockets.clear()


class _GarbageCollections:
    """Seconds the cyclic garbage collector ran in this process, so far (gc.callbacks)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._began = 0.0
        gc.callbacks.append(self._phase)

    def _phase(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._began = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self._began


_GC = _GarbageCollections()


class RecentBodies:
    """The bodies this node stored or read lately, by content id, least recent out first.

    Why: a change is pushed to every peer at once and piggybacked to a few more after;
    each push reading its bodies from the store took a thread hop of its own, and on a
    busy machine those hops were most of the time a new version took to reach a peer.
    A body is immutable under its content id; one whose last version went is dropped.
    """

    def __init__(self, limit: int = _RECENT_BODIES_BYTES, largest: int = _RECENT_BODY_MAX):
        self._bodies: collections.OrderedDict[str, bytes] = collections.OrderedDict()
        self._size = 0
        self._limit = limit
        self._largest = largest

    def __len__(self) -> int:
        return len(self._bodies)

    def put(self, content_id: str, body: bytes) -> None:
        if len(body) > self._largest or content_id in self._bodies:
            return
        self._bodies[content_id] = body
        self._size += len(body)
        while self._size > self._limit:
            _, old = self._bodies.popitem(last=False)
            self._size -= len(old)

    def drop(self, content_ids: Iterable[str]) -> None:
        for content_id in content_ids:
            body = self._bodies.pop(content_id, None)
            if body is not None:
                self._size -= len(body)

    def get_all(self, content_ids: Iterable[str]) -> dict[str, bytes] | None:
        """Every one of ``content_ids``, or None when one is not held here."""
        found = {}
        for content_id in content_ids:
            body = self._bodies.get(content_id)
            if body is None:
                return None
            self._bodies.move_to_end(content_id)
            found[content_id] = body
        return found


class NodeDriver:
    """Performs the core's effects with sockets, processes, a store and a thread."""

    def __init__(
        self,
        config: NodeConfig,
        core: NodeCore,
        store: RegistryStore,
        slots: SharedSlots,
        control: TrioSocket,
        run_dir: Path,
        keys: NodeKeys,
    ) -> None:
        self.config = config
        self.keys = keys
        self.core = core
        self.store = store
        self.slots = slots
        self.control = control
        self.handshakes = TrioSocket(
            control.sock.get_monitor_socket(
                zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED | _HANDSHAKE_FAILURES
            )
        )
        self.run_dir = run_dir
        self.stop_requested = trio.Event()
        self.exit_code = 0
        self._processes: dict[int, trio.Process] = {}  # {slot: worker process}
        self._writes, self._to_persist = trio.open_memory_channel[Write](float("inf"))
        self.peers = PeerSockets(keys.peer)
        self.recent_bodies = RecentBodies()
        self._nursery: trio.Nursery | None = None
        # Workers watch the read end: it reaches EOF when this process is gone, however
        # it went (SIGKILL included). The write end is never written, only held.
        self._parent_read, self._parent_write = os.pipe()
        # {fd: peer} of control connections that sent a frame: the monitor's
        # EVENT_DISCONNECTED names only the fd, which the next connection reuses.
        self._connections: dict[int, bytes] = {}
        # {fd: close events still to come for connections already known gone}
        self._late_closes: collections.Counter[int] = collections.Counter()
        # The keys a relayed call reaches a member's worker with, by its client's role
        # (a call-only client's call stays call-only there: no pickles).
        self.relay_keys: dict[str, ClientKeys] = {}
        # Test hook (SCATTER_TEST_DROP_RELAYED_REPLIES=1): a relayed call runs, but its
        # reply is dropped here, as if lost on the way back (tests of at most once).
        self.drop_relayed_replies = False
        # NodeConfig.log_membership: what was last logged of each member.
        self._logged_version = -1
        self._logged_members: dict[str, tuple[State, int]] = {}

    # -- effects ------------------------------------------------------------------

    def feed(self, event: Callable[..., list[core_effects.Effect]], *args: Any, **kw: Any) -> None:
        """Give the core an event and perform what it returns.

        Error handling: a bug (ours) in the core or in performing an effect is logged
        with its type and place, never its values, and the node goes on: no task dies
        of one bad event.
        """
        began, began_cpu, began_gc = time.perf_counter(), time.thread_time(), _GC.seconds
        what = getattr(event, "__name__", "an event")
        try:
            self.perform(event(*args, **kw))
        except Exception as exc:
            log_internal(exc, f"handling {what}")
        took = time.perf_counter() - began
        if took > _SLOW_EVENT:  # the loop stood still: membership timers and all
            # Its CPU says whether the work was slow or the machine gave us no core.
            cpu = time.thread_time() - began_cpu
            collecting = _GC.seconds - began_gc
            log(
                f"handling {what} took {took * 1000:.0f} ms "
                f"({cpu * 1000:.0f} ms of CPU, {collecting * 1000:.0f} ms collecting garbage)"
            )
        if self.config.log_membership and self.core.membership.version != self._logged_version:
            self._log_members()

    def _log_members(self) -> None:
        membership = self.core.membership
        self._logged_version = membership.version
        now = time.monotonic()  # one clock for every process of the machine: logs line up
        for node, member in membership.known().items():
            seen = (member.state, member.incarnation)
            was = self._logged_members.get(node)
            if was != seen:
                self._logged_members[node] = seen
                before = "new" if was is None else f"was {was[0].name.lower()} {was[1]}"
                log(
                    f"member {node} {member.state.name.lower()} {member.incarnation} "
                    f"({before}) at {now:.3f}"
                )

    def perform(self, effects: Iterable[core_effects.Effect]) -> None:
        # One change goes to every peer in one list of effects: encoded once.
        pushed: dict[int, bytes] = {}
        for effect in effects:
            if isinstance(effect, core_effects.Send):
                send_reply(self.control, effect.peer, effect.payload)
            elif isinstance(effect, core_effects.RelayCall):
                assert self._nursery is not None
                self._nursery.start_soon(self.relay_call, effect)
            elif isinstance(effect, core_effects.SendPeer):
                self.peers.send(effect.address, effect.payload)
            elif isinstance(effect, core_effects.ClosePeer):
                self.peers.forget(effect.address)
            elif isinstance(effect, core_effects.PushChanges):
                payload = self._push_payload(effect, pushed)
                if payload is not None:
                    self.peers.send(effect.address, payload)
                else:  # a body to read from the store: off the loop
                    assert self._nursery is not None
                    self._nursery.start_soon(self.push_changes, effect)
            elif isinstance(effect, core_effects.PushBodies):
                assert self._nursery is not None
                self._nursery.start_soon(self.push_bodies, effect)
            elif isinstance(
                effect,
                core_effects.PersistChanges
                | core_effects.PersistViews
                | core_effects.PersistMembers,
            ):
                self._writes.send_nowait(effect)
            elif isinstance(effect, core_effects.BumpGeneration):
                self.slots.bump_generation()
            elif isinstance(effect, core_effects.StartWorker):
                assert self._nursery is not None
                self._nursery.start_soon(self.run_worker, effect.slot)
            elif isinstance(effect, core_effects.KillWorker):
                self._signal(effect.slot, signal.SIGKILL)
            elif isinstance(effect, core_effects.StopWorker):
                self._signal(effect.slot, signal.SIGTERM)
            elif isinstance(effect, core_effects.Log):
                log(effect.message)
            elif isinstance(effect, core_effects.Stop):
                if effect.failed:
                    log(f"stopping: {effect.reason}")
                    self.exit_code = 1
                self.stop_requested.set()

    async def relay_call(self, relay: core_effects.RelayCall) -> None:
        """Send a client's call frame, unchanged, to the worker leased for it; answer the
        client with the worker's reply (``Relayed``). At most once: the frame is sent
        once, never again, whatever happens; a worker that drops the connection or stays
        silent past the call's wait is answered as a failure that says it may have run."""
        try:
            reply = await self._relayed_reply(relay)
        except Exception as exc:
            log_internal(exc, "relaying a call")
            reply = _wire.encoder.encode(
                _wire.Failure(
                    relay.call_id,
                    "crashed",
                    "the node relaying this call failed while it waited (its log says "
                    "where); the call may have run",
                )
            )
        if self.drop_relayed_replies:
            return
        relayed = _wire.encoder.encode(_wire.Relayed(relay.request_id, reply))
        send_reply(self.control, relay.peer, relayed)

    async def _relayed_reply(self, relay: core_effects.RelayCall) -> bytes:
        context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        sock: zmq.Socket[bytes] = context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IMMEDIATE, 1)  # a send waits for the connection: never queued
        sock.setsockopt(zmq.RECONNECT_IVL, -1)  # one worker process, never another
        apply_client_keys(sock, self.relay_keys.get(relay.role) or self.relay_keys["call"])
        monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        try:
            sock.connect(relay.endpoint)
            sent_by = trio.current_time() + _RELAY_SEND_TIMEOUT
            while True:
                try:
                    sock.send(relay.call, zmq.NOBLOCK)
                    break
                except zmq.Again:
                    if trio.current_time() > sent_by:
                        return _wire.encoder.encode(
                            _wire.Failure(
                                relay.call_id,
                                "internal",
                                f"this node could not reach the worker at {relay.endpoint} "
                                f"within {_RELAY_SEND_TIMEOUT:g} s; the call was not sent (it "
                                "did not run)",
                            )
                        )
                    await trio.sleep(0.005)
            receiver = TrioSocket(sock)
            give_up = trio.current_time() + relay.wait + self.config.kill_grace + _RELAY_MARGIN
            while True:
                with trio.move_on_after(_RELAY_LOOK_INTERVAL):
                    frames = await receiver.recv_multipart()
                    return frames[-1]
                events: int = monitor.getsockopt(zmq.EVENTS)  # type: ignore[assignment]
                if events & zmq.POLLIN:
                    return _wire.encoder.encode(
                        _wire.Failure(
                            relay.call_id,
                            "crashed",
                            "the worker running the relayed call went away before it "
                            "answered (it exited, or its node died); the call may have run",
                        )
                    )
                if trio.current_time() > give_up:
                    return _wire.encoder.encode(
                        _wire.Failure(
                            relay.call_id,
                            "timeout",
                            f"no reply from the worker within {relay.wait:g} s plus "
                            "its grace; the call may have run",
                        )
                    )
        finally:
            with contextlib.suppress(zmq.ZMQError):
                sock.disable_monitor()
            monitor.close(linger=0)
            sock.close(linger=0)

    def _signal(self, slot: int, signum: int) -> None:
        process = self._processes.get(slot)
        if process is not None and process.returncode is None:
            process.send_signal(signum)

    def readings(self) -> dict[int, tuple[int, float]]:
        return {slot: self.slots.read(slot) for slot in self.core.pool.slots()}

    def _push_payload(self, push: core_effects.PushChanges, pushed: dict[int, bytes]) -> bytes | None:
        """The encoded push when every body it needs is in memory (None: read them).
        ``pushed``: this list of effects' pushes so far, by their changes' ``id`` (the
        list holds the tuples, so an id is not reused meanwhile)."""
        if push.snapshot is not None:
            return None  # a full state transfer: rare, and every live body
        done = pushed.get(id(push.changes))
        if done is not None:
            return done
        bodies = self.recent_bodies.get_all(push.content_ids())
        if bodies is None:
            return None
        payload = self._encode_push(push.changes, self._fitting(bodies.items()), push.snapshot)
        pushed[id(push.changes)] = payload
        return payload

    def _encode_push(
        self,
        changes: Iterable[Change],
        bodies: dict[str, bytes],
        snapshot: Snapshot | None = None,
    ) -> bytes:
        facts = self.core.facts
        message = _wire.PeerChanges(facts.node_id, facts.address, list(changes), bodies, snapshot)
        return _wire.encoder.encode(message)

    async def push_changes(self, push: core_effects.PushChanges) -> None:
        """Send changes to a peer with the bodies they introduce, read off the loop."""
        try:
            bodies = await trio.to_thread.run_sync(self._bodies, push.content_ids())
            self.peers.send(push.address, self._encode_push(push.changes, bodies, push.snapshot))
        except Exception as exc:
            log_internal(exc, "pushing changes to a peer")

    async def push_bodies(self, push: core_effects.PushBodies) -> None:
        """Send a peer the bodies it asked for that fit one message (it asks again)."""
        try:
            bodies = await trio.to_thread.run_sync(self._bodies, push.content_ids)
            if bodies:
                self.peers.send(push.address, self._encode_push((), bodies))
        except Exception as exc:
            log_internal(exc, "sending bodies to a peer")

    def _bodies(self, content_ids: Iterable[str]) -> dict[str, bytes]:
        """The bodies of ``content_ids`` the store holds, as many as one message carries:
        read one by one, so none past the budget is read."""
        return self._fitting(
            (cid, body) for cid in content_ids if (body := self.store.body(cid)) is not None
        )

    def _fitting(self, bodies: Iterable[tuple[str, bytes]]) -> dict[str, bytes]:
        """As many of ``bodies`` as one message carries (``max_push_bytes``, one at
        least, and MAX_BATCH_CHANGES): the receiver asks for the rest."""
        budget = self.config.max_push_bytes
        fitting: dict[str, bytes] = {}
        size = 0
        for content_id, body in bodies:
            if fitting and (size + len(body) > budget or len(fitting) >= _wire.MAX_BATCH_CHANGES):
                break
            fitting[content_id] = body
            size += len(body)
        return fitting

    # -- tasks --------------------------------------------------------------------

    async def serve_control(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Feed control frames to the core until cancelled.

        Error handling: a frame that is not ``[identity, payload]`` is dropped; whatever
        else a client sends, the core answers (rule 5 of the core), so nothing ends
        this loop but cancellation. Only clients the ZAP handler let in get here, each
        with its role.
        """
        task_status.started()
        while True:
            frames, role, fd = await self.control.recv_multipart_with_source()
            if len(frames) != 2:
                continue
            peer, payload = frames
            self._note_connection(fd, peer)
            self.feed(
                self.core.receive,
                peer,
                payload,
                role=role,
                now=time.monotonic(),
                wall=time.time(),
                readings=self.readings,
            )

    def _note_connection(self, fd: int, peer: bytes) -> None:
        """Remember which peer speaks on ``fd``, so that its close ends its leases.

        libzmq queues a connection's close event before it closes the fd, but this
        task may read the next connection's frame on that fd first: then the old one
        is gone, and its close event, when read, is not the new one's. (A connection
        that closed without sending anything leaves no trace here: if its event comes
        after the next one's first frame, that one's leases end early, which only
        lets its worker be shared; a claim still keeps calls apart.)
        """
        known = self._connections.get(fd)
        if fd < 0 or known == peer:
            return
        if known is not None:
            self._late_closes[fd] += 1
            self.feed(self.core.connection_closed, known)
        self._connections[fd] = peer

    def _connection_closed(self, fd: int) -> None:
        if self._late_closes[fd]:
            self._late_closes[fd] -= 1
            return
        self._late_closes.pop(fd, None)
        peer = self._connections.pop(fd, None)
        if peer is not None:
            self.feed(self.core.connection_closed, peer)

    async def persist(self) -> None:
        """Write what the core asks for, one write at a time, in a thread."""
        async for write in self._to_persist:
            try:
                await trio.to_thread.run_sync(self._commit, write)
            except Exception as exc:
                if isinstance(write, core_effects.PersistMembers):
                    log_internal(exc, "storing the member table")
                else:
                    error = f"{type(exc).__name__}: {exc}"
                    self.feed(self.core.persist_failed, write.ticket, error)
                continue
            if isinstance(write, core_effects.PersistChanges):
                for content_id, (_record, body) in write.bodies.items():
                    self.recent_bodies.put(content_id, body)
                self.feed(self.core.changes_persisted, write.ticket)
            elif isinstance(write, core_effects.PersistViews):
                self.recent_bodies.drop(write.dropped_bodies)
                self.feed(self.core.views_persisted, write.ticket)

    def _commit(self, write: Write) -> None:
        if isinstance(write, core_effects.PersistChanges) and write.snapshot is not None:
            self.store.commit_snapshot(
                write.snapshot,
                dropped=write.dropped,
                changes=write.changes,
                bodies=write.bodies,
                replace=write.replace,
                void=write.void,
            )
        elif isinstance(write, core_effects.PersistChanges):
            self.store.commit_changes(write.changes, write.bodies, write.dropped, void=write.void)
        elif isinstance(write, core_effects.PersistViews):
            self.store.commit_views(write.views, write.dropped_bodies)
        else:
            self.store.commit_members(write.members)

    async def tick(self) -> None:
        while True:
            await trio.sleep(self.config.supervise_interval)
            self.feed(self.core.tick, time.monotonic(), self.readings())

    async def run_worker(self, slot: int) -> None:
        """Start the worker of ``slot``, report it to the core, and wait for its exit.

        Error handling: a start that fails or takes longer than
        ``worker_start_timeout`` is reported to the core (which retries with back-off)
        and never ends the node.
        """
        self.slots.clear(slot)
        process: trio.Process | None = None
        try:
            process = await trio.lowlevel.open_process(
                self._worker_command(slot),
                stdout=subprocess.PIPE,
                pass_fds=(self._parent_read,),
                # The environment, not the command line: /proc/PID/cmdline is world-readable.
                env={
                    **os.environ,
                    WORKER_KEY_VARIABLE: self.keys.server_secret.decode(),
                    WORKER_CLIENTS_VARIABLE: ",".join(
                        f"{role}:{key.hex()}" for key, role in self.keys.clients.items()
                    ),
                },
            )
            with trio.fail_after(self.config.worker_start_timeout):
                endpoints, rest = await _read_ready(process)
        except (OSError, trio.TooSlowError, _WorkerStartError) as exc:
            if process is not None and process.returncode is None:
                process.kill()
                await process.wait()
            error = str(exc) or f"no READY line within {self.config.worker_start_timeout:g} s"
            self.feed(self.core.worker_start_failed, slot, error, time.monotonic())
            return
        except BaseException:  # cancelled while starting: the node is stopping
            if process is not None:
                await _reap(process)
            raise
        self._processes[slot] = process
        assert self._nursery is not None and process.stdout is not None
        self._nursery.start_soon(self.read_reports, process.stdout, rest)
        try:
            self.feed(self.core.worker_started, slot, process.pid, endpoints, time.monotonic())
            await process.wait()
        finally:
            del self._processes[slot]
            await _reap(process)
        self.slots.clear(slot)
        self.feed(self.core.worker_exited, slot, time.monotonic())

    async def read_reports(self, stdout: trio.abc.ReceiveStream, buffer: bytes) -> None:
        """What a worker reports after READY, a line each, until it exits: bodies it
        cannot load (``CANNOT_LOAD <content id> <reason>``), for the core to route by."""
        try:
            while True:
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    kind, _, rest = line.decode(errors="replace").partition(" ")
                    content_id, _, reason = rest.partition(" ")
                    if kind == "CANNOT_LOAD" and content_id and reason:
                        self.feed(self.core.worker_cannot_load, content_id, reason)
                if len(buffer) > _MAX_REPORT_LINE:
                    buffer = b""  # not a report of ours: dropped
                chunk = await stdout.receive_some(4096)
                if not chunk:
                    return
                buffer += chunk
        except (trio.ClosedResourceError, trio.BrokenResourceError, OSError):
            return
        finally:
            with contextlib.suppress(Exception):
                await stdout.aclose()

    def _worker_command(self, slot: int) -> list[str]:
        config = self.config
        return [
            sys.executable,
            "-m",
            "scatter._node._worker",
            "--data-dir",
            str(config.data_dir),
            "--run-dir",
            str(self.run_dir),
            "--slot",
            str(slot),
            "--host",
            parse_address(config.address)[0],
            "--timeout",
            str(config.call_timeout),
            "--kill-grace",
            str(config.kill_grace),
            "--max-message-bytes",
            str(config.max_message_bytes),
            "--parent-fd",
            str(self._parent_read),
        ]

    async def serve_zap(
        self,
        sock: TrioSocket,
        clients: Mapping[bytes, str],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Answer libzmq's ZAP requests: a known client key gets its role, any other none.

        A refused client is logged once per address a minute, never a flood.
        """
        task_status.started()
        logged: dict[bytes, float] = {}  # {peer address: when it was last logged}
        while True:
            frames = await sock.recv_multipart()
            # [routing id, b"", version, request id, domain, address, identity, mechanism,
            #  credentials...] (ZMQ RFC 27)
            if len(frames) < 8:
                continue
            routing, _empty, version, request_id, _domain, address, _identity, mechanism = frames[:8]
            key = frames[8] if len(frames) > 8 else b""
            role = clients.get(key, "") if mechanism == b"CURVE" else ""
            if role:
                reply = [b"200", b"OK", role.encode()]
            else:
                reply = [b"400", b"unknown client key", b""]
                now = time.monotonic()
                if now - logged.get(address, -60.0) >= 60.0:
                    logged[address] = now
                    log(
                        f"refused a client at {address.decode(errors='replace')}: its secret is "
                        "not this cluster's (logged once a minute per address)"
                    )
            send_reply(sock, routing, b"", version, request_id, *reply, b"")

    async def watch_handshakes(self, monitor: TrioSocket) -> None:
        """Log clients whose CURVE handshake failed (another secret): once per address a
        minute, never a flood. Their frames never reach the node, so this is the only
        place that sees them. A closed connection also ends the leases it took."""
        peers: dict[int, str] = {}  # {fd of an accepted connection: peer address}
        failed = 0  # handshakes failed whose connection has not closed yet
        logged: dict[str, float] = {}
        last_peer = ""  # a failed handshake can close its socket before we ask who it was
        while True:
            event = parse_monitor_message(await monitor.recv_multipart())
            kind, value = event["event"], event["value"]
            if kind == zmq.EVENT_ACCEPTED:
                peers[value] = _peer_address(value) or last_peer
                last_peer = peers[value]
            elif kind & _HANDSHAKE_FAILURES:
                failed += 1
            elif kind == zmq.EVENT_DISCONNECTED:
                self._connection_closed(value)
                address = peers.pop(value, "") or last_peer
                if failed:
                    failed -= 1
                    now = time.monotonic()
                    if now - logged.get(address, -60.0) >= 60.0:
                        logged[address] = now
                        log(
                            f"refused a client at {address or 'an unknown address'}: its "
                            "secret is not this node's (logged once a minute per address)"
                        )

    async def wind_down(self) -> None:
        """Stop as gently as a crash would, or gentler (rule 7 of the core).

        The write in flight finishes (a few seconds at most) and everything that waits
        gets its answer; workers see the node's pipe close and exit after the call they
        run, each within its own deadline and grace, as they would if the node died;
        past that they are killed. Then the last replies get a moment to leave.
        """
        with trio.move_on_after(5.0):
            while self.core.busy_writing():
                await trio.sleep(0.01)
        self.feed(self.core.stop)
        os.close(self._parent_write)
        self._parent_write = -1
        now = time.monotonic()
        deadlines = [deadline for _number, deadline in self.readings().values() if deadline]
        patience = max([d - now for d in deadlines] + [0.0]) + self.config.kill_grace + 0.5
        with trio.move_on_after(min(patience, self.config.call_timeout + self.config.kill_grace)):
            while any(p.returncode is None for p in self._processes.values()):
                await trio.sleep(0.02)
        await trio.sleep(0.05)

    def close(self) -> None:
        self.control.sock.disable_monitor()
        self.handshakes.close()
        self.peers.close()
        os.close(self._parent_read)
        if self._parent_write >= 0:
            os.close(self._parent_write)


async def _reap(process: trio.Process) -> None:
    """Kill (if need be) and wait for a worker, even while the node is being cancelled."""
    with trio.CancelScope(shield=True):
        if process.returncode is None:
            process.kill()
        await process.wait()


# Not HANDSHAKE_FAILED_NO_DETAIL: a bare TCP connect that closes (a port probe) ends so.
_HANDSHAKE_FAILURES = zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH


def _peer_address(fd: int) -> str:
    try:
        with socket.socket(fileno=os.dup(fd)) as sock:
            return str(sock.getpeername()[0])
    except OSError:  # closed already: a failed handshake can be that quick
        return ""


class _WorkerStartError(Exception):
    pass


_MAX_REPORT_LINE = 4096


async def _read_ready(process: trio.Process) -> tuple[tuple[str, ...], bytes]:
    """The endpoints of a worker's READY line, and what it wrote after it (its reports)."""
    assert process.stdout is not None
    buffer = b""
    while b"\n" not in buffer:
        chunk = await process.stdout.receive_some(4096)
        if not chunk:
            await process.wait()
            raise _WorkerStartError(
                f"a worker process exited while starting (exit code {process.returncode})"
            )
        buffer += chunk
    first, rest = buffer.split(b"\n", 1)
    line = first.decode(errors="replace")
    if not line.startswith("READY "):
        raise _WorkerStartError(f"a worker process said {line[:200]!r} instead of READY")
    return tuple(line.split()[1:]), rest


def send_reply(sock: TrioSocket, peer: bytes, *payload: bytes) -> None:
    # A client that went away or whose queue is full: nothing to deliver to.
    with contextlib.suppress(zmq.ZMQError):
        sock.send_multipart_nowait([peer, *payload])


def log(message: str) -> None:
    print(f"scatter node: {message}", file=sys.stderr, flush=True)


def log_internal(exc: BaseException, doing: str) -> None:
    # The error's type and place only: its message may quote a request's contents.
    where = traceback.extract_tb(exc.__traceback__)[-1:] if exc.__traceback__ else []
    place = f" at {where[0].filename}:{where[0].lineno}" if where else ""
    log(f"internal error {type(exc).__name__}{place} while {doing}; going on")


def _bind_zap() -> zmq.Socket[bytes]:
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    sock: zmq.Socket[bytes] = context.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind("inproc://zeromq.zap.01")
    return sock


def _bind_control(config: NodeConfig, keys: NodeKeys) -> zmq.Socket[bytes]:
    host, port = parse_address(config.address)
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    sock: zmq.Socket[bytes] = context.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    apply_server_keys(sock, keys.server_secret, zap=True)
    sock.setsockopt(zmq.MAXMSGSIZE, config.max_message_bytes + 4096)
    # What one client may queue here, each way (see _wire.py).
    sock.setsockopt(zmq.RCVHWM, _wire.PEER_QUEUE_FRAMES)
    sock.setsockopt(zmq.SNDHWM, _wire.PEER_REPLY_FRAMES)
    if ":" in host:
        sock.setsockopt(zmq.IPV6, 1)
        host = f"[{host}]"
    try:
        sock.bind(f"tcp://{host}:{port}")
    except zmq.ZMQError as exc:
        sock.close(linger=0)
        if exc.errno == zmq.EADDRINUSE:
            raise ConfigError(
                f"{config.address} is already in use (another Scatter node?); "
                "stop it with `scatter node stop` or choose another port"
            ) from None
        raise ConfigError(f"cannot listen on {config.address}: {exc}") from None
    return sock


async def serve_node(
    config: NodeConfig,
    *,
    open_store: Callable[[Path], RegistryStore] = RegistryStore,
    task_status: trio.TaskStatus[NodeDriver] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run one node until it is told to stop (Shutdown, SIGTERM, SIGINT) or cancelled.

    Args:
        config: the node's configuration.
        open_store: opens the registry store (tests pass one whose writes fail).

    Resource handling: locks the data directory first, then binds the control socket,
    so a node that is refused either never listens (nobody can mistake it for a running
    node) or fails before touching the store. Then it opens the store, makes this start's
    runtime directory (a new slots file: workers orphaned by an earlier start keep theirs)
    and starts the workers. All of it is released on the way out, whatever the cause.

    Raises:
        SystemExit: with status 1 when the node stopped because it could not write.
    """
    secret = config.secret or ensure_user_secret(default_data_dir())
    keys = node_keys(secret)
    lock = _lock_data_dir(config)
    zap: TrioSocket | None = None
    try:
        # The ZAP handler must listen before the first client can knock (libzmq
        # refuses every handshake on an enforced domain while nobody answers).
        zap = TrioSocket(_bind_zap())
        control = _bind_control(config, keys)
    except BaseException:
        if zap is not None:
            zap.close()
        lock.close()
        raise
    sock = TrioSocket(control)
    run_root = config.data_dir / "run"
    store: RegistryStore | None = None
    slots: SharedSlots | None = None
    driver: NodeDriver | None = None
    try:
        store = open_store(config.data_dir / "registry")
        identity, notice = store.open_as_node()
        if notice:
            log(notice)
        shutil.rmtree(run_root, ignore_errors=True)
        run_dir = run_root / str(identity.incarnation)
        slots = SharedSlots(run_dir / "slots", create=True)
        core = _core_of(config, identity, store)
        # It left for good (rule 10), or this is a copy of one that did: a new node.
        if {identity.node_id, store.previous_node_id} & core.registry.forgotten:
            identity, notice = store.start_afresh()
            log(notice)
            core = _core_of(config, identity, store)
        members = store.members()
        remembered = [
            m.address for m in members if m.node != identity.node_id and m.state <= State.SUSPECT
        ]
        core.hold_peer_changes = os.environ.get("SCATTER_TEST_HOLD_PEER_CHANGES") == "1"
        driver = NodeDriver(config, core, store, slots, sock, run_dir, keys)
        driver.relay_keys = {
            "deploy": client_keys(secret),
            "call": client_keys(call_only_secret(secret)),
        }
        driver.drop_relayed_replies = os.environ.get("SCATTER_TEST_DROP_RELAYED_REPLIES") == "1"
        await _run(driver, zap, [*config.join, *remembered], members, task_status)
    finally:
        if driver is not None:
            driver.close()
        sock.close()
        zap.close()
        if slots is not None:
            slots.close()
        if store is not None:
            store.close()
        shutil.rmtree(run_root, ignore_errors=True)
        lock.close()
    if driver is not None and driver.exit_code:
        raise SystemExit(driver.exit_code)


def _core_of(config: NodeConfig, identity: NodeIdentity, store: RegistryStore) -> NodeCore:
    facts = NodeFacts(
        node_id=identity.node_id,
        # A fresh writer id at every start: a restored backup or a copied directory
        # can never number a change the way one that peers hold already is.
        writer_id=f"{identity.node_id}.{identity.incarnation}.{secrets.token_hex(3)}",
        incarnation=identity.incarnation,
        address=config.address,
        pid=os.getpid(),
        data_dir=str(config.data_dir),
        started_at=time.time(),
        python=platform.python_version(),
        scatter_version=SCATTER_VERSION,
        seed=secrets.randbits(32),
    )
    snapshot, changes, views, bodies = store.load_replica()
    return NodeCore(
        config,
        facts,
        changes,
        views,
        bodies,
        snapshot=snapshot,
        void=store.void(),
        former=identity.former,
    )


async def _run(
    driver: NodeDriver,
    zap: TrioSocket,
    join: list[str],
    remembered: list[MemberInfo],
    task_status: trio.TaskStatus[NodeDriver] = trio.TASK_STATUS_IGNORED,
) -> None:
    core, config = driver.core, driver.config
    async with trio.open_nursery() as nursery:
        driver._nursery = nursery
        # First: a SIGTERM during start-up must still stop the node cleanly.
        nursery.start_soon(_stop_on_signal, driver)
        nursery.start_soon(driver.persist)
        effects = core.start(time.monotonic(), join, remembered)
        # The views reconciled at start are written before anyone is served.
        for effect in effects:
            if isinstance(effect, core_effects.PersistViews):
                await trio.to_thread.run_sync(driver._commit, effect)
        driver.perform(e for e in effects if not isinstance(e, core_effects.PersistViews))
        # Ready means ready to call: the first workers are up (or failing to start, which
        # `scatter node status` then shows) before the node says it listens.
        while (stats := core.pool.statistics()).workers < config.min_workers:
            if stats.start_failures or driver.stop_requested.is_set():
                break
            await trio.sleep(0.01)
        await nursery.start(driver.serve_zap, zap, driver.keys.clients)
        nursery.start_soon(driver.watch_handshakes, driver.handshakes)
        await nursery.start(driver.serve_control)
        nursery.start_soon(driver.tick)
        facts = core.facts
        log(
            f"{facts.node_id} listening at {config.address} "
            f"(pid {facts.pid}, data {config.data_dir}, start {facts.incarnation})"
        )
        task_status.started(driver)
        await driver.stop_requested.wait()
        await driver.wind_down()
        nursery.cancel_scope.cancel()


def _lock_data_dir(config: NodeConfig) -> IO[str]:
    """Hold the data directory for this node's lifetime: one node per replica.

    Two nodes on one directory would share a store and overwrite each other's worker
    slots; the second one is refused instead. The lock dies with the process (flock), so
    a node killed with SIGKILL leaves nothing stale behind.
    """
    config.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    # Bodies and sources are code, and the worker sockets take calls: the node's user's
    # only, also for a directory an older release made 0755.
    os.chmod(config.data_dir, 0o700)
    handle = open(config.data_dir / "node.lock", "a+")  # noqa: SIM115 - held until stop
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise ConfigError(
            f"the data directory {config.data_dir} is in use by the node {holder}; "
            "give this node its own with --data-dir or SCATTER_DATA_DIR"
        ) from None
    handle.truncate(0)
    handle.write(f"pid {os.getpid()} at {config.address}\n")
    handle.flush()
    return handle


async def _stop_on_signal(driver: NodeDriver) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for _ in signals:
            driver.stop_requested.set()
            return


def run_node(config: NodeConfig) -> None:
    """Run a node in the foreground of this process (``scatter node start``)."""
    # Everything the node and its workers create (store, slots, sockets) is its user's.
    os.umask(0o077)
    trio.run(serve_node, config)
