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
#
# Rule 6: peers replicate the registry. A change applied here (local or from a
# peer) is pushed at once to every live member when it is ours, and gossiped to
# `gossip_nodes` random members a bounded number of times (the broadcast queue);
# every anti-entropy interval one random member gets our registry clock (a digest
# of one counter per writer, never per function) and answers with the changes we
# lack. Changes from peers are persisted, then applied, as local ones (rule 3),
# and each body they bring is checked against its content id first.
#
# Rule 7: a stopping node answers everything that waits ("the node is stopping"),
# so no client waits for a reply that will never come.
#
# Rule 8: read your writes, on any node. A reply to a change carries the registry
# clock after it; a client sends back the merge of those it has seen on its reads
# (Describe, ListVersions, ListFunctions, CurrentVersion, and CatchUp before calls).
# A read whose clock this registry does not dominate is HELD (a value here, never a
# thread), and the node pulls what it lacks: a digest of its clock, without a reply
# wanted, to the live members that made the missing changes (the writer id names its
# node), else to one random live member; the peer answers it as any anti-entropy
# digest, with the changes this node lacks. A held read is answered, in arrival order,
# once the change that completes its clock has its views written (rule 3), or at its
# deadline (`read_wait`, or less if the request asks) with what the node holds then; a
# not-found answer then says which change it had not received. Pulls are asked again
# every _PULL_RETRY while reads wait. Entries naming nodes this one never heard of are
# another cluster's (a process may talk to two): never waited for, and vouched for in
# the reply's clock. A read without a clock, or one this registry dominates (those
# entries aside), is answered at once, as before.
# Routes too: a route lease of the current version that this node forwards carries its
# registry clock (merged with the client's, if it sent one), and a node that serves a
# route lease whose clock it does not dominate (its views written) holds it the same
# way, then decides it (its worker, a refusal, or a forward) once the change is here, or
# at the deadline with what it holds (a not-found refusal says what it lacked; a lease
# granted without it is logged). A pinned version is the same everywhere: never held.
# A lease without a name (the one-node fast path) carries no clock and is never held.
#
# Rule 9: bounded history. Every digest tells us the sender's registry clock. The
# stable frontier is the pointwise minimum of our clock and the last clock of every
# member not dead (or left) for longer than `history_grace`; it is only computed once
# each of those has sent one, and only while we hold whatever any of them said it holds
# (our clock dominates theirs). Then no change we can still receive from them sorts
# before a change the frontier counts: what they held, we hold; what they make later
# counts the frontier, so it sorts after it. Once `compact_after` changes of our log's
# prefix are stable, they are folded into the registry's snapshot, as a write of its own
# (persist, then apply; never while another write is in flight). A peer whose digest
# clock lies below our snapshot (away past the grace, or new and writing before it
# synced), or that holds a change our snapshot makes void, is sent a full state
# transfer instead of changes: the snapshot and every change on top (`PeerChanges` with
# `snapshot`). It adopts it as a write: the void changes it held (in its log, or folded
# while a member had not seen them) are dropped and re-issued on top under a new writer
# id, each naming the change it re-issues (Registry.adopt), then pushed.
#
# Rule 10: members gone for good. A member that never comes back would make every node
# keep, in its snapshot's `unconfirmed`, each change folded since it left: history that
# grows with changes made. What is kept for it guards against one thing: its lineage (a
# snapshot lacking those changes, its own or one adopted from it) outranking ours later.
# Only a member that acts again can bring that about; so a member stops counting as a
# confirmer only once it is certain never to act again with its identity and data:
#   - it left (`scatter node leave`): it refuses changes, waits until a live member holds
#     every change and body it holds (the handover: a digest whose clock dominates ours
#     and that lacks no body), forgets itself (ForgetOp naming itself, a registry change
#     like any other), says goodbye once a member shows it applied that too (it answers
#     our digest with PeerForgotten) or after LEAVE_GOODBYE_WAIT, and stops. Started
#     again, its data directory (or a copy) sees its own forget and starts empty as a new
#     node, which forgets the old id itself once it has caught up, should the old forget
#     never have got out. A leave nobody takes within LEAVE_HANDOVER_TIMEOUT fails;
#     nothing is done.
#   - an operator forgot it (`scatter node forget NODE`): the word that it crashed and its
#     data directory is gone. Refused unless it is dead or left and every other member
#     is alive here.
# A forget is made only once every live member said it applies forgets (an older release
# would drop every batch holding one). Once applied, the member is out of the table, news
# of it is ignored, its messages are dropped and answered by PeerForgotten (if it comes
# back after all, it refuses changes and says so in its status). Once the forget is
# folded into a snapshot, the changes kept for it alone go (at the next round: the
# snapshot also lets go, without new folding, of what members back from an absence have
# confirmed since). A change held pending for a past of the forgotten member that never
# came is refused as void then (its past is gone). Why that is enough: every other member
# confirmed what we release, and a node keeps what it confirmed (in its state, or
# re-issued when it adopts another snapshot) until every member not gone for good has it;
# a lineage that lacks it can only start at a member gone for good, which never acts.

"""The node core: control requests, worker events and ticks in; effects out. Pure."""

from __future__ import annotations

import functools
import itertools
import math
import random
import traceback
from collections import Counter, deque
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import msgspec

from .. import _wire
from .._config import NodeConfig
from .._exceptions import ConfigError, FunctionNotFound, ScatterError, VersionNotFound
from ._broadcast import BroadcastQueue
from ._forwarding import (
    FORWARD_TIMEOUT,
    REASON_WAIT,
    REMEMBER_RELAYED_FOR,
    RETRY_KINDS,
    CannotLoad,
    Forward,
    RelayedIds,
    Relaying,
    nobody_can_run,
    python_problem,
)
from ._membership import MemberInfo, Membership, State
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
    Snapshot,
    VersionRecord,
    content_id_of,
    node_of_writer,
)
from ._vclock import VectorClock

__all__ = [
    "BumpGeneration",
    "ClosePeer",
    "KillWorker",
    "Log",
    "NodeCore",
    "NodeFacts",
    "PersistChanges",
    "PersistMembers",
    "PersistViews",
    "PushChanges",
    "Send",
    "SendPeer",
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
    # Bounded history (rule 9): with a snapshot, store it in the same transaction and
    # delete the changes ``dropped`` (a compaction), or every change but ``changes``
    # (``replace``: a full state transfer).
    snapshot: Snapshot | None = None
    dropped: tuple[str, ...] = ()
    replace: bool = False
    # What the registry refused as void (Registry.void), when it changed: store it with
    # the replica, for the next start (None: as stored).
    void: Mapping[str, int] | None = None


@dataclass(frozen=True)
class PersistViews:
    """Store the workers' views (None: delete) and drop unused bodies; then
    ``views_persisted(ticket)``."""

    ticket: int
    views: Mapping[str, FunctionView | None]
    dropped_bodies: frozenset[str]


@dataclass(frozen=True)
class SendPeer:
    """Send ``payload`` to the peer node listening at ``address`` (one-way)."""

    address: str
    payload: bytes


@dataclass(frozen=True)
class PushChanges:
    """Send ``changes`` to the peer at ``address``, with the bodies they introduce
    (the driver reads them from the store)."""

    address: str
    changes: tuple[Change, ...]
    # A full state transfer (rule 9): send this snapshot too, with every live body.
    snapshot: Snapshot | None = None

    def content_ids(self) -> set[str]:
        """The content ids whose bodies go with it."""
        wanted = {
            op.record.content_id
            for change in self.changes
            for op in change.ops
            if isinstance(op, PublishOp)
        }
        if self.snapshot is not None:  # a full state transfer: every live body
            wanted |= {v.record.content_id for f in self.snapshot.functions for v in f.versions}
        return wanted


@dataclass(frozen=True)
class PushBodies:
    """Send the peer at ``address`` the bodies of ``content_ids`` the store holds (as
    many as one push carries: it asks again for the rest)."""

    address: str
    content_ids: tuple[str, ...]


@dataclass(frozen=True)
class PersistMembers:
    """Store the member table, so a restarted node rejoins by itself."""

    members: tuple[MemberInfo, ...]


@dataclass(frozen=True)
class BumpGeneration:
    """Tell the workers that views moved (the shared generation counter)."""


@dataclass(frozen=True)
class Log:
    message: str


@dataclass(frozen=True)
class ClosePeer:
    """Close the connection to a member forgotten for good (rule 10): nothing more is
    sent there but a notice, which opens a new one for as long as it speaks."""

    address: str


@dataclass(frozen=True)
class Stop:
    reason: str
    failed: bool = False  # the node exits non-zero


@dataclass(frozen=True)
class RelayCall:
    """Send ``call`` (a client's Call frame, unchanged) to the worker at ``endpoint``
    (TCP, with the keys of the client's ``role``; a worker of this node's when ``own``),
    and answer the client ``peer`` with ``Relayed(request_id, reply)``; a worker lost or
    silent for ``wait`` seconds plus the margin is answered as a failure that says the
    call may have run."""

    peer: bytes
    request_id: int
    endpoint: str
    own: bool
    role: str
    call: bytes
    call_id: int
    wait: float


Effect = (
    Send
    | RelayCall
    | SendPeer
    | PushChanges
    | PushBodies
    | PersistChanges
    | PersistViews
    | PersistMembers
    | BumpGeneration
    | Log
    | ClosePeer
    | Stop
    | PoolEffect
)


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
    seed: int = 0  # of the membership core's randomness (probe order, gossip targets)


@dataclass
class _Write:
    """The one write in flight (rule 4): a local change, or changes from a peer."""

    changes: tuple[Change, ...]
    ticket: int
    peer: bytes = b""  # the client to answer; b"" for changes from a peer
    request_id: int = 0
    reply: Callable[[], Any] | None = None  # builds the reply once applied
    local: bool = False
    views_pending: bool = False  # applied; its views are being written (requests wait)
    compaction: Snapshot | None = None  # a compaction: the snapshot to commit (rule 9)
    adopted: Registry | None = None  # a state transfer: the registry to take (rule 9)
    void: Mapping[str, int] | None = None  # the void record this write stores, if any
    bodies: frozenset[str] = frozenset()  # the content ids of the bodies it stores


@dataclass
class _Leaving:
    """A ``Leave`` under way (rule 10): handing this node's changes over, then its forget."""

    peer: bytes
    request_id: int
    deadline: float  # monotonic: no member took our changes by then, the leave fails
    next_ask: float = 0.0  # monotonic: when to send our digest to the live members again
    forget: str = ""  # the id of our own forget, once made
    goodbye_by: float = 0.0  # monotonic: say goodbye by then, whoever holds the forget


@dataclass(frozen=True)
class _Held:
    """A read whose client has seen changes this node lacks, or a route lease of the
    current version whose clock this node lacks (rule 8)."""

    peer: bytes
    request: Any
    seen: VectorClock  # the clock the client (or the forwarding member) sent
    since: float  # monotonic: when it was held
    deadline: float  # monotonic: answered with what the node holds then
    role: str = ""  # a route lease's: forwarded with it if this node cannot run it


@dataclass(frozen=True)
class _Transfer:
    """A full state transfer a peer sent (rule 9), waiting its turn to be written."""

    snapshot: Snapshot
    changes: tuple[Change, ...]
    bodies: Mapping[str, tuple[VersionRecord, bytes]]  # checked already
    source: str


@dataclass(frozen=True)
class _FromPeer:
    """Changes a peer sent, waiting their turn to be written."""

    changes: tuple[Change, ...]
    bodies: Mapping[str, tuple[VersionRecord, bytes]]  # checked already


@dataclass(frozen=True)
class _Bodies:
    """Bodies a peer sent for versions held here without them, waiting their turn."""

    bodies: Mapping[str, tuple[VersionRecord, bytes]]  # checked already


_MUTATIONS = (_wire.Publish, _wire.PublishSet, _wire.Rollback, _wire.Vaporize, _wire.Forget)
# What a peer sent, waiting its turn to be written: no client waits for an answer.
_PEER_WRITES = (_FromPeer, _Transfer, _Bodies)
# Requests that read the registry and may carry the clock their client has seen (rule 8).
_READS = (
    _wire.Describe,
    _wire.ListVersions,
    _wire.ListFunctions,
    _wire.CurrentVersion,
    _wire.CatchUp,
)
# Seconds before a pull for a held read is asked again of the same member: its answer
# (or the digest) was lost, or that member did not hold the change either then.
_PULL_RETRY = 0.25
# Reads held at most at once; past it a read is answered at once with what the node
# holds (a client cannot make the node keep unbounded state by sending clocks).
MAX_HELD_READS = 4096
_PEER_MESSAGES = (
    _wire.PeerGossip,
    _wire.PeerChanges,
    _wire.PeerDigest,
    _wire.PeerRequest,
    _wire.PeerReply,
    _wire.PeerBodiesWanted,
    _wire.PeerForgotten,
)
MAX_CHANGES_PER_PUSH = 256  # an anti-entropy answer sends the rest next round
# Leaving (rule 10): seconds for a live member to hold every change of the leaving node
# before the leave fails; how often the leaving node sends its digest meanwhile; and how
# long it waits for a member to hold its own forget before it says goodbye anyway.
LEAVE_HANDOVER_TIMEOUT = 10.0
LEAVE_ASK_INTERVAL = 0.2
LEAVE_GOODBYE_WAIT = 2.0
# A full state transfer a peer did not take (lost, or declined: its own snapshot
# outranks ours, and it is ours that will have to go) is sent again to the same peer
# clock only after a back-off doubling from the anti-entropy interval up to this many
# intervals; at once if the peer's clock or our snapshot moved.
TRANSFER_BACKOFF_INTERVALS = 32
# Requests members asked us to serve whose answer is still to come (see _on_peer_request).
_MAX_PEER_CLIENTS = 1024


def _answers_peers(method: Callable[..., list[Effect]]) -> Callable[..., list[Effect]]:
    """An event method whose replies to a member's client go back as ``PeerReply``."""

    @functools.wraps(method)
    def event(self: NodeCore, *args: Any, **kwargs: Any) -> list[Effect]:
        effects = method(self, *args, **kwargs)
        if self._relaying:
            effects = self._to_relays(effects)
        return self._to_peers(effects) if self._peer_clients else effects

    return event
_MEMBERS_PERSIST_INTERVAL = 1.0  # seconds: the member table is stored at most this often


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
        *,
        snapshot: Snapshot | None = None,
        void: Mapping[str, int] | None = None,
        former: Iterable[str] = (),
    ) -> None:
        """``former``: ids this data directory's node had before it left and started
        afresh; forgotten by this node once it has joined, if the cluster has not yet."""
        self.config = config
        self.facts = facts
        self.registry = Registry.from_snapshot(
            facts.writer_id, snapshot or Snapshot(), changes, void=void
        )
        self._void_stored = dict(void or {})  # the registry's void record, as stored
        self._transfers = 0  # full state transfers taken in this start (writer ids)
        # {peer node: (its clock, our snapshot clock, when, how many sent)}: the last
        # full state transfer sent to it, while it still needs one (back-off, rule 9)
        self._transfers_to: dict[str, tuple[VectorClock, VectorClock, float, int]] = {}
        self.pool = PoolCore(
            min_workers=config.min_workers,
            max_workers=config.max_workers,
            kill_grace=config.kill_grace,
            idle_retire=config.worker_idle_retire,
        )
        self._views: dict[str, FunctionView] = dict(views)  # {name: view}, as persisted
        self._body_ids = set(body_ids)  # only until start() reconciles
        self._refs: Counter[str] = Counter()  # {content_id: live versions using it}
        # Live versions stored here without their body (it did not fit the message that
        # brought them, or a start found it gone): {content_id: record}, asked of a
        # member (PeerBodiesWanted) until it comes; calls to them fail with a load error.
        self.missing_bodies: dict[str, VersionRecord] = {}
        self._tickets = itertools.count(1)
        self._write: _Write | None = None
        # (peer, request or _FromPeer, wall): what waits behind the write in flight
        self._waiting: deque[tuple[bytes, Any, float]] = deque()
        self._stopping = False
        self._started_now = self._now = 0.0  # monotonic: at start(), at the last request
        self._wall = 0.0  # unix seconds at the last frame (re-issued changes record it)
        self.membership = Membership(
            facts.node_id,
            facts.address,
            config.membership,
            # Rule 2 of the membership: a restart must outrank whatever the last
            # process refuted to; starts are counted, refutations within a start low.
            incarnation=facts.incarnation << 32,
            seed=facts.seed,
        )
        self._rng = random.Random(facts.seed + 1)
        self._news: BroadcastQueue[Change] = BroadcastQueue()  # changes to gossip (rule 6)
        self._next_anti_entropy = 0.0
        self._next_change_gossip = 0.0
        self._members_persisted_version = -1  # the membership table version last stored
        self._members_persisted_count = 0
        self._members_persisted_at = -math.inf
        self._peer_clocks: dict[str, Any] = {}  # {node id: the registry clock it last sent}
        # Members the registry forgot, as the membership and the peer handlers know them
        # (rule 10), and when each was last told so (PeerForgotten, at most once a round).
        self._forgotten: frozenset[str] = frozenset()
        self._told_forgotten: dict[str, float] = {}
        self._forgotten_by = ""  # the member that told us the cluster forgot this node
        self._forget_aware: set[str] = set()  # members whose digests say they apply forgets
        self._leaving: _Leaving | None = None
        self._release_looked: Any = None  # what _confirmations_moved saw last
        self._former = frozenset(former)  # our ids before a start afresh, to forget
        self._held: list[_Held] = []  # reads waiting for changes their client saw (rule 8)
        # {member address: (when to ask again, what the reads wanted, our clock then)}
        self._pulls: dict[str, tuple[float, VectorClock, VectorClock]] = {}
        self._handlers: dict[type, Callable[[Any], Any]] = {
            _wire.Hello: self._on_hello,
            _wire.CurrentVersion: self._on_current_version,
            _wire.Describe: self._on_describe,
            _wire.ListVersions: self._on_versions,
            _wire.ListFunctions: self._on_functions,
            _wire.Status: self._on_status,
            _wire.CatchUp: self._on_catch_up,
        }
        self._peer_handlers: dict[type, Callable[[Any, float], list[Effect]]] = {
            _wire.PeerGossip: self._on_gossip,
            _wire.PeerChanges: self._on_changes,
            _wire.PeerDigest: self._on_digest,
            _wire.PeerReply: self._on_peer_reply,
            _wire.PeerBodiesWanted: self._on_bodies_wanted,
            _wire.PeerForgotten: self._on_forgotten,
        }
        # Run here, or forward (_forwarding.py): what this node and its peers cannot
        # load, the requests forwarded to members, and the members' requests served here.
        self.cannot_load = CannotLoad()
        self._forwards: dict[int, Forward] = {}  # {ticket: the forward waiting for it}
        self._forward_tickets = itertools.count(1)
        self._parked: list[Forward] = []  # nobody can: waiting briefly for reasons
        # {a stand-in ROUTER identity: (member address, ticket)} of requests a member sent
        self._peer_clients: dict[bytes, tuple[str, int]] = {}
        # Relayed calls (Relay): {a stand-in ROUTER identity: the call, while its
        # worker is leased}, and the call ids relayed lately (never twice).
        self._relaying: dict[bytes, Relaying] = {}
        self._relay_tickets = itertools.count(1)
        self.relayed_ids = RelayedIds()
        # Test hook (SCATTER_TEST_HOLD_PEER_CHANGES): changes from peers are dropped, so
        # this node lacks what others publish (tests of forwarding).
        self.hold_peer_changes = False

    # -- events -----------------------------------------------------------------

    def start(
        self, now: float, join: Iterable[str] = (), remembered: Iterable[MemberInfo] = ()
    ) -> list[Effect]:
        """Reconcile the workers' views with the registry; start the pool; join peers.

        The persisted views may be stale (a crash between a change and its views, a
        store written by an older release): every name is compared once.

        Args:
            join: addresses of members to join through (given, or remembered).
            remembered: the member table the node stored before it stopped.
        """
        self._started_now = self._now = now
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
            self.missing_bodies = {
                cid: self.registry.resolve_content(name, cid)[1]
                for name, view in fresh.items()
                if view
                for cid in view.content_ids.values()
                if cid in missing
            }
            effects.append(
                Log(
                    f"{len(missing)} live version(s) have no body on this node; they are "
                    "asked of the members, and calls to them fail with a load error until "
                    "they come"
                )
            )
        dropped = frozenset(self._body_ids - self._refs.keys())
        self._body_ids = set()
        self._views = {name: view for name, view in fresh.items() if view is not None}
        if views or dropped:
            effects.append(PersistViews(next(self._tickets), views, dropped))
        effects.append(BumpGeneration())
        effects += self.pool.start(now)
        effects += self._drop_forgotten()
        self.membership.remember(remembered, now)
        effects += self._packets(self.membership.join(join, now))
        return effects

    @_answers_peers
    def receive(
        self,
        peer: bytes,
        payload: bytes,
        *,
        role: str,
        now: float,
        wall: float,
        readings: Callable[[], Mapping[int, SlotReading]],
    ) -> list[Effect]:
        """A frame from a client or a peer node.

        Args:
            role: what the sender's key may do: "deploy" (anything a client may),
                "call" (call, describe, list), "peer" (node-to-node messages only);
                anything else is refused.
            readings: reads the workers' slots now (only a lease needs them).
        """
        self._wall = wall
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
            if isinstance(request, _PEER_MESSAGES):
                return [Log(f"refused a peer message from a {role or 'unknown'} client")]
            return [self._send(peer, _wire.Failure(request.id, "forbidden", refusal))]
        if isinstance(request, _PEER_MESSAGES):
            if request.source in self._forgotten:
                return self._refuse_forgotten(request, now)
            try:
                if isinstance(request, _wire.PeerRequest):
                    return self._on_peer_request(request, now, wall, readings)
                return self._peer_handlers[type(request)](request, now)
            except Exception as exc:
                return self._internal(b"", 0, exc)[:1]  # a peer gets no reply, we a log
        if self._stopping:
            return [self._send(peer, _stopping_failure(request.id))]
        self._now = now
        if isinstance(request, _wire.Lease) and request.name:
            return self._route_lease(peer, request, role, now, readings)
        if isinstance(request, _wire.Relay):
            return self._relay(peer, request, role, now, readings)
        if isinstance(request, _wire.Lease):
            self.pool.observe(now, readings())
            # The lease lives with the connection that asked (see connection_closed).
            return self._pool_effects(self.pool.lease((peer, request.id), now, holder=peer))
        if isinstance(request, _wire.Release):
            self.pool.release(request.lease)
            return [self._send(peer, _wire.Done(request.id))]
        if isinstance(request, _wire.Shutdown):
            return [self._send(peer, _wire.Done(request.id)), Stop("asked to stop")]
        if isinstance(request, _wire.Leave):
            return self._begin_leave(peer, request, now)
        if isinstance(request, _MUTATIONS) and (self._leaving or self._forgotten_by):
            why = (
                "the node is leaving its cluster"
                if self._leaving
                else f"the cluster forgot this node (told by {self._forgotten_by}): start "
                "it with a new data directory to rejoin"
            )
            return [self._send(peer, _wire.Failure(request.id, "internal", f"{why}; nothing was changed"))]
        if self._write is not None and (
            self._write.views_pending or isinstance(request, _MUTATIONS)
        ):
            self._waiting.append((peer, request, wall))
            return []
        return self._serve(peer, request, wall)

    @_answers_peers
    def stop(self) -> list[Effect]:
        """The node is stopping (rule 7): answer what waits; refuse what comes."""
        self._stopping = True
        effects: list[Effect] = []
        write, self._write = self._write, None
        if write is not None and write.peer:
            effects.append(
                self._send(
                    write.peer,
                    _wire.Failure(
                        write.request_id,
                        "internal",
                        "the node stopped while storing this change; it may have been "
                        "stored: check versions() once a node runs again",
                    ),
                )
            )
        while self._waiting:
            peer, request, _wall = self._waiting.popleft()
            if not isinstance(request, _PEER_WRITES):
                effects.append(self._send(peer, _stopping_failure(request.id)))
        held, self._held = self._held, []
        effects += [self._send(h.peer, _stopping_failure(h.request.id)) for h in held]
        leaving, self._leaving = self._leaving, None
        if leaving is not None:
            effects.append(self._send(leaving.peer, _stopping_failure(leaving.request_id)))
        return effects

    def busy_writing(self) -> bool:
        """Whether a write is in flight or waiting: a stopping driver lets it finish."""
        return self._write is not None or any(
            isinstance(r, (*_MUTATIONS, *_PEER_WRITES)) for _, r, _ in self._waiting
        )

    @_answers_peers
    def changes_persisted(self, ticket: int) -> list[Effect]:
        write = self._write
        if write is None or write.ticket != ticket:
            return []
        if write.void is not None:
            self._void_stored = dict(write.void)
        if write.compaction is not None:  # no lookup moves (rule 9): nothing to derive
            self.registry.commit_compaction(write.compaction)
            for node in write.compaction.forgotten:  # asked for no more (rule 10)
                self._peer_clocks.pop(node, None)
            self._write = None
            return self._next()
        if not write.changes and write.adopted is None:  # bodies, or what was refused as void
            self._write = None
            if write.bodies:
                for content_id in write.bodies:
                    self.missing_bodies.pop(content_id, None)
                return self._ask_for_bodies() + self._next()  # the rest, at once
            return self._next()
        try:
            if write.adopted is not None:
                names = set(self.registry.names()) | set(write.adopted.names())
                self.registry = write.adopted
                self.facts = replace(self.facts, writer_id=write.adopted.node_id)
            else:
                names = self.registry.apply_many(write.changes)
        except Exception as exc:
            # On disk and not appliable: every restart would fail the same way. Stop
            # now, loudly, rather than serve a registry that disagrees with its log.
            self._write = None
            return [
                *self._internal(write.peer, write.request_id, exc),
                Stop("a stored change could not be applied (see the log)", failed=True),
            ]
        forgot = self._drop_forgotten()
        views, dropped = self._derive(names, stored=write.bodies)
        if not views and not dropped:
            return forgot + self._finish(write)
        write.ticket = next(self._tickets)
        write.views_pending = True
        return [*forgot, PersistViews(write.ticket, views, dropped)]

    @_answers_peers
    def views_persisted(self, ticket: int) -> list[Effect]:
        write = self._write
        if write is None or write.ticket != ticket:
            return []  # the views of start(): nothing waits for them
        return self._finish(write)

    @_answers_peers
    def persist_failed(self, ticket: int, error: str) -> list[Effect]:
        write = self._write
        if write is not None and write.ticket == ticket and not write.views_pending:
            self._write = None
            if write.changes and write.adopted is None:
                what = f"change {write.changes[0].change_id}"
            elif write.changes or write.adopted or write.compaction:
                what = "the registry's snapshot"
            elif write.bodies:
                what = f"{len(write.bodies)} bodies a member sent"
            else:
                what = "what the registry refused as void"
            effects: list[Effect] = [Log(f"could not store {what}: {error}")]
            if write.peer:
                failure = _wire.Failure(
                    write.request_id,
                    "internal",
                    f"the node could not store the change ({error}); nothing was changed",
                )
                effects.append(self._send(write.peer, failure))
            return [*effects, *self._next()]
        return [
            Log(f"could not write the workers' views ({error})"),
            Stop("the workers' views could not be stored; a restart rebuilds them", failed=True),
        ]

    @_answers_peers
    def worker_started(
        self, slot: int, pid: int, endpoints: tuple[str, ...], now: float
    ) -> list[Effect]:
        self._now = now  # a lease granted now says so (Leased.monotonic)
        return self._pool_effects(self.pool.started(slot, pid, endpoints, now))

    @_answers_peers
    def worker_start_failed(self, slot: int, error: str, now: float) -> list[Effect]:
        effects = self._pool_effects(self.pool.start_failed(slot, error, now))
        return [Log(f"could not start a worker: {error}"), *effects]

    @_answers_peers
    def worker_exited(self, slot: int, now: float) -> list[Effect]:
        self._now = now
        return self._pool_effects(self.pool.exited(slot, now))

    def connection_closed(self, peer: bytes) -> list[Effect]:
        """The control connection ``peer`` closed (its client exited or closed): the
        leases it took end now, not after the idle expiry."""
        self.pool.holder_gone(peer)
        if self._held:  # a route lease held for its clock would outlive its connection
            self._held = [held for held in self._held if held.peer != peer]
        return []

    @_answers_peers
    def tick(self, now: float, readings: Mapping[int, SlotReading]) -> list[Effect]:
        self._now = now
        effects = self._pool_effects(self.pool.tick(now, readings))
        if self._held:
            if self._write is None or not self._write.views_pending:
                effects += self._release_held(lambda: readings)  # past their deadline
            effects += self._pull()  # again, where the last pull went unanswered
        if self._forwards or self._parked:
            effects += self._forwards_due(now)
        if self._leaving is not None:
            effects += self._leave_due(now)
        effects += self._packets(self.membership.tick(now))
        config = self.config
        if now >= self._next_anti_entropy:
            self._next_anti_entropy = now + config.anti_entropy_interval
            for address in self._peers(1 if config.registry_gossip else 0):
                digest = self._digest(reply=True)
                effects.append(SendPeer(address, _wire.encoder.encode(digest)))
            if self._write is None and not self._waiting:
                effects += self._compaction(now)
            if self._former and self._write is None and not self._waiting:
                effects += self._forget_former()
            effects += self._ask_for_bodies()
        if len(self._news) and now >= self._next_change_gossip:
            self._next_change_gossip = now + config.membership.gossip_interval
            members = len(self.membership.live_others()) + 1
            for address in self._peers(config.membership.gossip_nodes):
                changes = self._news.take(
                    32, members=members, retransmit_mult=config.membership.retransmit_mult
                )
                if changes:
                    effects.append(PushChanges(address, tuple(changes)))
        membership = self.membership
        if membership.version != self._members_persisted_version:
            # A new member is stored at once (a restart soon after a join must rejoin);
            # other moves of the table at most once a second.
            count = len(membership.known())
            if (
                count != self._members_persisted_count
                or now - self._members_persisted_at >= _MEMBERS_PERSIST_INTERVAL
            ):
                self._members_persisted_version = membership.version
                self._members_persisted_count = count
                self._members_persisted_at = now
                effects.append(PersistMembers(membership.table()))
        return effects

    def next_wakeup(self) -> float:
        """When the cluster timers need :meth:`tick` next, at the latest (the pool's
        deadlines are polled by the driver's own cadence)."""
        times = [self.membership.next_wakeup(), self._next_anti_entropy]
        if len(self._news):
            times.append(self._next_change_gossip)
        if self._leaving is not None:
            times.append(self._leaving.next_ask)
        if self._held:
            times.append(min(held.deadline for held in self._held))
            times += [asked[0] for asked in self._pulls.values()]
        return min(times)

    # -- peers ------------------------------------------------------------------

    def _on_gossip(self, message: _wire.PeerGossip, now: float) -> list[Effect]:
        return self._packets(self.membership.receive(message.address, message.messages, now))

    def _on_digest(self, message: _wire.PeerDigest, now: float) -> list[Effect]:
        self._peer_clocks[message.source] = message.clock
        if message.forgets:
            self._forget_aware.add(message.source)
        else:
            self._forget_aware.discard(message.source)
        effects: list[Effect] = []
        if message.cannot_load:
            self.cannot_load.heard(message.source, message.cannot_load)
            effects += self._answer_parked(now)
        registry = self.registry
        if not registry.can_serve(message.clock) or registry.holds_void(message.clock):
            # Below our snapshot, or holding what it made void (rule 9): all of it.
            if self._transfer_due(message.source, message.clock, now):
                # What does not fit one message comes by anti-entropy once it is taken.
                log = registry.log()[:_wire.MAX_BATCH_CHANGES]
                transfer = PushChanges(message.address, tuple(log), registry.transferable())
                effects.append(transfer)
        else:
            self._transfers_to.pop(message.source, None)
            if missing := registry.changes_since(message.clock)[:MAX_CHANGES_PER_PUSH]:
                effects.append(PushChanges(message.address, tuple(missing)))
        if message.reply:
            mine = self._digest(reply=False)
            effects.append(SendPeer(message.address, _wire.encoder.encode(mine)))
        if (
            self._leaving is not None
            and message.clock.dominates(self.registry.clock)
            and not message.missing_bodies
        ):
            effects += self._leave_held(now)
        return effects

    def _transfer_due(self, peer: str, theirs: VectorClock, now: float) -> bool:
        """Whether to send ``peer`` (at ``theirs``) a full state transfer now. A peer
        whose own snapshot outranks ours declines it until we adopt its snapshot, and
        a whole replica per digest is the most a node sends: the same one goes again
        to an unchanged peer only after a back-off (it may have been lost)."""
        ours = self.registry.snapshot.clock
        interval = self.config.anti_entropy_interval
        last = self._transfers_to.get(peer)
        if last is not None:
            clock, snapshot, at, sent = last
            if clock == theirs and snapshot == ours:
                wait = interval * min(2 ** (sent - 1), TRANSFER_BACKOFF_INTERVALS)
                if now < at + wait:
                    return False
                self._transfers_to[peer] = (theirs, ours, now, sent + 1)
                return True
        self._transfers_to[peer] = (theirs, ours, now, 1)
        return True

    def _on_changes(self, message: _wire.PeerChanges, now: float) -> list[Effect]:
        if self.hold_peer_changes:
            return []
        snapshot = message.snapshot
        if snapshot is None and not message.changes:
            return self._on_bodies(message)
        if snapshot is not None and self._takes(snapshot):
            records = [v.record for f in snapshot.functions for v in f.versions]
            records += [
                op.record for c in message.changes for op in c.ops if isinstance(op, PublishOp)
            ]
            effects, bodies = self._checked_bodies(message, records)
            transfer = _Transfer(snapshot, tuple(message.changes), bodies, message.source)
            if self._write is not None:
                self._waiting.append((b"", transfer, self._wall))
                return effects
            return effects + self._begin_transfer(transfer, self._wall)
        registry = self.registry
        fresh = tuple(
            c
            for c in message.changes
            if not registry.has_change(c.change_id) and registry.admissible(c)
        )
        if not fresh and self._void_to_store() is None:
            return []
        records = [op.record for c in fresh for op in c.ops if isinstance(op, PublishOp)]
        effects, bodies = self._checked_bodies(message, records)
        batch = _FromPeer(fresh, bodies)
        if self._write is not None:
            self._waiting.append((b"", batch, 0.0))
            return effects
        return effects + self._begin_peer_write(batch)

    def _on_bodies(self, message: _wire.PeerChanges) -> list[Effect]:
        """Bodies a member sent for versions held here without them (asked for, or not:
        only those still missing are stored, each checked against its record)."""
        missing = self.missing_bodies
        records = [missing[cid] for cid in message.bodies if cid in missing]
        effects, bodies = self._checked_bodies(message, records)
        if not bodies:
            return effects
        batch = _Bodies(bodies)
        if self._write is not None:
            self._waiting.append((b"", batch, 0.0))
            return effects
        return effects + self._begin_bodies_write(batch)

    def _begin_bodies_write(self, batch: _Bodies) -> list[Effect]:
        bodies = {cid: found for cid, found in batch.bodies.items() if cid in self.missing_bodies}
        if not bodies:  # dropped meanwhile (no live version uses them), or stored
            return self._next()
        self._write = _Write((), next(self._tickets), bodies=frozenset(bodies))
        return [PersistChanges(self._write.ticket, (), bodies)]

    def _on_bodies_wanted(self, message: _wire.PeerBodiesWanted, now: float) -> list[Effect]:
        wanted = tuple(cid for cid in message.content_ids if cid in self._refs)
        return [PushBodies(message.address, wanted)] if wanted else []

    def _ask_for_bodies(self) -> list[Effect]:
        """Ask one random live member for bodies still missing here (the first
        MAX_BATCH_CHANGES): at every anti-entropy round, and as soon as some came."""
        if not self.missing_bodies:
            return []
        peers = self._peers(1)
        if not peers:
            return []
        wanted = list(itertools.islice(self.missing_bodies, _wire.MAX_BATCH_CHANGES))
        facts = self.facts
        message = _wire.PeerBodiesWanted(facts.node_id, facts.address, wanted)
        return [SendPeer(peers[0], _wire.encoder.encode(message))]

    def _checked_bodies(
        self, message: _wire.PeerChanges, records: Iterable[VersionRecord]
    ) -> tuple[list[Effect], dict[str, tuple[VersionRecord, bytes]]]:
        """The bodies ``message`` brings for ``records``, each checked against its id."""
        bodies: dict[str, tuple[VersionRecord, bytes]] = {}
        effects: list[Effect] = []
        for record in records:
            body = message.bodies.get(record.content_id)
            if body is None or record.content_id in bodies:
                continue
            if _content_id(record, body) != record.content_id:
                effects.append(
                    Log(f"a body from {message.source} does not match its content id "
                        f"{record.content_id}; not stored")
                )
                continue
            bodies[record.content_id] = (record, body)
        return effects, bodies

    # -- forgetting members for good (rule 10) ------------------------------------

    def _why_not_forget(self, nodes: Iterable[str]) -> str:
        """Why ``nodes`` may not be forgotten now ("" if they may)."""
        nodes = set(nodes)
        me = self.facts.node_id
        if me in nodes:
            return f"{me} is this node: a node cannot forget itself (`scatter node leave`)"
        already = sorted(nodes & self._forgotten)
        if already:
            return f"already forgotten: {', '.join(already)}"
        known = self.membership.known()
        strangers = sorted(nodes - known.keys())
        if strangers:
            members = ", ".join(sorted(known.keys() - {me})) or "none"
            return f"no member {', '.join(strangers)} here (members: {members})"
        live = sorted(n for n in nodes if known[n].state < State.DEAD)
        if live:
            return (
                f"{', '.join(live)} {'is' if len(live) == 1 else 'are'} not dead or gone: "
                "only a member declared dead, or one that left, can be forgotten"
            )
        unaware = self._unaware()
        if unaware:
            return unaware
        down = sorted(
            m.node
            for m in known.values()
            if m.node != me and m.node not in nodes and m.state != State.ALIVE
        )
        if down:
            return (
                f"{', '.join(down)} {'is' if len(down) == 1 else 'are'} not alive here: "
                "forget only while every other member is alive (two sides of a partition "
                "must never forget each other); name them too if they are gone for good"
            )
        return ""

    def _unaware(self) -> str:
        """Why a forget may not be made now ("" if it may): a live member whose digests
        do not say it applies forgets (an older release, or not heard from yet)."""
        unaware = sorted(
            m.node for m in self.membership.live_others() if m.node not in self._forget_aware
        )
        if not unaware:
            return ""
        return (
            f"{', '.join(unaware)} {'has' if len(unaware) == 1 else 'have'} not said "
            "that it applies forgets (an older release cannot: upgrade it first), or has "
            "not sent its digest yet: try again in a few seconds"
        )

    def _begin_leave(self, peer: bytes, request: _wire.Leave, now: float) -> list[Effect]:
        """Leave for good (rule 10): first a live member must hold every change this node
        holds (none is lost with it); then the node forgets itself, says goodbye and
        stops. Until then it refuses changes; a leave nobody takes in time fails."""
        if self._leaving is not None:
            return [self._send(peer, _wire.Failure(request.id, "invalid", "already leaving"))]
        if self._forgotten_by:
            why = f"the cluster forgot this node already (told by {self._forgotten_by})"
            return [self._send(peer, _wire.Failure(request.id, "invalid", why))]
        if not self.membership.live_others():
            why = (
                "no live member to hand this node's changes to, so leaving would lose them "
                "(`scatter node stop` stops it, and keeps them)"
            )
            return [self._send(peer, _wire.Failure(request.id, "invalid", why))]
        self._leaving = _Leaving(peer, request.id, deadline=now + LEAVE_HANDOVER_TIMEOUT)
        return self._leave_due(now)

    def _leave_due(self, now: float) -> list[Effect]:
        leaving = self._leaving
        assert leaving is not None
        if leaving.forget and now >= leaving.goodbye_by and self._write is None:
            # Every other change is held by a member; only our forget may be held by none.
            log = Log(
                f"no member said it holds this node's forget within {LEAVE_GOODBYE_WAIT:g} s: "
                "should none have it, the members see this node as dead and keep history "
                f"for it until `scatter node forget {self.facts.node_id}` on one of them"
            )
            return [log, *self._goodbye(now)]
        if not leaving.forget and now >= leaving.deadline:
            self._leaving = None
            why = self._unaware() or (
                f"no live member held every change of this node within "
                f"{LEAVE_HANDOVER_TIMEOUT:g} s"
            )
            failure = _wire.Failure(
                leaving.request_id, "internal", f"{why}; the node did not leave (it still serves)"
            )
            return [self._send(leaving.peer, failure)]
        if now < leaving.next_ask:
            return []
        leaving.next_ask = now + LEAVE_ASK_INTERVAL
        digest = _wire.encoder.encode(self._digest(reply=True))
        return [SendPeer(m.address, digest) for m in self.membership.live_others()]

    def _leave_held(self, now: float) -> list[Effect]:
        """A live member holds every change this node holds: forget ourselves, or, once
        that change is held too, say goodbye."""
        leaving = self._leaving
        assert leaving is not None
        if leaving.forget:
            if self.registry.has_change(leaving.forget) and self._write is None:
                return self._goodbye(now)
            return []
        if self._write is not None or self._waiting or self._unaware():
            return []  # asked again: the clock to hand over moves, or a member must say
            # that it applies forgets (our digests ask each for its own)
        change = self.registry.prepare_forget([self.facts.node_id], now=self._wall)
        leaving.forget = change.change_id
        leaving.goodbye_by = now + LEAVE_GOODBYE_WAIT
        leaving.next_ask = now  # the forget goes to them at once, then the digests
        return self._write_own(change)

    def _goodbye(self, now: float) -> list[Effect]:
        leaving = self._leaving
        assert leaving is not None
        self._leaving = None
        packets = self._packets(self.membership.leave(now))
        done = self._send(leaving.peer, _wire.Done(leaving.request_id))
        return [*packets, done, Stop("left the cluster for good")]

    def _forget_former(self) -> list[Effect]:
        """Forget the ids this directory's node had before it left (rule 10), should its
        own forget never have got out: the replica they acted with is gone, so they never
        act again. Once a live member is known and every live member applies forgets."""
        nodes = self._former - self._forgotten
        if not nodes:
            self._former = frozenset()
            return []
        live = self.membership.live_others()
        caught_up = any(
            (theirs := self._peer_clocks.get(m.node)) is not None
            and self.registry.clock.dominates(theirs)
            for m in live
        )
        if self._leaving is not None or self._unaware() or not caught_up:
            return []  # not before we hold what a member held: it may have forgotten them
        self._former = frozenset()
        change = self.registry.prepare_forget(sorted(nodes), now=self._wall)
        log = Log(
            f"forgetting {', '.join(sorted(nodes))}, this data directory's node before it "
            "left: its own forget had not reached the members"
        )
        return [log, *self._write_own(change)]

    def _drop_forgotten(self) -> list[Effect]:
        """Make the membership and the peer handlers refuse whom the registry forgot."""
        forgotten = self.registry.forgotten
        new = forgotten - self._forgotten
        if not new:
            return []
        self._forgotten = forgotten
        known = self.membership.known()
        addresses = [known[node].address for node in sorted(new) if node in known]
        self.membership.forget(new)
        for node in new:
            self._transfers_to.pop(node, None)
        log = Log(
            f"forgot {', '.join(sorted(new))} for good: messages from "
            f"{'it' if len(new) == 1 else 'them'} are refused from now on"
        )
        return [log, *(ClosePeer(address) for address in addresses)]

    def _refuse_forgotten(self, message: Any, now: float) -> list[Effect]:
        """A forgotten member spoke: drop it, and tell it (at most once a round)."""
        address = getattr(message, "address", "")
        last = self._told_forgotten.get(message.source, -math.inf)
        if not address or now - last < self.config.anti_entropy_interval:
            return []
        self._told_forgotten[message.source] = now
        notice = _wire.PeerForgotten(self.facts.node_id, self.facts.address, message.source)
        return [SendPeer(address, _wire.encoder.encode(notice))]

    def _on_forgotten(self, message: _wire.PeerForgotten, now: float) -> list[Effect]:
        if message.node != self.facts.node_id:
            return []  # meant for a former node at this address
        leaving = self._leaving
        if leaving is not None and leaving.forget and self._write is None:
            return self._goodbye(now)  # a member applied our forget: it holds it
        if self._forgotten_by or self.facts.node_id in self._forgotten:
            return []  # told already, or it left: it knows
        self._forgotten_by = message.source
        return [
            Log(
                f"the cluster forgot this node ({self.facts.node_id}; told by "
                f"{message.source} at {message.address}): its members refuse what it "
                "sends, and it refuses changes. To rejoin, start it with a new data "
                "directory (a new node id); what it changed that no other member holds "
                "is not carried over"
            )
        ]

    # -- bounded history (rule 9) -------------------------------------------------

    def frontier(self, now: float) -> VectorClock | None:
        """What every member not dead past the grace has seen; None while some of them
        has not told us its clock, or told us of changes we do not hold yet."""
        mine = low = self.registry.clock
        grace = self.config.history_grace
        for member in self.membership.known().values():
            if member.node == self.facts.node_id:
                continue
            if member.state >= State.DEAD and now - member.since > grace:
                continue
            theirs = self._peer_clocks.get(member.node)
            if theirs is None or not mine.dominates(theirs):
                return None
            low = low.meet(theirs)
        return low

    def _confirmers(self) -> dict[str, VectorClock | None]:
        """{member: its last registry clock (None: unknown)} of every member ever known,
        the grace ignored, and of the forgotten ones: the registry leaves out those a
        forget folded into the new snapshot (rule 10), never those only applied."""
        me = self.facts.node_id
        nodes = (self.membership.known().keys() | self.registry.forgotten) - {me}
        return {node: self._peer_clocks.get(node) for node in nodes}

    def _confirmations_moved(self, members: Mapping[str, VectorClock | None]) -> bool:
        """Whether the snapshot keeps changes (``unconfirmed``) and what every member
        (not forgotten in it) has seen moved since we last looked."""
        base = self.registry.snapshot
        if not base.unconfirmed:
            return False
        confirmed = self.registry.confirmed_by(members, base.forgotten)
        if confirmed is None:
            return False
        key = (len(base.unconfirmed), base.last, confirmed)
        if key == self._release_looked:
            return False
        self._release_looked = key
        return True

    def _takes(self, theirs: Snapshot) -> bool:
        """Whether to adopt a peer's snapshot: it holds what we lack or makes some of
        ours void, and it is the one both sides keep. Two snapshots made apart (each
        side of a partition compacted past the grace) are ranked, the same way on every
        node, so that one wins and the other side adopts it, never both."""
        registry = self.registry
        if not registry.needs_transfer(theirs):
            return False
        ours = registry.snapshot
        return theirs.clock.dominates(ours.clock) or _rank(theirs) > _rank(ours)

    def _compaction(self, now: float) -> list[Effect]:
        frontier = self.frontier(now)
        members = self._confirmers()
        if frontier is None or self.registry.stable_count(frontier) < max(
            1, self.config.compact_after
        ):
            # Nothing to fold yet; but what a member back (or one forgotten) confirmed
            # since is let go of now, not only at the next compaction. Looked for only
            # when what they all confirmed moved: never while one of them stays away.
            if not self._confirmations_moved(members):
                return []
            frontier = VectorClock()
        snapshot = self.registry.prepare_compaction(frontier, members=members)
        if snapshot is None:
            return []
        base = self.registry.snapshot.clock
        dropped = tuple(
            c.change_id
            for c in self.registry.log()
            if snapshot.clock.dominates(c.clock) and not base.dominates(c.clock)
        )
        void = self._void_to_store()
        self._write = _Write((), next(self._tickets), compaction=snapshot, void=void)
        return [
            PersistChanges(
                self._write.ticket, (), {}, snapshot=snapshot, dropped=dropped, void=void
            )
        ]

    def _begin_transfer(self, transfer: _Transfer, wall: float) -> list[Effect]:
        if not self._takes(transfer.snapshot):
            # Caught up meanwhile: what it brings on top goes the ordinary way.
            return self._begin_peer_write(_FromPeer(transfer.changes, transfer.bodies))
        self._transfers += 1
        writer = f"{self.facts.writer_id.split('~')[0]}~{self._transfers}"
        adopted, reissued = self.registry.adopt(
            transfer.snapshot,
            transfer.changes,
            writer_id=writer,
            now=wall,
        )
        void = adopted.void
        self._write = _Write(
            tuple(reissued),
            next(self._tickets),
            local=True,
            adopted=adopted,
            void=void,
            bodies=frozenset(transfer.bodies),
        )
        log = Log(
            f"took a full state transfer from {transfer.source} (this node was behind its "
            f"compacted history); re-issued {len(reissued)} change(s) it made void"
        )
        return [
            log,
            PersistChanges(
                self._write.ticket,
                tuple(adopted.log()),
                transfer.bodies,
                snapshot=adopted.snapshot,
                replace=True,
                void=void,
            ),
        ]

    def _begin_peer_write(self, batch: _FromPeer) -> list[Effect]:
        # Held already by the time its turn came (anti-entropy raced the push)?
        registry = self.registry
        fresh = tuple(
            c
            for c in batch.changes
            if not registry.has_change(c.change_id) and registry.admissible(c)
        )
        void = self._void_to_store()
        if not fresh and void is None:
            return self._next()
        # With nothing fresh, still a write: what was refused as void must outlive a
        # restart (a change counting it would wait forever for its past).
        self._write = _Write(fresh, next(self._tickets), void=void, bodies=frozenset(batch.bodies))
        purged = tuple(self.registry.take_purged())
        return [
            PersistChanges(self._write.ticket, fresh, batch.bodies, dropped=purged, void=void)
        ]

    def _void_to_store(self) -> dict[str, int] | None:
        """The registry's void record, if it changed since it was last stored."""
        void = self.registry.void
        return None if void == self._void_stored else void

    def _peers(self, count: int) -> list[str]:
        """Addresses of up to ``count`` random live members other than this node."""
        live = self.membership.live_others()
        return [m.address for m in self._rng.sample(live, min(count, len(live)))]

    def _packets(self, packets: Iterable[Any]) -> list[Effect]:
        me, address = self.facts.node_id, self.facts.address
        return [
            SendPeer(
                packet.address,
                _wire.encoder.encode(_wire.PeerGossip(me, address, list(packet.messages))),
            )
            for packet in packets
        ]

    # -- requests ---------------------------------------------------------------

    def _serve(self, peer: bytes, request: Any, wall: float) -> list[Effect]:
        if isinstance(request, _FromPeer):
            return self._begin_peer_write(request)
        if isinstance(request, _Transfer):
            return self._begin_transfer(request, wall)
        if isinstance(request, _Bodies):
            return self._begin_bodies_write(request)
        if isinstance(request, _READS):
            seen = request.clock
            # A pinned version is the same everywhere: described here, or by a member
            # that holds it (forwarded), never held back for the rest of the clock.
            pinned = isinstance(request, _wire.Describe) and bool(request.version)
            if seen is not None and not pinned and not self.registry.clock.dominates(seen):
                return self._hold(peer, request, seen)
        if not isinstance(request, _MUTATIONS):
            return self._answer(peer, request)  # reads, and status, members, ...
        try:
            return self._begin_write(peer, request, wall)
        except ScatterError as exc:
            return [self._send(peer, _wire.Failure(request.id, _failure_kind(exc), str(exc)))]
        except Exception as exc:
            return self._internal(peer, request.id, exc)

    def _answer(
        self,
        peer: bytes,
        request: Any,
        lacking: str = "",
        *,
        role: str = "",
        readings: Callable[[], Mapping[int, SlotReading]] = dict,
    ) -> list[Effect]:
        """Answer a read with what the registry holds now; ``lacking``: why that may not
        be all its client saw (rule 8), added to a not-found answer. A held route lease
        is decided now (``role``, ``readings``: as it arrived, and the slots now)."""
        if isinstance(request, _wire.Lease):
            return self._decide_route(peer, request, role, self._now, readings, lacking)
        try:
            return [self._send(peer, self._handlers[type(request)](request))]
        except ScatterError as exc:
            message = str(exc)
            if self._forwards_describe(peer, request, exc):
                failure = _wire.Failure(request.id, _failure_kind(exc), message)
                return self._forward_describe(peer, request, failure)
            if lacking and isinstance(exc, FunctionNotFound | VersionNotFound):
                message = f"{message} ({lacking})"
            return [self._send(peer, _wire.Failure(request.id, _failure_kind(exc), message))]
        except Exception as exc:
            return self._internal(peer, request.id, exc)

    # -- read your writes (rule 8) ------------------------------------------------

    def _hold(
        self,
        peer: bytes,
        request: Any,
        seen: VectorClock,
        role: str = "",
        readings: Callable[[], Mapping[int, SlotReading]] = dict,
    ) -> list[Effect]:
        # Changes made on nodes this one never heard of are another cluster's (the same
        # process talked to both): no member could ever bring them, so they are not
        # waited for, and the reply's clock vouches for them (_clock_for).
        now = self._now
        foreign = self._foreign(seen)
        if foreign.entries:
            seen = VectorClock({w: n for w, n in seen.entries.items() if w not in foreign.entries})
        if self.registry.clock.dominates(seen):
            if self._write is not None and self._write.views_pending:
                # A route lease: applied, its views not yet written (rule 3); it is
                # decided once they are, with the reads that wait (_finish).
                self._held.append(_Held(peer, request, seen, now, now, role))
                return []
            return self._answer(peer, request, role=role, readings=readings)
        wait = self.config.read_wait
        if isinstance(request, _wire.CatchUp) and request.wait > 0:
            wait = min(wait, request.wait)
        if not self.membership.live_others():
            how = "no live member could bring them"
            lacking = self._lacking(seen, how)
            return self._answer(peer, request, lacking, role=role, readings=readings)
        if wait <= 0 or len(self._held) >= MAX_HELD_READS:
            how = f"it did not wait for them ({len(self._held)} reads wait already)"
            lacking = self._lacking(seen, how)
            return self._answer(peer, request, lacking, role=role, readings=readings)
        self._held.append(_Held(peer, request, seen, now, now + wait, role))
        return self._pull()

    def _missing_writers(self, seen: VectorClock) -> list[str]:
        mine = self.registry.clock
        return [w for w, count in seen.entries.items() if count > mine.get(w)]

    def _foreign(self, seen: VectorClock) -> VectorClock:
        """The entries of ``seen`` that name a node this one never heard of."""
        state_of = self.membership.state_of
        return VectorClock(
            {w: n for w, n in seen.entries.items() if state_of(node_of_writer(w)) is None}
        )

    def _makers(self, seen: VectorClock) -> list[str]:
        """Addresses of the live members that made changes ``seen`` counts and this
        registry lacks: the ones to pull from."""
        nodes = {node_of_writer(writer) for writer in self._missing_writers(seen)}
        return [m.address for m in self.membership.live_others() if m.node in nodes]

    def _pull(self) -> list[Effect]:
        """Ask members for the changes held reads wait for: those that made them, else
        one random live member (another may hold them). A member is asked again after
        _PULL_RETRY, or at once if the reads now want more than it was asked for, or if
        changes arrived since (a partial answer: an answer holds at most
        MAX_CHANGES_PER_PUSH changes) and the reads still wait."""
        if not self._held:
            self._pulls.clear()
            return []
        wanted = VectorClock()
        for held in self._held:
            wanted = wanted.merge(held.seen)
        sources = self._makers(wanted)
        if not sources:
            live = self.membership.live_others()
            sources = [m.address for m in self._rng.sample(live, min(1, len(live)))]
        now = self._now
        mine = self.registry.clock
        digest = b""
        effects: list[Effect] = []
        # Only the members asked now are remembered: one that died is no source any more
        # (and its retry time must not wake the node for nothing).
        previous, self._pulls = self._pulls, {}
        for address in sources:
            asked = previous.get(address)
            if (
                asked is not None
                and now < asked[0]
                and asked[1].dominates(wanted)
                and asked[2] == mine
            ):
                self._pulls[address] = asked
                continue
            if not digest:
                facts = self.facts
                digest = _wire.encoder.encode(
                    _wire.PeerDigest(facts.node_id, facts.address, mine, reply=False)
                )
            self._pulls[address] = (now + _PULL_RETRY, wanted, mine)
            effects.append(SendPeer(address, digest))
        return effects

    def _release_held(
        self, readings: Callable[[], Mapping[int, SlotReading]] = dict
    ) -> list[Effect]:
        """Answer the held reads (and decide the held route leases) whose clock the
        registry now dominates, or whose deadline passed; the views of every applied
        change are written (rule 3). ``readings``: the slots, for a lease."""
        mine = self.registry.clock
        now = self._now
        effects: list[Effect] = []
        waiting: list[_Held] = []
        for held in self._held:
            if mine.dominates(held.seen):
                effects += self._answer(held.peer, held.request, role=held.role, readings=readings)
            elif now >= held.deadline:
                how = (
                    f"it waited {now - held.since:.1f} s for them: they may still be on "
                    "their way, or that node is cut off from this one"
                )
                lacking = self._lacking(held.seen, how)
                effects += self._answer(
                    held.peer, held.request, lacking, role=held.role, readings=readings
                )
            else:
                waiting.append(held)
        self._held = waiting
        if not waiting:
            self._pulls.clear()
        return effects

    def _lacking(self, seen: VectorClock, how: str) -> str:
        """What a read answered without all of ``seen`` adds to a not-found answer."""
        mine = self.registry.clock
        missing = {w: n - mine.get(w) for w, n in seen.entries.items() if n > mine.get(w)}
        nodes = ", ".join(sorted({node_of_writer(writer) for writer in missing}))
        return (
            f"this node had not yet received {sum(missing.values())} registry change(s) "
            f"the client has seen, made on node(s) {nodes}; {how}"
        )

    def _begin_write(self, peer: bytes, request: Any, wall: float) -> list[Effect]:
        change, bodies, reply = self._prepare(request, wall)
        if change is None:
            return [self._send(peer, reply()), *self._next()]
        # Bodies of the versions this change adds, and no others: a member left as it
        # was (same code) must not leave an unused body behind.
        added = {op.record.content_id for op in change.ops if isinstance(op, PublishOp)}
        bodies = {cid: found for cid, found in bodies.items() if cid in added}
        return self._write_own(change, bodies, peer, request.id, reply)

    def _write_own(
        self,
        change: Change,
        bodies: Mapping[str, tuple[VersionRecord, bytes]] | None = None,
        peer: bytes = b"",
        request_id: int = 0,
        reply: Callable[[], Any] | None = None,
    ) -> list[Effect]:
        """Store a change of this node's (a client's, or its own: a forget), then apply
        and push it (rule 4: the one write in flight)."""
        bodies = bodies or {}
        void = self._void_to_store()
        self._write = _Write(
            (change,),
            next(self._tickets),
            peer,
            request_id,
            reply,
            local=True,
            void=void,
            bodies=frozenset(bodies),
        )
        return [PersistChanges(self._write.ticket, (change,), bodies, void=void)]

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
                return _wire.Published(
                    request.id, request.name, number, content, change is None, registry.clock
                )

            return change, bodies, published
        if isinstance(request, _wire.Rollback):
            change = registry.prepare_rollback(request.name, request.to, now=wall)
            return (
                change,
                {},
                lambda: _wire.Moved(
                    request.id, request.name, self._current_or_zero(request.name), registry.clock
                ),
            )
        if isinstance(request, _wire.Forget):
            refusal = self._why_not_forget(request.nodes)
            if refusal:
                raise ConfigError(refusal)
            change = registry.prepare_forget(request.nodes, now=wall)
            return change, {}, lambda: _wire.Done(request.id)
        change = registry.prepare_vaporize(request.name, now=wall)
        return change, {}, lambda: _wire.Moved(request.id, request.name, 0, registry.clock)

    def _record(self, request: _wire.Publish, wall: float) -> VersionRecord:
        timeout = request.timeout
        if timeout is not None and not (math.isfinite(timeout) and timeout > 0):
            raise ConfigError(
                f"{request.name}: the timeout must be a finite number of seconds above 0, "
                f"got {timeout!r}"
            )
        record = VersionRecord(
            content_id="",
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
            timeout=timeout,
            signature_spec=request.signature_spec,
        )
        return msgspec.structs.replace(record, content_id=_content_id(record, request.body))

    def _on_hello(self, req: _wire.Hello) -> _wire.Welcome:
        # The client's protocol if this node speaks it too (a client of protocol 4 keeps
        # working: it sends no clocks and ignores the replies' new fields); else ours,
        # and the client says which of the two to upgrade.
        facts = self.facts
        protocol = req.protocol
        if not _wire.PROTOCOL_VERSION_MIN <= protocol <= _wire.PROTOCOL_VERSION_MAX:
            protocol = _wire.PROTOCOL_VERSION
        return _wire.Welcome(req.id, facts.node_id, protocol, facts.address)

    def _on_current_version(self, req: _wire.CurrentVersion) -> _wire.Moved:
        version = self.registry.current_version(req.name)
        return _wire.Moved(req.id, req.name, version, self._clock_for(req))

    def _on_catch_up(self, req: _wire.CatchUp) -> _wire.CaughtUp:
        clock = self._clock_for(req)
        assert clock is not None
        return _wire.CaughtUp(req.id, clock)

    def _clock_for(self, req: Any) -> VectorClock | None:
        """For the reply to a read whose client sent its clock: the registry's, plus the
        entries of the client's that name nodes this one never heard of (another
        cluster's changes: it will never hold them, and the client need not ask again).
        None, as before, for a read that sent none."""
        if req.clock is None:
            return None
        return self.registry.clock.merge(self._foreign(req.clock))

    def _on_describe(self, req: _wire.Describe) -> _wire.Description:
        number, record = self.registry.resolve(req.name, req.version or None)
        return _wire.Description(
            id=req.id,
            name=req.name,
            version=number,
            # 0 for a member its set retired: pinned versions of it still run.
            current_version=self._current_or_zero(req.name),
            content_id=record.content_id,
            signature=b"",  # the pickle is for workers; callers rebuild from signature_spec
            signature_text=record.signature_text,
            signature_id=record.signature_id,
            timeout=record.timeout or self.config.call_timeout,
            doc=record.doc,
            source=record.source if req.with_source else None,
            signature_spec=record.signature_spec,
            clock=self._clock_for(req),
        )

    def _on_versions(self, req: _wire.ListVersions) -> _wire.Listing:
        rows = [msgspec.to_builtins(info) for info in self.registry.versions(req.name)]
        return _wire.Listing(req.id, rows, self._clock_for(req))

    def _on_functions(self, req: _wire.ListFunctions) -> _wire.Listing:
        rows = [msgspec.to_builtins(info) for info in self.registry.functions()]
        return _wire.Listing(req.id, rows, self._clock_for(req))

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
            max_workers=pool.max_workers,
            saturated=pool.saturated,
            queued=pool.queued,
            members=[self._member_row(m) for m in self.membership.members()],
            changes=stats.changes,
            replica_hash=self.registry.replica_hash(),
            pending_changes=stats.pending,
            compacted_changes=stats.compacted,
            stable_changes=self._stable_changes(),
            void_changes=stats.void,
            uptime=self._now - self._started_now,
            unconfirmed_changes=len(self.registry.snapshot.unconfirmed),
            missing_bodies=len(self.missing_bodies),
            forgotten=sorted(self._forgotten),
            forgotten_by=self._forgotten_by,
        )

    def _stable_changes(self) -> int:
        frontier = self.frontier(self._now)
        return -1 if frontier is None else self.registry.stable_count(frontier)

    def _member_row(self, member: MemberInfo) -> dict[str, Any]:
        mine = self.registry.clock
        if member.node == self.facts.node_id:
            behind = 0
        elif member.node in self._peer_clocks:
            theirs = self._peer_clocks[member.node]
            behind = sum(max(0, n - theirs.get(w)) for w, n in mine.entries.items())
        else:
            behind = -1
        return {
            "node": member.node,
            "address": member.address,
            "state": member.state.name.lower(),
            "incarnation": member.incarnation,
            "changes_behind": behind,
        }

    # -- run here, or forward (_forwarding.py) ------------------------------------

    @_answers_peers
    def worker_cannot_load(self, content_id: str, reason: str) -> list[Effect]:
        """A worker failed to load ``content_id`` for ``reason`` (a missing module,
        another Python): remember it, and tell every live member at once."""
        return self._learn_cannot_load(content_id, reason)

    def _learn_cannot_load(self, content_id: str, reason: str) -> list[Effect]:
        if not self.cannot_load.learn(content_id, reason):
            return []
        digest = _wire.encoder.encode(self._digest(reply=False))
        return [
            Log(f"cannot load {content_id[:12]} here: {reason}"),
            *(SendPeer(m.address, digest) for m in self.membership.live_others()),
        ]

    def _digest(self, *, reply: bool) -> _wire.PeerDigest:
        return _wire.PeerDigest(
            self.facts.node_id,
            self.facts.address,
            self.registry.clock,
            reply=reply,
            cannot_load=self.cannot_load.recent(_wire.MAX_CANNOT_LOAD),
            forgets=True,
            missing_bodies=len(self.missing_bodies),
        )

    def _route_lease(
        self,
        peer: bytes,
        request: _wire.Lease,
        role: str,
        now: float,
        readings: Callable[[], Mapping[int, SlotReading]],
    ) -> list[Effect]:
        """A lease for one function: a worker here if this node can run it, else the
        request goes to members that may (a member's own request is never forwarded).

        A lease of the current version that carries a registry clock this registry does
        not dominate (its views written) is held as a read is (rule 8), and decided once
        the changes are here, or at its deadline."""
        seen = request.clock
        if seen is not None and not request.version:
            pending = self._write is not None and self._write.views_pending
            if pending or not self.registry.clock.dominates(seen):
                return self._hold(peer, request, seen, role, readings)
        return self._decide_route(peer, request, role, now, readings)

    def _decide_route(
        self,
        peer: bytes,
        request: _wire.Lease,
        role: str,
        now: float,
        readings: Callable[[], Mapping[int, SlotReading]],
        lacking: str = "",
    ) -> list[Effect]:
        """Lease a worker here, refuse (a member's request), or forward; ``lacking``:
        the changes of the lease's clock this node answers without (rule 8)."""
        kind, problem, content_id, learned = self._problem_here(request)
        if not kind:
            self.pool.observe(now, readings())
            # A member's client holds no connection here: its lease ends by idle expiry.
            holder = None if peer in self._peer_clients else peer
            effects = self._pool_effects(self.pool.lease((peer, request.id), now, holder=holder))
            if lacking:
                effects.insert(0, Log(f"a route lease of {request.name} granted: {lacking}"))
            return effects
        if lacking and kind in ("not_found", "version_not_found"):
            problem = f"{problem} ({lacking})"
        failure = _wire.Failure(request.id, kind, problem)
        if peer in self._peer_clients:
            return [*learned, self._send(peer, failure)]
        version = f"v{request.version}" if request.version else "(current version)"
        forward = Forward(
            peer,
            request.id,
            _wire.encoder.encode(self._with_our_clock(request)),
            role,
            f"{request.name} {version}",
            content_id,
            _wire.encoder.encode(failure),
            candidates=[],
        )
        return [*learned, *self._start_forward(forward, kind, problem, request.avoid, now)]

    def _with_our_clock(self, request: _wire.Lease) -> _wire.Lease:
        """The lease as it goes to members: of the current version, with this registry's
        clock (merged with the client's), so the member that serves it runs the version
        this node would (rule 8); a pinned version is the same everywhere."""
        if request.version:
            return request
        clock = self.registry.clock
        if request.clock is not None:
            clock = clock.merge(request.clock)
        if not clock.entries:
            return request
        return msgspec.structs.replace(request, clock=clock)

    def _problem_here(
        self, request: _wire.Lease
    ) -> tuple[_wire.FailureKind | None, str, str, list[Effect]]:
        """(failure kind, why, content id, effects) of running ``request``'s function
        here; kind "" when this node can."""
        try:
            _number, record = self.registry.resolve(request.name, request.version or None)
        except FunctionNotFound as exc:
            return "not_found", str(exc), "", []
        except VersionNotFound as exc:
            return "version_not_found", str(exc), "", []
        content_id: str = record.content_id
        reason = self.cannot_load.mine.get(content_id, "")
        learned: list[Effect] = []
        if not reason:
            reason = python_problem(record.python, self.facts.python)
            if reason:
                learned = self._learn_cannot_load(content_id, reason)
        if not reason and self.facts.node_id in request.avoid:
            reason = "its worker could not load it"  # its own report is on its way
        return ("load" if reason else None), reason, content_id, learned

    def _relay(
        self,
        peer: bytes,
        request: _wire.Relay,
        role: str,
        now: float,
        readings: Callable[[], Mapping[int, SlotReading]],
    ) -> list[Effect]:
        """A client's call, to run on a worker of ``request.node`` that it cannot reach
        itself: lease one (a stand-in identity waits for it, see ``_to_relays``), then
        the driver sends the frame unchanged (``RelayCall``). A call id relayed before
        is refused (``duplicate``), before anything is leased."""
        try:
            call = _wire.call_decoder.decode(request.call)
        except _wire.DECODE_ERRORS as exc:
            return [self._send(peer, _wire.Failure(request.id, "protocol", f"malformed call: {exc}"))]
        if call.name != request.name:
            message = f"a relayed call of {call.name!r} under the route of {request.name!r}"
            return [self._send(peer, _wire.Failure(request.id, "protocol", message))]
        if call.caller and not self.relayed_ids.admit(
            call.caller, call.id, now + request.wait + REMEMBER_RELAYED_FOR, now
        ):
            refused = _wire.Failure(
                call.id,
                "duplicate",
                f"{call.name}: call {call.id} of this caller was relayed before; it is not "
                "run again (the first one may have run)",
            )
            return [self._send(peer, _wire.Relayed(request.id, _wire.encoder.encode(refused)))]
        stand_in = b"\x00relay " + str(next(self._relay_tickets)).encode()
        self._relaying[stand_in] = Relaying(
            peer, request.id, role, request.call, call.id, request.wait
        )
        lease = _wire.Lease(request.id, request.name, request.version, request.content_id)
        if request.node in ("", self.facts.node_id):
            kind, problem, _cid, learned = self._problem_here(lease)
            if kind:
                return [*learned, self._send(stand_in, _wire.Failure(request.id, kind, problem))]
            self.pool.observe(now, readings())
            return self._pool_effects(self.pool.lease((stand_in, request.id), now, holder=None))
        member = next((m for m in self.membership.live_others() if m.node == request.node), None)
        if member is None:
            message = (
                f"{request.name}: member {request.node} is not alive as far as this node "
                "knows; the call was not relayed (it did not run)"
            )
            return [self._send(stand_in, _wire.Failure(request.id, "internal", message))]
        version = f"v{request.version}" if request.version else "(current version)"
        forward = Forward(
            stand_in,
            request.id,
            _wire.encoder.encode(self._with_our_clock(lease)),
            role,
            f"{request.name} {version}",
            request.content_id,
            _wire.encoder.encode(
                _wire.Failure(request.id, "internal", f"{request.node} gave no worker")
            ),
            candidates=[(member.node, member.address)],
        )
        return self._forward_next(forward, now)

    def _to_relays(self, effects: list[Effect]) -> list[Effect]:
        """A worker leased for a relayed call becomes a ``RelayCall``; any other answer
        (it cannot be run there) goes to the client as it is: it did not run."""
        out: list[Effect] = []
        for effect in effects:
            if isinstance(effect, Send) and effect.peer in self._relaying:
                waiting = self._relaying.pop(effect.peer)
                try:
                    reply = _wire.control_reply_decoder.decode(effect.payload)
                except _wire.DECODE_ERRORS:
                    reply = None
                if isinstance(reply, _wire.Leased):
                    # TCP with the client's role's keys even to a worker of this node:
                    # a call-only client's call stays call-only there (no pickles).
                    effect = RelayCall(
                        waiting.peer,
                        waiting.request_id,
                        reply.endpoint,
                        reply.node in ("", self.facts.node_id),
                        waiting.role,
                        waiting.call,
                        waiting.call_id,
                        waiting.wait,
                    )
                else:
                    effect = Send(waiting.peer, effect.payload)
            out.append(effect)
        return out

    def _forwards_describe(self, peer: bytes, request: Any, exc: ScatterError) -> bool:
        """Whether a Describe that failed here goes to members: a pinned version this
        node lacks (one that has not arrived yet, or that only members hold)."""
        return (
            isinstance(request, _wire.Describe)
            and bool(request.version)
            and isinstance(exc, FunctionNotFound | VersionNotFound)
            and peer not in self._peer_clients
        )

    def _forward_describe(
        self, peer: bytes, request: _wire.Describe, failure: _wire.Failure
    ) -> list[Effect]:
        forward = Forward(
            peer,
            request.id,
            _wire.encoder.encode(request),
            "call",  # a describe needs no more
            f"{request.name} v{request.version}",
            "",
            _wire.encoder.encode(failure),
            candidates=[],
        )
        return self._start_forward(forward, failure.kind, failure.message, [], self._now)

    def _start_forward(
        self, forward: Forward, kind: str, problem: str, avoid: Iterable[str], now: float
    ) -> list[Effect]:
        me = self.facts.node_id
        forward.reasons[me] = problem if kind == "load" else "lacks it"
        forward.load_failures += kind == "load"
        avoided = set(avoid)
        members = self.membership.live_others()
        self._rng.shuffle(members)
        for member in members:
            known = self.cannot_load.reason(member.node, forward.content_id)
            if known:
                forward.reasons[member.node] = known
                forward.load_failures += 1
            elif member.node in avoided:
                forward.reasons[member.node] = ""  # refused: its reason is on its way
                forward.load_failures += 1
            else:
                forward.candidates.append((member.node, member.address))
        forward.deadline = now + REASON_WAIT  # for the reasons still to come, if any
        return self._forward_next(forward, now)

    def _forward_next(self, forward: Forward, now: float) -> list[Effect]:
        """Ask the next member, or answer: nobody can."""
        if forward.candidates:
            node, address = forward.candidates.pop(0)
            ticket = next(self._forward_tickets)
            forward.asked = (node, address)
            forward.deadline = now + FORWARD_TIMEOUT
            self._forwards[ticket] = forward
            request = _wire.PeerRequest(
                self.facts.node_id, self.facts.address, ticket, forward.role, forward.payload
            )
            return [SendPeer(address, _wire.encoder.encode(request))]
        self._fill_reasons(forward)
        if "" in forward.reasons.values() and now < forward.deadline:
            self._parked.append(forward)
            return []
        return [Send(forward.peer, self._nobody_can(forward))]

    def _fill_reasons(self, forward: Forward) -> None:
        for node, reason in forward.reasons.items():
            if not reason:
                forward.reasons[node] = self.cannot_load.reason(node, forward.content_id)

    def _nobody_can(self, forward: Forward) -> bytes:
        if not forward.load_failures:
            return forward.own_failure  # every member lacks it: this node's own answer
        reasons = {
            node: reason or "its worker could not load it (no reason reported)"
            for node, reason in forward.reasons.items()
        }
        message = nobody_can_run(forward.what, reasons)
        return _wire.encoder.encode(_wire.Failure(forward.request_id, "load", message))

    def _on_peer_reply(self, message: _wire.PeerReply, now: float) -> list[Effect]:
        forward = self._forwards.get(message.ticket)
        if forward is None or forward.asked[0] != message.source:
            return []  # late (given up on) or not from the member asked
        del self._forwards[message.ticket]
        try:
            reply = _wire.control_reply_decoder.decode(message.payload)
        except _wire.DECODE_ERRORS:
            reply = None
        if reply is None or reply.id != forward.request_id:
            forward.reasons[message.source] = "answered with a malformed reply"
            return self._forward_next(forward, now)
        if isinstance(reply, _wire.Failure) and reply.kind in RETRY_KINDS:
            if reply.kind == "load":
                forward.load_failures += 1
                forward.reasons[message.source] = reply.message
                if forward.content_id:
                    self.cannot_load.heard(message.source, {forward.content_id: reply.message})
            else:
                forward.reasons[message.source] = "lacks it"
                if reply.kind == "version_not_found":  # the function is known there
                    forward.own_failure = message.payload
            return self._forward_next(forward, now)
        return [Send(forward.peer, message.payload)]  # as the member encoded it

    def _on_peer_request(
        self,
        message: _wire.PeerRequest,
        now: float,
        wall: float,
        readings: Callable[[], Mapping[int, SlotReading]],
    ) -> list[Effect]:
        """Serve a member's client's Describe or route Lease; the answer goes back as a
        ``PeerReply`` (``_to_peers``). Served here or refused: never forwarded again."""
        stand_in = b"\x00peer " + message.source.encode() + b" " + str(message.ticket).encode()
        self._peer_clients[stand_in] = (message.address, message.ticket)
        while len(self._peer_clients) > _MAX_PEER_CLIENTS:
            del self._peer_clients[next(iter(self._peer_clients))]
        try:
            request = _wire.control_request_decoder.decode(message.payload)
        except _wire.DECODE_ERRORS as exc:
            return [self._send(stand_in, _wire.Failure(0, "protocol", f"malformed: {exc}"))]
        if not (
            (isinstance(request, _wire.Lease) and request.name)
            or isinstance(request, _wire.Describe)
        ) or _refusal(request, message.role):
            what = type(request).__name__.lower()
            refused = _wire.Failure(
                getattr(request, "id", 0), "forbidden", f"{what} is not forwarded"
            )
            return [self._send(stand_in, refused)]
        if self._stopping:
            return [self._send(stand_in, _stopping_failure(request.id))]
        self._now = now
        if isinstance(request, _wire.Lease):
            return self._route_lease(stand_in, request, message.role, now, readings)
        if self._write is not None and self._write.views_pending:
            self._waiting.append((stand_in, request, wall))
            return []
        return self._serve(stand_in, request, wall)

    def _to_peers(self, effects: list[Effect]) -> list[Effect]:
        """Replies to a member's client (a stand-in identity) go to that member."""
        out: list[Effect] = []
        for effect in effects:
            if isinstance(effect, Send) and effect.peer in self._peer_clients:
                address, ticket = self._peer_clients.pop(effect.peer)
                reply = _wire.PeerReply(self.facts.node_id, ticket, effect.payload)
                effect = SendPeer(address, _wire.encoder.encode(reply))
            out.append(effect)
        return out

    def _answer_parked(self, now: float) -> list[Effect]:
        """Routes nobody can serve, answered once every refusing member's reason is
        known, or at their deadline."""
        effects: list[Effect] = []
        parked, self._parked = self._parked, []
        for forward in parked:
            self._fill_reasons(forward)
            if "" in forward.reasons.values() and now < forward.deadline:
                self._parked.append(forward)
            else:
                effects.append(Send(forward.peer, self._nobody_can(forward)))
        return effects

    def _forwards_due(self, now: float) -> list[Effect]:
        """Members that did not answer in time, or were declared dead meanwhile (a
        member killed after the forward left never answers: its client must not wait
        FORWARD_TIMEOUT, past its call's timeout, for it): the next one is asked."""
        effects = self._answer_parked(now)
        if not self._forwards:
            return effects
        live = {member.node for member in self.membership.live_others()}
        for ticket, forward in list(self._forwards.items()):
            node = forward.asked[0]
            if now >= forward.deadline:
                reason = f"did not answer within {FORWARD_TIMEOUT:g} s"
            elif node not in live:
                reason = "was declared dead before it answered"
            else:
                continue
            del self._forwards[ticket]
            forward.reasons[node] = reason
            effects += self._forward_next(forward, now)
        return effects

    # -- internals --------------------------------------------------------------

    def _current_or_zero(self, name: str) -> int:
        try:
            return self.registry.current_version(name)
        except (FunctionNotFound, VersionNotFound):
            return 0

    def _derive(
        self, names: Iterable[str], *, stored: Collection[str] = ()
    ) -> tuple[dict[str, FunctionView | None], frozenset[str]]:
        """The views ``names`` have now, and the bodies no live version uses any more.

        A version that became live without its body among ``stored`` (the bodies the
        write stored) has none here: it goes to ``missing_bodies``, to be asked for.
        """
        views: dict[str, FunctionView | None] = {}
        delta: Counter[str] = Counter()
        named: dict[str, str] = {}  # {content id: a name whose new view uses it}
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
                for content_id in new.content_ids.values():
                    named.setdefault(content_id, name)
        dropped = set()
        for content_id, change in delta.items():
            before = self._refs[content_id]
            self._refs[content_id] += change
            if self._refs[content_id] <= 0:
                del self._refs[content_id]
                dropped.add(content_id)
                self.missing_bodies.pop(content_id, None)
            elif before <= 0 and content_id not in stored:
                record = self.registry.resolve_content(named[content_id], content_id)[1]
                self.missing_bodies[content_id] = record
        for name, view in views.items():
            if view is None:
                self._views.pop(name, None)
            else:
                self._views[name] = view
        return views, frozenset(dropped)

    def _finish(self, write: _Write) -> list[Effect]:
        self._write = None
        effects: list[Effect] = [BumpGeneration()]
        if self.config.registry_gossip:  # off only as a test hook (NodeConfig)
            for change in write.changes:
                self._news.put(change.change_id, change)
            if write.local:  # ours: every live member hears of it at once (rule 6)
                effects += [
                    PushChanges(address, write.changes) for address in self._peers(1 << 30)
                ]
        if write.reply is not None:
            try:
                effects.append(self._send(write.peer, write.reply()))
            except Exception as exc:
                effects += self._internal(write.peer, write.request_id, exc)
        if self._held:  # the change that completes a held read's clock (rule 8)?
            effects += self._release_held()
            effects += self._pull()  # a partial answer: ask for the rest at once
        return effects + self._next()

    def _next(self) -> list[Effect]:
        """Serve what waited behind a write: first every read that no client's change
        waits before (a member's batches are no reason to keep a status or a describe
        waiting: the chaos rig saw a restarted node answer its first status after 6 s
        of catching up), then the rest, up to the next write."""
        effects: list[Effect] = []
        if self._write is not None or not self._waiting:
            return effects
        behind: deque[tuple[bytes, Any, float]] = deque()
        after_a_client_change = False  # whose client may read it next: keep the order
        for item in self._waiting:
            request = item[1]
            if after_a_client_change or isinstance(request, (*_MUTATIONS, *_PEER_WRITES)):
                behind.append(item)
                after_a_client_change = after_a_client_change or isinstance(request, _MUTATIONS)
            else:
                effects += self._serve(*item)  # a read: it starts no write
        self._waiting = behind
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
                leased = _wire.Leased(
                    request_id,
                    effect.lease,
                    endpoints[0],
                    local,
                    effect.slot,
                    self.facts.node_id,
                    # This node's monotonic clock (that of its workers): the client
                    # turns its calls' start_by into it (at most once).
                    self._now,
                )
                out.append(self._send(peer, leased))
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


_DEPLOY_ONLY = (*_MUTATIONS, _wire.Shutdown, _wire.Leave)


def _refusal(request: Any, role: str) -> str:
    """Why ``role`` may not make ``request`` ("" if it may)."""
    if isinstance(request, _PEER_MESSAGES):
        return "" if role == "peer" else "node-to-node messages need the peer key"
    if role == "deploy" or (role == "call" and not isinstance(request, _DEPLOY_ONLY)):
        return ""
    what = type(request).__name__.lower()
    if role == "call":
        return (
            f"this client holds a call-only secret: it may call, describe and list; {what} "
            "needs the cluster secret"
        )
    if role == "peer":
        return f"{what} refused: a peer key is for node-to-node messages only"
    return f"{what} refused: the client is not authenticated (check SCATTER_SECRET)"


def _rank(snapshot: Snapshot) -> tuple[tuple[int, str, str], int, tuple[tuple[str, int], ...]]:
    """The order between two snapshots neither of which contains the other: the one
    that ends later in the one order wins. So whatever the loser folded and the winner
    lacks sorts before the winner's end: void, re-issued by the nodes that drop it
    (Registry.adopt). It must be total: two sides of a partition can fold different
    changes under one same last change (each folded a concurrent change of its own that
    sorts before it); ranked equal, neither side would ever adopt the other's snapshot
    and they would send each other transfers forever. The clock breaks that tie (two
    snapshots with one clock fold the same changes: they are the same state)."""
    return (
        snapshot.last or (0, "", ""),
        snapshot.changes,
        tuple(sorted(snapshot.clock.entries.items())),
    )


def _stopping_failure(request_id: int) -> _wire.Failure:
    return _wire.Failure(
        request_id, "internal", "the node is stopping; nothing was done, try another node"
    )


def _content_id(record: VersionRecord, body: bytes) -> str:
    return content_id_of(
        body,
        signature=record.signature,
        signature_text=record.signature_text,
        source=record.source,
        doc=record.doc,
        timeout=record.timeout,
        signature_spec=record.signature_spec,
    )


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
