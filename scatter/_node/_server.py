"""The node: one Trio process owning a registry replica and a pool of worker processes.

Task tree (stopping the node is cancelling its nursery)::

    serve_node
    +-- WorkerPool.run          spawn / supervise / replace workers
    +-- serve_control           the ROUTER at the node's address: control requests
    +-- (signal watcher)        SIGTERM / SIGINT stop the node cleanly

Calls do not pass through here: clients lease a worker and talk to it directly
(see ``_worker.py`` for why). The node handles registry changes, descriptions, listings
and leases. A registry change is committed to the store, then the shared generation is
bumped, then the client is answered: a client that scattered and then calls always
finds its version (read-your-writes).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import platform
import shutil
import signal
import sys
import time
import traceback
from collections.abc import Callable
from typing import IO, Any

import msgspec
import trio
import zmq

from .. import _wire
from .._config import NodeConfig, parse_address
from .._core._registry import Change, Registry, VersionRecord
from .._exceptions import (
    ConfigError,
    FunctionNotFound,
    ScatterError,
    VersionNotFound,
)
from .._transport._zmq_trio import TrioSocket
from ._pool import WorkerPool
from ._slots import SharedSlots
from ._store import LookupEntry, RegistryStore

SCATTER_VERSION = "0.1.0"


def _failure_kind(exc: ScatterError) -> _wire.FailureKind:
    if isinstance(exc, ConfigError):
        return "invalid"
    if isinstance(exc, FunctionNotFound):
        return "not_found"
    if isinstance(exc, VersionNotFound):
        return "version_not_found"
    return "internal"


class Node:
    """The state one node process owns; ``serve_node`` drives it."""

    def __init__(self, config: NodeConfig, store: RegistryStore, slots: SharedSlots) -> None:
        self.config = config
        self.store = store
        self.slots = slots
        self.node_id = store.node_id()
        self.registry = Registry.from_changes(self.node_id, store.changes())
        self.pool = WorkerPool(config, slots)
        self.started_at = time.time()
        self.stop_requested = trio.Event()
        self._published_names: set[str] = set()
        self._handlers: dict[type, Callable[[Any], Any]] = {
            _wire.Hello: self.on_hello,
            _wire.Publish: self.on_publish,
            _wire.PublishSet: self.on_publish_set,
            _wire.CurrentVersion: self.on_current_version,
            _wire.Rollback: self.on_rollback,
            _wire.Vaporize: self.on_vaporize,
            _wire.Describe: self.on_describe,
            _wire.ListVersions: self.on_versions,
            _wire.ListFunctions: self.on_functions,
            _wire.Release: self.on_release,
            _wire.Status: self.on_status,
            _wire.Shutdown: self.on_shutdown,
        }

    # -- registry changes --

    def _lookup_entry(self, name: str) -> LookupEntry | None:
        view = self.registry.view(name)
        if view is None or not view.content_ids:
            return None
        # current 0: retired from its set; pinned versions still answer.
        return LookupEntry(current=view.current or 0, versions=dict(view.content_ids))

    def sync_lookup_entries(self, changes: list[Change]) -> None:
        """Commit changes, then republish lookup entries for every function they moved.

        Every live name's entry is rebuilt: O(functions) per change, which is fine while
        registry changes are rare next to calls (a change is a human scattering code).
        """
        names = {f.name for f in self.registry.functions()}
        touched = names | self._published_names
        entries = {name: self._lookup_entry(name) for name in touched}
        records = [
            op.record for change in changes for op in change.ops if hasattr(op, "record")
        ]
        self.store.commit(changes, records, entries)
        self._published_names = {name for name, entry in entries.items() if entry}
        self.slots.bump_generation()

    # -- control handlers: each returns a reply struct --

    def on_hello(self, req: _wire.Hello) -> _wire.Welcome:
        return _wire.Welcome(req.id, self.node_id, _wire.PROTOCOL_VERSION, self.config.address)

    def on_publish(self, req: _wire.Publish) -> _wire.Published:
        record = self._record(req)
        change = self.registry.publish([record], now=time.time())
        if change is not None:
            self.sync_lookup_entries([change])
        number = self.registry.current_version(req.name)
        return _wire.Published(req.id, req.name, number, req.content_id, change is None)

    def on_publish_set(self, req: _wire.PublishSet) -> _wire.Published:
        records = [self._record(member) for member in req.members]
        change = self.registry.publish(records, now=time.time(), set_name=req.name)
        if change is not None:
            self.sync_lookup_entries([change])
        number = self.registry.current_version(req.name)
        return _wire.Published(req.id, req.name, number, "", change is None)

    def _record(self, req: _wire.Publish) -> VersionRecord:
        return VersionRecord(
            content_id=req.content_id,
            name=req.name,
            body=req.body,
            signature=req.signature,
            signature_text=req.signature_text,
            signature_id=req.signature_id,
            source=req.source,
            doc=req.doc,
            origin=self.node_id,
            python=req.python or platform.python_version(),
            created_at=time.time(),
            timeout=req.timeout,
        )

    def on_rollback(self, req: _wire.Rollback) -> _wire.Moved:
        change = self.registry.rollback(req.name, req.to, now=time.time())
        self.sync_lookup_entries([change])
        return _wire.Moved(req.id, req.name, self._current_or_zero(req.name))

    def on_vaporize(self, req: _wire.Vaporize) -> _wire.Moved:
        change = self.registry.vaporize(req.name, now=time.time())
        self.sync_lookup_entries([change])
        return _wire.Moved(req.id, req.name, 0)

    def _current_or_zero(self, name: str) -> int:
        try:
            return self.registry.current_version(name)
        except (FunctionNotFound, VersionNotFound):
            return 0

    def on_current_version(self, req: _wire.CurrentVersion) -> _wire.Moved:
        return _wire.Moved(req.id, req.name, self.registry.current_version(req.name))

    def on_describe(self, req: _wire.Describe) -> _wire.Description:
        number, record = self.registry.resolve(req.name, req.version or None)
        return _wire.Description(
            id=req.id,
            name=req.name,
            version=number,
            current_version=self.registry.current_version(req.name),
            content_id=record.content_id,
            signature=record.signature,
            signature_text=record.signature_text,
            signature_id=record.signature_id,
            timeout=record.timeout or self.config.call_timeout,
            doc=record.doc,
            source=record.source if req.with_source else None,
        )

    def on_versions(self, req: _wire.ListVersions) -> _wire.Listing:
        rows = [msgspec.to_builtins(info) for info in self.registry.versions(req.name)]
        return _wire.Listing(req.id, rows)

    def on_functions(self, req: _wire.ListFunctions) -> _wire.Listing:
        rows = [msgspec.to_builtins(info) for info in self.registry.functions()]
        return _wire.Listing(req.id, rows)

    async def on_lease(self, req: _wire.Lease) -> _wire.Leased:
        lease, endpoints = await self.pool.lease()
        return _wire.Leased(req.id, lease, endpoints[0], endpoints[1] if len(endpoints) > 1 else "")

    def on_release(self, req: _wire.Release) -> _wire.Done:
        self.pool.release(req.lease)
        return _wire.Done(req.id)

    def on_status(self, req: _wire.Status) -> _wire.NodeStatus:
        stats = self.registry.statistics()
        pool = self.pool.statistics()
        return _wire.NodeStatus(
            id=req.id,
            node_id=self.node_id,
            address=self.config.address,
            pid=os.getpid(),
            data_dir=str(self.config.data_dir),
            started_at=self.started_at,
            functions=stats.functions,
            versions=stats.versions,
            workers=pool.workers,
            busy_workers=pool.busy,
            leases=pool.leases,
            python=platform.python_version(),
            scatter_version=SCATTER_VERSION,
        )

    def on_shutdown(self, req: _wire.Shutdown) -> _wire.Done:
        self.stop_requested.set()
        return _wire.Done(req.id)

    # -- dispatch --

    def decode(self, payload: bytes) -> Any:
        """The request in a frame, or the Failure to answer it with."""
        if len(payload) > self.config.max_message_bytes:
            return _wire.Failure(
                0,
                "protocol",
                f"message of {len(payload)} bytes refused: the limit is "
                f"{self.config.max_message_bytes}",
            )
        try:
            return _wire.control_request_decoder.decode(payload)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            return _wire.Failure(0, "protocol", f"malformed request: {exc}")

    def handle(self, request: Any) -> Any:
        try:
            return self._handlers[type(request)](request)
        except ScatterError as exc:
            return _wire.Failure(request.id, _failure_kind(exc), str(exc))
        except Exception as exc:
            # A bug of ours must not take the node down with it; it is printed (control
            # requests carry no call arguments) and the client gets an internal error.
            traceback.print_exc()
            return _wire.Failure(request.id, "internal", f"{type(exc).__name__}: {exc}")

    async def handle_lease(self, sock: TrioSocket, identity: bytes, request: _wire.Lease) -> None:
        try:
            reply: Any = await self.on_lease(request)
        except ScatterError as exc:
            reply = _wire.Failure(request.id, _failure_kind(exc), str(exc))
        send_reply(sock, identity, reply)


def send_reply(sock: TrioSocket, identity: bytes, reply: Any) -> None:
    # A client that went away or whose queue is full: nothing to deliver to.
    with contextlib.suppress(zmq.ZMQError):
        sock.send_multipart_nowait([identity, _wire.encoder.encode(reply)])


async def serve_control(
    node: Node, sock: TrioSocket, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Answer control requests until cancelled.

    Requests are answered inline, one at a time, which keeps registry changes in arrival
    order; only a lease, which may wait for a worker process to start, runs as a task.

    Error handling: malformed or oversized frames get a ``protocol`` failure; a frame
    that is not ``[identity, payload]`` is dropped. Nothing a client sends ends the loop.
    """
    task_status.started()
    async with trio.open_nursery() as nursery:
        while True:
            frames = await sock.recv_multipart()
            if len(frames) != 2:
                continue
            identity, payload = frames
            request = node.decode(payload)
            if isinstance(request, _wire.Failure):
                send_reply(sock, identity, request)
            elif isinstance(request, _wire.Lease):
                nursery.start_soon(node.handle_lease, sock, identity, request)
            else:
                send_reply(sock, identity, node.handle(request))


def _bind_control(config: NodeConfig) -> zmq.Socket[bytes]:
    host, port = parse_address(config.address)
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    sock: zmq.Socket[bytes] = context.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, config.max_message_bytes + 4096)
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
    config: NodeConfig, *, task_status: trio.TaskStatus[Node] = trio.TASK_STATUS_IGNORED
) -> None:
    """Run one node until it is told to stop (Shutdown, SIGTERM, SIGINT) or cancelled.

    Resource handling: locks the data directory first, then binds the control socket,
    so a node that is refused either never listens (nobody can mistake it for a running
    node) or fails before touching the store. Then it opens the store and the runtime
    file and starts the worker pool. All of it is released on the way out, whatever the
    cause.
    """
    lock = _lock_data_dir(config)
    try:
        control = _bind_control(config)
    except BaseException:
        lock.close()
        raise
    store = RegistryStore(config.data_dir / "registry")
    run_dir = config.data_dir / "run"
    slots = SharedSlots(run_dir / "slots", create=True)
    node = Node(config, store, slots)
    node.sync_lookup_entries([])
    sock = TrioSocket(control)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(node.pool.run)
            await nursery.start(serve_control, node, sock)
            nursery.start_soon(_stop_on_signal, node)
            print(
                f"scatter node {node.node_id} listening at {config.address} "
                f"(pid {os.getpid()}, data {config.data_dir})",
                file=sys.stderr,
                flush=True,
            )
            task_status.started(node)
            await node.stop_requested.wait()
            # Give the Shutdown reply a moment to leave before the socket closes.
            await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
    finally:
        sock.close()
        slots.close()
        store.close()
        shutil.rmtree(run_dir, ignore_errors=True)
        lock.close()


def _lock_data_dir(config: NodeConfig) -> IO[str]:
    """Hold the data directory for this node's lifetime: one node per replica.

    Two nodes on one directory would share a store and overwrite each other's worker
    slots; the second one is refused instead. The lock dies with the process (flock), so
    a node killed with SIGKILL leaves nothing stale behind.
    """
    config.data_dir.mkdir(parents=True, exist_ok=True)
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


async def _stop_on_signal(node: Node) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for _ in signals:
            node.stop_requested.set()
            return


def run_node(config: NodeConfig) -> None:
    """Run a node in the foreground of this process (``scatter node start``)."""
    trio.run(serve_node, config)
