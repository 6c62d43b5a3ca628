################################################################
# The node core
################################################################
#
# Rule 1: every decision a node makes lives here (with the registry and the pool
# core it holds): what to answer, what to persist and when, which names the
# workers must look up again, which worker to start or kill. The Trio process in
# `_node/_server.py` is a driver: it feeds events in and performs the effects
# that come out, in order. As h11 keeps HTTP apart from its sockets.
#
# Rule 2: no I/O, no clock reads, no threads. Events carry `now` (monotonic
# seconds) and `wall` (unix seconds, only recorded for humans); effects are
# values. So tests, the fuzzer and a simulator drive this class as the node does.
#
# Rule 3: persist, then apply. A registry change goes to disk (PersistChanges)
# before the registry applies it; the views the workers resolve names with are
# derived from the names `apply()` returns and written next (PersistViews); only
# then is the generation bumped and the client answered. Until the views are on
# disk, requests wait in line, so nobody sees a version a worker cannot run yet.
# A change that cannot be stored is answered with an error and never applied;
# views that cannot be stored stop the node (its restart rebuilds them from the log).
#
# Rule 4: one local change at a time. The next one is prepared only once the one
# before is applied or dropped, so two never take the same change id.
#
# Rule 5: nothing a client sends ends the node. Oversized or malformed frames get
# a `protocol` failure; a bug of ours answers `internal` and logs the error's type
# and place, never a request's contents.

"""The node core: control requests, worker events and ticks in; effects out. Pure."""

from __future__ import annotations

import itertools
import traceback
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import msgspec

from .. import _wire
from .._config import NodeConfig
from .._exceptions import ConfigError, FunctionNotFound, ScatterError, VersionNotFound
from ._pool import (
    KillWorker,
    LeaseGranted,
    LeaseRefused,
    PoolCore,
    PoolEffect,
    SlotReading,
    StartWorker,
    StopWorker,
)
from ._registry import (
    Change,
    FunctionView,
    PublishOp,
    Registry,
    VersionRecord,
    content_id_of,
)

__all__ = [
    "BumpGeneration",
    "KillWorker",
    "Log",
    "NodeCore",
    "NodeFacts",
    "PersistChanges",
    "PersistViews",
    "Send",
    "StartWorker",
    "Stop",
    "StopWorker",
]


# -- effects (the pool's StartWorker, KillWorker and StopWorker pass through) ---


@dataclass(frozen=True)
class Send:
    """Send ``payload`` to the client whose ROUTER identity is ``peer``."""

    peer: bytes
    payload: bytes


@dataclass(frozen=True)
class PersistChanges:
    """Store changes and the bodies they bring; then call ``changes_persisted(ticket)``."""

    ticket: int
    changes: tuple[Change, ...]
    bodies: Mapping[str, tuple[VersionRecord, bytes]]  # {content_id: (record, body)}


@dataclass(frozen=True)
class PersistViews:
    """Store the workers' views (None: delete) and drop unused bodies; then
    ``views_persisted(ticket)``."""

    ticket: int
    views: Mapping[str, FunctionView | None]
    dropped_bodies: frozenset[str]


@dataclass(frozen=True)
class BumpGeneration:
    """Tell the workers that views moved (the shared generation counter)."""


@dataclass(frozen=True)
class Log:
    message: str


@dataclass(frozen=True)
class Stop:
    reason: str
    failed: bool = False  # the node exits non-zero


Effect = Send | PersistChanges | PersistViews | BumpGeneration | Log | Stop | PoolEffect


@dataclass(frozen=True)
class NodeFacts:
    """What the node is, for Hello and Status; fixed for a node's lifetime."""

    node_id: str
    writer_id: str  # the registry's origin for this start's changes (see _server.py)
    incarnation: int
    address: str
    pid: int
    data_dir: str
    started_at: float  # unix seconds
    python: str
    scatter_version: str


@dataclass
class _Write:
    """The one local change in flight (rule 4)."""

    peer: bytes
    request_id: int
    change: Change
    reply: Callable[[], Any]  # builds the reply once the change is applied
    ticket: int
    views_pending: bool = False  # applied; its views are being written (requests wait)


_MUTATIONS = (_wire.Publish, _wire.PublishSet, _wire.Rollback, _wire.Vaporize)


class NodeCore:
    """One node's decisions. Every method takes an event and returns effects to perform.

    Example (what the driver does)::

        core = NodeCore(config, facts, changes, views, body_ids)
        perform(core.start(now))
        perform(core.receive(peer, payload, now=..., wall=..., readings=...))
        perform(core.changes_persisted(ticket))  # after a PersistChanges
    """

    def __init__(
        self,
        config: NodeConfig,
        facts: NodeFacts,
        changes: Iterable[Change],
        views: Mapping[str, FunctionView],
        body_ids: Iterable[str],
    ) -> None:
        self.config = config
        self.facts = facts
        self.registry = Registry.from_changes(facts.writer_id, changes)
        self.pool = PoolCore(
            min_workers=config.min_workers,
            max_workers=config.max_workers,
            kill_grace=config.kill_grace,
            idle_retire=config.worker_idle_retire,
        )
        self._views: dict[str, FunctionView] = dict(views)  # {name: view}, as persisted
        self._body_ids = set(body_ids)  # only until start() reconciles
        self._refs: Counter[str] = Counter()  # {content_id: live versions using it}
        self._tickets = itertools.count(1)
        self._write: _Write | None = None
        self._waiting: deque[tuple[bytes, Any, float]] = deque()  # (peer, request, wall)
        self._handlers: dict[type, Callable[[Any], Any]] = {
            _wire.Hello: self._on_hello,
            _wire.CurrentVersion: self._on_current_version,
            _wire.Describe: self._on_describe,
            _wire.ListVersions: self._on_versions,
            _wire.ListFunctions: self._on_functions,
            _wire.Status: self._on_status,
        }

    # -- events -----------------------------------------------------------------

    def start(self, now: float) -> list[Effect]:
        """Reconcile the workers' views with the registry; start the pool.

        The persisted views may be stale (a crash between a change and its views, a
        store written by an older release): every name is compared once.
        """
        fresh = {name: self.registry.entry(name) for name in self.registry.names()}
        views: dict[str, FunctionView | None] = {
            name: view for name, view in fresh.items() if self._views.get(name) != view
        }
        views.update({name: None for name in self._views if name not in fresh})
        self._refs = Counter(
            cid for view in fresh.values() if view for cid in view.content_ids.values()
        )
        effects: list[Effect] = []
        missing = self._refs.keys() - self._body_ids
        if missing:
            effects.append(
                Log(
                    f"{len(missing)} live version(s) have no body on this node; calls to "
                    "them fail with a load error"
                )
            )
        dropped = frozenset(self._body_ids - self._refs.keys())
        self._body_ids = set()
        self._views = {name: view for name, view in fresh.items() if view is not None}
        if views or dropped:
            effects.append(PersistViews(next(self._tickets), views, dropped))
        effects.append(BumpGeneration())
        return effects + list(self.pool.start(now))

    def receive(
        self,
        peer: bytes,
        payload: bytes,
        *,
        role: str,
        now: float,
        wall: float,
        readings: Mapping[int, SlotReading],
    ) -> list[Effect]:
        """A frame from a client.

        Args:
            role: what the client's key may do: "deploy" (anything) or "call" (call,
                describe, list); anything else is refused.
            readings: the workers' slots, read just now.
        """
        limit = self.config.max_message_bytes
        if len(payload) > limit:
            message = f"message of {len(payload)} bytes refused: the limit is {limit}"
            return [self._send(peer, _wire.Failure(0, "protocol", message))]
        try:
            request = _wire.control_request_decoder.decode(payload)
        except _wire.DECODE_ERRORS as exc:  # RecursionError too: nested past any limit
            return [self._send(peer, _wire.Failure(0, "protocol", f"malformed request: {exc}"))]
        refusal = _refusal(request, role)
        if refusal:
            return [self._send(peer, _wire.Failure(request.id, "forbidden", refusal))]
        if isinstance(request, _wire.Lease):
            self.pool.observe(now, readings)
            return self._pool_effects(self.pool.lease((peer, request.id), now))
        if isinstance(request, _wire.Release):
            self.pool.release(request.lease)
            return [self._send(peer, _wire.Done(request.id))]
        if isinstance(request, _wire.Shutdown):
            return [self._send(peer, _wire.Done(request.id)), Stop("asked to stop")]
        if self._write is not None and (
            self._write.views_pending or isinstance(request, _MUTATIONS)
        ):
            self._waiting.append((peer, request, wall))
            return []
        return self._serve(peer, request, wall)

    def changes_persisted(self, ticket: int) -> list[Effect]:
        write = self._write
        if write is None or write.ticket != ticket:
            return []
        try:
            names = self.registry.apply(write.change)
        except Exception as exc:  # our own change: a bug, never the client's doing
            self._write = None
            return [*self._internal(write.peer, write.request_id, exc), *self._next()]
        views, dropped = self._derive(names)
        if not views and not dropped:
            return self._finish(write)
        write.ticket = next(self._tickets)
        write.views_pending = True
        return [PersistViews(write.ticket, views, dropped)]

    def views_persisted(self, ticket: int) -> list[Effect]:
        write = self._write
        if write is None or write.ticket != ticket:
            return []  # the views of start(): nothing waits for them
        return self._finish(write)

    def persist_failed(self, ticket: int, error: str) -> list[Effect]:
        write = self._write
        if write is not None and write.ticket == ticket and not write.views_pending:
            self._write = None
            failure = _wire.Failure(
                write.request_id,
                "internal",
                f"the node could not store the change ({error}); nothing was changed",
            )
            return [
                Log(f"could not store change {write.change.change_id}: {error}"),
                self._send(write.peer, failure),
                *self._next(),
            ]
        return [
            Log(f"could not write the workers' views ({error})"),
            Stop("the workers' views could not be stored; a restart rebuilds them", failed=True),
        ]

    def worker_started(
        self, slot: int, pid: int, endpoints: tuple[str, ...], now: float
    ) -> list[Effect]:
        return self._pool_effects(self.pool.started(slot, pid, endpoints, now))

    def worker_start_failed(self, slot: int, error: str, now: float) -> list[Effect]:
        effects = self._pool_effects(self.pool.start_failed(slot, error, now))
        return [Log(f"could not start a worker: {error}"), *effects]

    def worker_exited(self, slot: int, now: float) -> list[Effect]:
        return self._pool_effects(self.pool.exited(slot, now))

    def tick(self, now: float, readings: Mapping[int, SlotReading]) -> list[Effect]:
        return self._pool_effects(self.pool.tick(now, readings))

    # -- requests ---------------------------------------------------------------

    def _serve(self, peer: bytes, request: Any, wall: float) -> list[Effect]:
        try:
            if isinstance(request, _MUTATIONS):
                return self._begin_write(peer, request, wall)
            return [self._send(peer, self._handlers[type(request)](request))]
        except ScatterError as exc:
            return [self._send(peer, _wire.Failure(request.id, _failure_kind(exc), str(exc)))]
        except Exception as exc:
            return self._internal(peer, request.id, exc)

    def _begin_write(self, peer: bytes, request: Any, wall: float) -> list[Effect]:
        change, bodies, reply = self._prepare(request, wall)
        if change is None:
            return [self._send(peer, reply()), *self._next()]
        self._write = _Write(peer, request.id, change, reply, next(self._tickets))
        return [PersistChanges(self._write.ticket, (change,), bodies)]

    def _prepare(
        self, request: Any, wall: float
    ) -> tuple[Change | None, dict[str, tuple[VersionRecord, bytes]], Callable[[], Any]]:
        registry = self.registry
        if isinstance(request, _wire.Publish | _wire.PublishSet):
            members = [request] if isinstance(request, _wire.Publish) else request.members
            records = [self._record(member, wall) for member in members]
            bodies = {r.content_id: (r, m.body) for r, m in zip(records, members, strict=True)}
            if isinstance(request, _wire.Publish):
                change = registry.prepare_publish(records, now=wall)
            else:
                change = registry.prepare_publish(records, now=wall, set_name=request.name)
            # Only the bodies of new versions: a member whose code is unchanged keeps its
            # version, and a body stored for it would be one no live version uses.
            new = (
                {op.record.content_id for op in change.ops if isinstance(op, PublishOp)}
                if change
                else set()
            )
            bodies = {cid: pair for cid, pair in bodies.items() if cid in new}

            def published() -> _wire.Published:
                number = registry.current_version(request.name)
                content = (
                    ""
                    if isinstance(request, _wire.PublishSet)
                    else (registry.resolve(request.name)[1].content_id)
                )
                return _wire.Published(request.id, request.name, number, content, change is None)

            return change, bodies, published
        if isinstance(request, _wire.Rollback):
            change = registry.prepare_rollback(request.name, request.to, now=wall)
            return (
                change,
                {},
                lambda: _wire.Moved(request.id, request.name, self._current_or_zero(request.name)),
            )
        change = registry.prepare_vaporize(request.name, now=wall)
        return change, {}, lambda: _wire.Moved(request.id, request.name, 0)

    def _record(self, request: _wire.Publish, wall: float) -> VersionRecord:
        content_id = content_id_of(
            request.body,
            signature=request.signature,
            signature_text=request.signature_text,
            source=request.source,
            doc=request.doc,
            timeout=request.timeout,
        )
        return VersionRecord(
            content_id=content_id,
            code_id=request.content_id,  # the publisher's; see VersionRecord.code_id
            name=request.name,
            signature=request.signature,
            signature_text=request.signature_text,
            signature_id=request.signature_id,
            source=request.source,
            doc=request.doc,
            origin=self.facts.node_id,
            python=request.python or self.facts.python,
            created_at=wall,
            timeout=request.timeout,
        )

    def _on_hello(self, req: _wire.Hello) -> _wire.Welcome:
        facts = self.facts
        return _wire.Welcome(req.id, facts.node_id, _wire.PROTOCOL_VERSION, facts.address)

    def _on_current_version(self, req: _wire.CurrentVersion) -> _wire.Moved:
        return _wire.Moved(req.id, req.name, self.registry.current_version(req.name))

    def _on_describe(self, req: _wire.Describe) -> _wire.Description:
        number, record = self.registry.resolve(req.name, req.version or None)
        return _wire.Description(
            id=req.id,
            name=req.name,
            version=number,
            # 0 for a member its set retired: pinned versions of it still run.
            current_version=self._current_or_zero(req.name),
            content_id=record.content_id,
            signature=record.signature,
            signature_text=record.signature_text,
            signature_id=record.signature_id,
            timeout=record.timeout or self.config.call_timeout,
            doc=record.doc,
            source=record.source if req.with_source else None,
        )

    def _on_versions(self, req: _wire.ListVersions) -> _wire.Listing:
        rows = [msgspec.to_builtins(info) for info in self.registry.versions(req.name)]
        return _wire.Listing(req.id, rows)

    def _on_functions(self, req: _wire.ListFunctions) -> _wire.Listing:
        rows = [msgspec.to_builtins(info) for info in self.registry.functions()]
        return _wire.Listing(req.id, rows)

    def _on_status(self, req: _wire.Status) -> _wire.NodeStatus:
        stats = self.registry.statistics()
        pool = self.pool.statistics()
        facts = self.facts
        return _wire.NodeStatus(
            id=req.id,
            node_id=facts.node_id,
            address=facts.address,
            pid=facts.pid,
            data_dir=facts.data_dir,
            started_at=facts.started_at,
            functions=stats.functions,
            versions=stats.versions,
            workers=pool.workers,
            busy_workers=pool.busy,
            leases=pool.leases,
            python=facts.python,
            scatter_version=facts.scatter_version,
            incarnation=facts.incarnation,
            worker_start_failures=pool.start_failures,
            worker_start_error=pool.last_start_error,
        )

    # -- internals --------------------------------------------------------------

    def _current_or_zero(self, name: str) -> int:
        try:
            return self.registry.current_version(name)
        except (FunctionNotFound, VersionNotFound):
            return 0

    def _derive(
        self, names: Iterable[str]
    ) -> tuple[dict[str, FunctionView | None], frozenset[str]]:
        """The views ``names`` have now, and the bodies no live version uses any more."""
        views: dict[str, FunctionView | None] = {}
        delta: Counter[str] = Counter()
        for name in names:
            new = self.registry.entry(name)
            old = self._views.get(name)
            if new == old:
                continue
            views[name] = new
            if old is not None:
                delta.subtract(old.content_ids.values())
            if new is not None:
                delta.update(new.content_ids.values())
        dropped = set()
        for content_id, change in delta.items():
            self._refs[content_id] += change
            if self._refs[content_id] <= 0:
                del self._refs[content_id]
                dropped.add(content_id)
        for name, view in views.items():
            if view is None:
                self._views.pop(name, None)
            else:
                self._views[name] = view
        return views, frozenset(dropped)

    def _finish(self, write: _Write) -> list[Effect]:
        self._write = None
        try:
            reply = write.reply()
        except Exception as exc:
            return [BumpGeneration(), *self._internal(write.peer, write.request_id, exc)]
        return [BumpGeneration(), self._send(write.peer, reply), *self._next()]

    def _next(self) -> list[Effect]:
        """Serve what waited behind a write, up to the next write."""
        effects: list[Effect] = []
        while self._waiting and self._write is None:
            peer, request, wall = self._waiting.popleft()
            effects += self._serve(peer, request, wall)
        return effects

    def _pool_effects(self, effects: Iterable[PoolEffect]) -> list[Effect]:
        out: list[Effect] = []
        for effect in effects:
            if isinstance(effect, LeaseGranted | LeaseRefused):
                peer, request_id = _waiter(effect.waiter)
            if isinstance(effect, LeaseGranted):
                endpoints = effect.endpoints
                local = endpoints[1] if len(endpoints) > 1 else ""
                out.append(
                    self._send(peer, _wire.Leased(request_id, effect.lease, endpoints[0], local))
                )
            elif isinstance(effect, LeaseRefused):
                out.append(self._send(peer, _wire.Failure(request_id, "internal", effect.message)))
            else:
                out.append(effect)
        return out

    def _internal(self, peer: bytes, request_id: int, exc: Exception) -> list[Effect]:
        # The error's type and place only: its message may quote a request's contents.
        where = traceback.extract_tb(exc.__traceback__)[-1:] if exc.__traceback__ else []
        place = f" at {where[0].filename}:{where[0].lineno}" if where else ""
        failure = _wire.Failure(request_id, "internal", f"{type(exc).__name__}: {exc}")
        return [Log(f"internal error {type(exc).__name__}{place}"), self._send(peer, failure)]

    @staticmethod
    def _send(peer: bytes, message: Any) -> Send:
        return Send(peer, _wire.encoder.encode(message))


_DEPLOY_ONLY = (*_MUTATIONS, _wire.Shutdown)


def _refusal(request: Any, role: str) -> str:
    """Why ``role`` may not make ``request`` ("" if it may)."""
    if role == "deploy" or (role == "call" and not isinstance(request, _DEPLOY_ONLY)):
        return ""
    what = type(request).__name__.lower()
    if role == "call":
        return (
            f"this client holds a call-only secret: it may call, describe and list; {what} "
            "needs the cluster secret"
        )
    return f"{what} refused: the client is not authenticated (check SCATTER_SECRET)"


def _waiter(waiter: object) -> tuple[bytes, int]:
    """The (peer, request id) this core gives the pool as a lease's waiter."""
    assert isinstance(waiter, tuple)
    return waiter[0], waiter[1]


def _failure_kind(exc: ScatterError) -> _wire.FailureKind:
    if isinstance(exc, ConfigError):
        return "invalid"
    if isinstance(exc, FunctionNotFound):
        return "not_found"
    if isinstance(exc, VersionNotFound):
        return "version_not_found"
    return "internal"
