################################################################
# The function registry
################################################################
#
# Rule 1: everything that decides what a name resolves to lives in this file:
# version numbers, the current pointer, sets, tombstones and the conflict rule
# below. The node stores, gossips and executes; it never decides.
#
# Rule 2: no I/O and no clock reads. Callers pass `now`; the registry hands back
# `Change` values for the node to persist and gossip, and applies the `Change`
# values the node received. Property tests drive it with random histories, the
# node with sockets, the simulator with virtual time: one implementation.
#
# Rule 3: the state is a function of the SET of changes held, and of nothing
# else: not of the order they arrived in, not of which node we are. Local changes
# go through the same apply path as remote ones (as h11 refuses to cheat for its
# own side), so what a node decided for itself is what every other node computes.
#
# Rule 4: causal delivery. A change applies only once its causal past has: every
# change its clock counts. One that arrives early (the push of its predecessor
# was lost) is held, gossiped on, and applied when the gap fills. So a node never
# shows an effect without its cause (a rollback without the version it targets),
# and numbers move only because of true concurrency, never because of a gap.
# A change whose clock would sort it before part of its own causal past (no honest
# node makes one: its clock dominates everything it counts) never applies: every node
# holds it pending, so it cannot make the order, and so the state, depend on arrival.
#
# Rule 5: a name is a function or a function set, never both, and numbers under a
# name are never reused: the high-water mark outlives vaporize (the tombstone).
#
# Rule 6: a NEW name follows NAME_RULE, checked by `check_name` and nowhere else: the
# publisher and FunctionSet call it before sending, the registry when it prepares a
# publish. Changes already made (on disk, from peers of other releases) are never
# re-judged by it: refusing one that another node applied would split the cluster
# (rule 3), so applying only needs a non-empty name within the wire's MAX_NAME_CHARS.
#
# THE ONE CONFLICT RULE
# =====================
#
# Every change applies in one total order, the same on every node: sorted by
#
#     (clock.total(), origin, change_id)
#
# This order extends causal order (a change sorts after everything its origin had
# seen, see VectorClock.total), so it only has a say between CONCURRENT changes,
# and there it says: the change that sorts later applies later, on top of the
# effects of the earlier one, exactly as if its origin had seen the earlier one.
# Each op is read against the state at the moment it applies. Everything else in
# this file follows from that; none of these is a special case:
#
# - Numbers. A publish takes the next free number under its name when it applies:
#   the highest number ever given under that name + 1 (1 for a new name). Two
#   concurrent publishes that both proposed N: the one earlier in this order
#   keeps N, the other gets the next free number. The op carries the number its origin proposed, so
#   versions() shows `conflict=True, proposed_version=N` on the moved one.
# - Current pointer. Publish, rollback and set changes move it; the later change wins.
# - Rollback targets a version's IDENTITY (the change that created it), never a
#   number, since numbers may move in a merge. If that version is gone when the
#   rollback applies (vaporized by a change sorting earlier), the rollback does nothing.
# - Vaporize versus publish. Vaporize sorting later: the function is gone, the
#   concurrently published version included. Publish sorting later: the function
#   comes back with that one version, numbered after the high-water mark.
# - Kind clash. A function and a set published concurrently under one name: the
#   later change takes the name as if it began with vaporize(name).
# - Set membership. A function belongs to one set or to none; the publish that
#   sorts last decides (a set publish adopts it, a plain publish makes it stand
#   alone). A set rollback moves only the functions the set still owns.
#
# No record is lost: a published version leaves versions() only through a
# vaporize (explicit, of its set, or by a kind clash) that applies after it.
#
# Sets
# ----
# A set has its own numbered versions. Set version N maps each member function
# to one version identity of that member. Publishing or rolling back a set applies
# that whole map in one change: every member moves to its version, and functions
# the set owns that the map does not list are RETIRED (no current version: their
# name no longer resolves, their history and pinned versions stay) until a set
# rollback brings them back. So no node serves a mix of two set versions. Vaporize
# of a set tombstones the set and every function it owns, in the same change.
#
# Locally, publish/rollback/vaporize of a function that belongs to a set, outside
# of its set, is refused (it would break the set's atomicity). A change that does
# it anyway can only have been made concurrently, without knowledge of the set; it
# applies like any other change, by the rule above.
#
# Implementation
# --------------
# The log of changes is kept sorted. A change that sorts after everything applied
# (the common case: every local change, and every remote change that does not
# sort before one applied already) applies incrementally, in O(size of the
# change). Otherwise the state is rebuilt by replaying the sorted log from
# scratch: simple, and obviously the same answer every node computes. Changes
# are rare (people publish them), so a replay is cheap; if it ever shows up in a
# profile, keep a snapshot every K changes and replay from the one before the
# insertion point. `statistics().rebuilds` counts the replays.
#
# Because of causal delivery the applied changes are causally closed: for each
# origin they are its changes 1..n, and `Registry.clock`, their merged clock, is
# exactly that n per origin. It is what anti-entropy sends: `changes_since()`
# then never skips a change this registry lacks. A new local change increments
# it, so it sorts after everything applied and never needs a replay.
#
# Bounded history. The log need not start at the beginning: `compact()` folds a
# prefix of the apply order into a `Snapshot` (the state that prefix leaves, and the
# clock counting exactly those changes), and a replay starts from the snapshot. This is
# the same registry only while no change still to come sorts before the snapshot's end;
# the node core folds only what every member has seen to make sure of it (rule 9 of
# _node.py). A change that would sort there anyway is VOID: refused, with everything that
# counts it, the same way wherever it arrives; its node re-issues it on top after a full
# state transfer (`adopt()`). Tombstones stay as high-water marks (rule 5).
#
# A node id must never be reused with an empty log: the node's own changes are
# numbered from its entry in the clock, and a change id seen twice is ignored.
# (The node persists its identity next to its log, and loses both or neither.)

"""The function registry: versions, current pointers, sets, tombstones, one conflict rule.

The rules are written at the top of this module; read them before changing anything here.
"""

from __future__ import annotations

import bisect
import hashlib
import keyword
import unicodedata
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Annotated, Any, Literal, TypeAlias

import msgspec

from .._exceptions import ConfigError, FunctionNotFound, ProtocolError, VersionNotFound
from .._limits import (
    MAX_BATCH_CHANGES,
    MAX_CHANGE_OPS,
    MAX_NAME_CHARS,
    MAX_SET_MEMBERS,
    Ident,
    Name,
    Text,
)
from ._vclock import VectorClock

__all__ = [
    "MAX_FUNCTION_NAME_CHARS",
    "NAME_RULE",
    "Change",
    "ForgetOp",
    "FunctionInfo",
    "FunctionView",
    "Op",
    "PublishOp",
    "PublishSetOp",
    "Registry",
    "RegistryStatistics",
    "RollbackOp",
    "Snapshot",
    "VaporizeOp",
    "VersionInfo",
    "VersionRecord",
    "check_name",
    "content_id_of",
    "node_of_writer",
    "order_key",
    "resolve_view",
]


# ---------------------------------------------------------------------------
# Persisted and gossiped values. Fields are append-only, new fields need defaults:
# these are stored on disk and sent between nodes of different releases. Strings and
# collections carry the wire's limits (_wire.py), so decoding a peer's change refuses one
# no honest node makes; a local change always fits them (its requests were decoded so).
# ---------------------------------------------------------------------------


class VersionRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One version of one function, without its body; never changes afterwards.

    The body lives in the node's content-addressed store under ``content_id``: changes
    carry this record, never the body, so a change costs the same whatever the body's
    size and a body published twice is stored once.
    """

    content_id: Ident  # content_id_of(body, ...): computed and checked by the node, never moves
    name: Name
    signature_text: Text  # "(a: int, b: int) -> int"
    signature_id: Ident  # hash of the signature alone: equal ids, compatible callers
    source: str | None = None
    doc: str | None = None
    origin: Ident  # node id of the node that built the record
    python: Ident  # "3.11.7": where the body was pickled
    created_at: float  # unix seconds
    timeout: float | None = None  # per-function call timeout, seconds; None: the node's default
    signature: bytes = b""  # cloudpickle of the inspect.Signature, for workers only
    # The publisher's hash of the code with per-process pickling noise removed: the same
    # code scattered again is a no-op even though its pickle differs byte for byte. Used
    # for that and nothing else, so a publisher lying about it can only turn its own
    # publish into a no-op; what runs is always found by content_id, which the node
    # computes. "" for records made before it existed: content_id stands in.
    code_id: Ident = ""
    # The signature as a msgspec type description, served to callers (who never unpickle
    # ``signature``). b"" for records made before it existed: callers ask to re-scatter.
    signature_spec: bytes = b""

    @property
    def same_code_key(self) -> str:
        return self.code_id or self.content_id


def content_id_of(
    body: bytes,
    *,
    signature: bytes,
    signature_text: str,
    source: str | None,
    doc: str | None,
    timeout: float | None,
    signature_spec: bytes = b"",
) -> str:
    """The content id of a body and everything a worker loads with it.

    Computed by the node that receives a publish, and checked again by every node that
    receives the body, so no publisher can put another body under a known id.
    """
    fields: tuple[Any, ...] = (body, signature, signature_text, source, doc, timeout)
    if signature_spec:  # ids of records made before it existed stay what they were
        fields += (signature_spec,)
    digest = hashlib.sha256(_content_encoder.encode(fields))
    return digest.hexdigest()[:32]


_content_encoder = msgspec.msgpack.Encoder()


# ONLY APPEND new op kinds, and only with new tags.


class PublishOp(msgspec.Struct, frozen=True, kw_only=True, tag="publish"):
    """Add ``record`` as a new version of ``record.name`` and make it current."""

    record: VersionRecord
    proposed_version: int  # the number the origin gave it; see "Numbers" above
    set_name: Name | None = None  # published as a member of this set (same change)


class PublishSetOp(msgspec.Struct, frozen=True, kw_only=True, tag="publish_set"):
    """Add a new version of set ``name`` and move every member to it."""

    name: Name
    proposed_version: int
    # {member function name: change_id of the member version}; the complete membership
    members: Annotated[dict[Name, Ident], msgspec.Meta(max_length=MAX_SET_MEMBERS)]


class RollbackOp(msgspec.Struct, frozen=True, kw_only=True, tag="rollback"):
    """Make the version created by change ``target`` current again (function or set)."""

    name: Name
    target: Ident  # change_id that created the version: the identity that never moves
    target_version: int  # the number the origin knew it by, for logs and humans only


class VaporizeOp(msgspec.Struct, frozen=True, kw_only=True, tag="vaporize"):
    """Tombstone ``name``: a function, or a set together with every function it owns."""

    name: Name


class ForgetOp(msgspec.Struct, frozen=True, kw_only=True, tag="forget"):
    """Forget ``members`` for good (bounded history): nodes that never come back.

    Their messages are refused from then on (a node forgotten rejoins only with a new
    data directory: a new node id), and once a node has folded this change into its
    snapshot it stops keeping, for them, the changes they never saw (``unconfirmed``).
    Alone in its change. See rule 10 of ``_node.py``.
    """

    members: Annotated[tuple[Ident, ...], msgspec.Meta(min_length=1, max_length=MAX_CHANGE_OPS)]


Op: TypeAlias = PublishOp | PublishSetOp | RollbackOp | VaporizeOp | ForgetOp


class Change(msgspec.Struct, frozen=True, kw_only=True):
    """One registry change: the unit that is gossiped, persisted and applied atomically.

    A change may touch several names (a set and its members); each name at most once.
    """

    change_id: Ident  # f"{origin}:{clock[origin]}", unique in the cluster
    origin: Ident  # node id of the node that made the change
    clock: VectorClock  # the origin's clock after counting this change
    at: float  # unix seconds at the origin, for humans; never used for ordering
    ops: Annotated[tuple[Op, ...], msgspec.Meta(max_length=MAX_CHANGE_OPS)]
    # A re-issue (bounded history): the id of the void change whose ops these are. Several
    # nodes may re-issue one change; only the first re-issue in the one order applies.
    reissue_of: Ident = ""


# A batch of changes from a peer (gossip, anti-entropy), decoded with every limit above.
ChangeBatch: TypeAlias = Annotated[list[Change], msgspec.Meta(max_length=MAX_BATCH_CHANGES)]
change_decoder = msgspec.msgpack.Decoder(Change)
change_batch_decoder = msgspec.msgpack.Decoder(ChangeBatch)


# ---------------------------------------------------------------------------
# The snapshot: the state a prefix of the apply order leaves (bounded history).
# Persisted with the replica and sent whole in a state transfer, so append-only too.
# ---------------------------------------------------------------------------


class SnapshotVersion(msgspec.Struct, frozen=True, array_like=True):
    """A live function version as the snapshot holds it (``_Version``)."""

    number: int
    record: VersionRecord
    change_id: Ident
    proposed: int
    set_name: Name | None
    at: float


class SnapshotFunction(msgspec.Struct, frozen=True, array_like=True):
    name: Name
    versions: tuple[SnapshotVersion, ...]
    current: int | None
    last: int
    owner: Name | None


class SnapshotSetVersion(msgspec.Struct, frozen=True, array_like=True):
    number: int
    change_id: Ident
    proposed: int
    origin: Ident
    at: float
    members: dict[Name, Ident]


class SnapshotSet(msgspec.Struct, frozen=True, array_like=True):
    name: Name
    versions: tuple[SnapshotSetVersion, ...]
    current: int
    owned: tuple[Name, ...]


class Snapshot(msgspec.Struct, frozen=True, kw_only=True):
    """The registry's state after the changes ``clock`` counts, and nothing else.

    Those changes are a prefix of THE ONE ORDER (``last`` is the order key of the
    newest): replaying the remaining log on top of it answers every lookup exactly as
    replaying the whole log does (``tests/core/test_registry.py`` proves it with
    hypothesis). Tombstones are the high-water marks of names no longer live: one
    integer per name, never collected (a number never names two bodies, rule 5).
    """

    clock: VectorClock = msgspec.field(default_factory=VectorClock)
    last: tuple[int, str, str] | None = None  # order key of the newest change folded in
    changes: int = 0  # how many changes were folded in, for statistics
    functions: tuple[SnapshotFunction, ...] = ()
    sets: tuple[SnapshotSet, ...] = ()
    high_water: dict[Name, int] = {}
    # This node's own changes folded while a member it knows had not seen them (it was
    # away past the grace, or we were): kept, so that if a state transfer ever replaces
    # this snapshot with one that lacks them, they are re-issued (Registry.adopt), never
    # lost. Dropped once every member known has them. Never sent in a transfer.
    unconfirmed: tuple[Change, ...] = ()
    reissued: tuple[Ident, ...] = ()  # ids re-issued by a change folded in (one applies)
    # Members forgotten by a change folded in (ForgetOp), sorted: nothing is kept for them
    # in ``unconfirmed`` any more (rule 10 of _node.py).
    forgotten: tuple[Ident, ...] = ()


snapshot_decoder = msgspec.msgpack.Decoder(Snapshot)


def order_key(change: Change) -> tuple[int, str, str]:
    """The sort key of THE ONE CONFLICT RULE: a total order that extends causal order."""
    return (change.clock.total(), change.origin, change.change_id)


# ---------------------------------------------------------------------------
# Read-only answers. No bodies: these go to clients and worker processes.
# ---------------------------------------------------------------------------


class VersionInfo(msgspec.Struct, frozen=True, kw_only=True):
    """One entry of ``versions(name)``: who made which version, and whether it moved."""

    name: str
    version: int
    kind: Literal["function", "set"] = "function"
    current: bool
    change_id: str  # the version's identity: the change that created it
    origin: str
    created_at: float
    proposed_version: int  # the number its origin gave it
    conflict: bool  # True when a concurrent change kept proposed_version (see the rule)
    set_name: str | None = None  # function versions: published as a member of this set
    content_id: str = ""
    signature_text: str = ""
    signature_id: str = ""
    python: str = ""
    doc: str | None = None
    timeout: float | None = None
    # set versions: {member name: member version number}; members whose version was
    # vaporized since are left out
    members: dict[str, int] = {}


class FunctionInfo(msgspec.Struct, frozen=True, kw_only=True):
    """One entry of ``functions()``: a live function or set and its current version."""

    name: str
    kind: Literal["function", "set"] = "function"
    version: int
    origin: str
    created_at: float
    set_name: str | None = None  # functions: the set that owns it
    content_id: str = ""
    signature_text: str = ""
    signature_id: str = ""
    doc: str | None = None
    members: dict[str, int] = {}  # sets: {member name: member version number}


class FunctionView(msgspec.Struct, frozen=True, kw_only=True):
    """What a worker process needs to route a call by name, without any body.

    Also stands for a name that resolves to nothing (a set, a vaporized function): then
    ``content_ids`` is empty and ``unavailable`` says why, in the registry's words, so a
    worker answers exactly what the registry would (see :func:`resolve_view`).
    """

    name: str
    # None when the function was left out of its set's current version: unpinned
    # calls fail, pinned ones still run
    current: int | None
    content_ids: dict[int, str]  # {number: content_id} of every live version
    signature_ids: dict[int, str]  # {number: signature_id} of every live version
    set_name: str | None = None
    unavailable: str = ""  # why an unpinned call finds nothing (retired, vaporized, a set)
    timeouts: dict[int, float] = {}  # {number: the version's own call timeout}, set ones only


def resolve_view(name: str, view: FunctionView | None, version: int | None) -> tuple[int, str]:
    """``(number, content_id)`` that a call of ``name`` runs: THE rule, for workers too.

    ``Registry.resolve`` answers through this same function, so a worker holding the
    persisted view of a name can never resolve it differently from its node.

    Raises:
        FunctionNotFound: no such function, or no current version for an unpinned call.
        VersionNotFound: the function exists, the pinned ``version`` does not.
    """
    if view is None:
        raise FunctionNotFound(_never_published(name))
    if not version:
        if view.current is None:
            raise FunctionNotFound(view.unavailable or _never_published(name))
        return view.current, view.content_ids[view.current]
    content_id = view.content_ids.get(version)
    if content_id is None:
        if not view.content_ids:
            raise FunctionNotFound(view.unavailable or _never_published(name))
        raise VersionNotFound(
            f"function {name!r} has no version {version}; its versions are "
            f"{_numbers(view.content_ids)}: pin one of them, or check versions({name!r})"
        )
    return version, content_id


def _never_published(name: str) -> str:
    return f"no function named {name!r} on this node; scatter it first or check functions()"


class RegistryStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """Counts for ``statistics()``; cheap enough to poll."""

    functions: int  # functions with a current version (callable by name)
    sets: int  # live sets
    versions: int  # live function versions, retired functions included
    tombstones: int  # names vaporized and not published again
    changes: int  # changes applied
    pending: int  # changes held but waiting for their causal past (a gap in delivery)
    rebuilds: int  # times an out-of-order change forced a replay of the log
    compacted: int = 0  # changes folded into the snapshot (bounded history)
    void: int = 0  # changes refused: concurrent with the snapshot, sorting before its end


# ---------------------------------------------------------------------------
# Mutable state, private to the Registry.
# ---------------------------------------------------------------------------


class _Version:
    __slots__ = ("at", "change_id", "number", "proposed", "record", "set_name")

    def __init__(
        self,
        number: int,
        record: VersionRecord,
        change_id: str,
        proposed: int,
        set_name: str | None,
        at: float,
    ) -> None:
        self.number = number
        self.record = record
        self.change_id = change_id
        self.proposed = proposed
        self.set_name = set_name
        self.at = at


class _Function:
    __slots__ = ("by_change", "current", "last", "name", "owner", "versions")

    def __init__(self, name: str) -> None:
        self.name = name
        self.versions: dict[int, _Version] = {}  # {number: live version}
        self.by_change: dict[str, int] = {}  # {change_id: number}: identity -> number
        self.current: int | None = None  # None: retired from its set
        self.last = 0  # highest live number (numbers only grow while the function lives)
        self.owner: str | None = None  # the set that owns this function


class _SetVersion:
    __slots__ = ("at", "change_id", "members", "number", "origin", "proposed")

    def __init__(
        self,
        number: int,
        change_id: str,
        proposed: int,
        origin: str,
        at: float,
        members: dict[str, str],
    ) -> None:
        self.number = number
        self.change_id = change_id
        self.proposed = proposed
        self.origin = origin
        self.at = at
        self.members = members  # {member name: change_id of the member version}


class _Set:
    __slots__ = ("by_change", "current", "name", "owned", "versions")

    def __init__(self, name: str) -> None:
        self.name = name
        self.versions: dict[int, _SetVersion] = {}  # {number: set version}
        self.by_change: dict[str, int] = {}  # {change_id: number}
        self.current = 0  # a live set always has a current version
        self.owned: set[str] = set()  # function names whose owner is this set


_LookupKey: TypeAlias = tuple[object, ...] | None


class Registry:
    """One node's replica of the function registry.

    The node calls :meth:`prepare_publish`, :meth:`prepare_rollback` and
    :meth:`prepare_vaporize` for its own users, persists the :class:`Change` each
    returns, then calls :meth:`apply` with it, as it does for every change it hears of.
    Every replica that holds the same set of changes answers every lookup the same way.
    ``publish``/``rollback``/``vaporize`` prepare and apply in one step, for tests and
    simulators that persist nothing.

    Example::

        reg = Registry("n1")
        change = reg.prepare_publish([record], now=time.time())
        ...  # persist `change`, then:
        reg.apply(change)  # -> {"add"}; gossip `change`
        number, record = reg.resolve("add")
        other = Registry("n2")
        other.apply(change)  # -> {"add"}
    """

    def __init__(self, node_id: str) -> None:
        if not node_id:
            raise ConfigError("a registry needs a non-empty node id")
        self.node_id = node_id
        # The log, and what is known about it.
        self._changes: dict[str, Change] = {}  # {change_id: change}, every change held
        self._log: list[Change] = []  # sorted by order_key: the apply order
        self._keys: list[tuple[int, str, str]] = []  # order_key of each _log entry
        self._by_origin: dict[str, list[int]] = {}  # {origin: sorted counters held}
        self._pending: dict[str, Change] = {}  # {change_id: change waiting for its past}
        self._totals: dict[str, int] = {}  # {change_id: clock.total()}, every change held
        self._clock = VectorClock()  # merge of the applied changes' clocks
        # The state derived from the log.
        self._functions: dict[str, _Function] = {}  # {name: function}, retired ones included
        self._sets: dict[str, _Set] = {}  # {name: live set}
        self._high_water: dict[str, int] = {}  # {name: highest number ever}, kinds shared
        self._views: dict[str, FunctionView] = {}  # {name: view}, built on first view()
        self._touched: dict[str, _LookupKey] | None = None  # {name: key before this change}
        self._rebuilds = 0
        self._reissued: set[str] = set()  # ids of void changes re-issued (state, rule 9)
        self._forgotten: set[str] = set()  # members forgotten by a change applied (ForgetOp)
        # Bounded history: the state of the changes compacted away, and what was refused.
        self._base = Snapshot()
        self._void: dict[str, int] = {}  # {origin: lowest counter refused as void}
        self._purged: list[str] = []  # pending changes dropped with a void one, to delete

    @classmethod
    def from_changes(cls, node_id: str, changes: Iterable[Change]) -> Registry:
        """A registry holding ``changes``: how a node restarts from its persisted log.

        The order of ``changes`` does not matter, duplicates are ignored; the result is
        the state every node holding the same changes has.

        Raises:
            ProtocolError: a change is malformed (a corrupt log).
        """
        registry = cls(node_id)
        registry.apply_many(changes)
        return registry

    @classmethod
    def from_snapshot(
        cls,
        node_id: str,
        snapshot: Snapshot,
        changes: Iterable[Change] = (),
        *,
        void: Mapping[str, int] | None = None,
    ) -> Registry:
        """A registry holding the snapshot's changes and ``changes`` on top: how a node
        restarts from a compacted replica, or takes a full state transfer. ``void``:
        what it refused as void before (:attr:`void`, persisted with the replica); a
        stored change that counts one of those is refused too (:meth:`take_purged`).

        Raises:
            ProtocolError: a change is malformed (a corrupt log).
        """
        registry = cls(node_id)
        registry._base = snapshot
        registry._clock = snapshot.clock
        registry._load_base()
        registry._void = dict(void or {})
        changes = list(changes)
        registry.apply_many(changes)
        registry._purged += [c.change_id for c in changes if not registry.has_change(c.change_id)]
        registry._refuse_stale()
        return registry

    # -- clocks and the log ---------------------------------------------------

    @property
    def clock(self) -> VectorClock:
        """The merged clock of the applied changes: for each origin, how many are applied.

        Send it to peers for anti-entropy: ``peer.changes_since(my.clock)`` is then
        every change this registry lacks (plus any it holds but cannot apply yet).
        """
        return self._clock

    def changes_since(self, clock: VectorClock) -> list[Change]:
        """The changes held that ``clock`` does not cover, in apply order, for anti-entropy.

        A change is covered when ``clock`` counts at least as many changes of its
        origin. Changes waiting for their causal past are included: the peer may
        hold that past. Costs O(origins + answer), not O(log).
        """
        found: list[Change] = []
        for origin, counters in self._by_origin.items():
            start = bisect.bisect_right(counters, clock.get(origin))
            found.extend(self._changes[f"{origin}:{n}"] for n in counters[start:])
        found.sort(key=order_key)
        return found

    def has_change(self, change_id: str) -> bool:
        """Whether the change is held already, or folded into the snapshot (applying it
        again would do nothing)."""
        return change_id in self._changes or self._compacted(change_id)

    def _compacted(self, change_id: str) -> bool:
        origin, _, counter = change_id.rpartition(":")
        return counter.isdigit() and int(counter) <= self._base.clock.get(origin)

    # -- bounded history ------------------------------------------------------

    @property
    def snapshot(self) -> Snapshot:
        """The state of the changes compacted away (empty until :meth:`compact`)."""
        return self._base

    def log(self) -> list[Change]:
        """Every change held and not compacted (applied or pending), in apply order:
        with :attr:`snapshot`, the whole replica (what a restart and a transfer need)."""
        return sorted(self._changes.values(), key=order_key)

    def can_serve(self, clock: VectorClock) -> bool:
        """Whether a peer at ``clock`` can be sent what it lacks as changes: it holds
        every change compacted here. If not, it needs a full state transfer."""
        return clock.dominates(self._base.clock)

    @property
    def void(self) -> dict[str, int]:
        """What was refused as void: {writer: its lowest counter refused}, every later
        change of that writer counting it. Not derived from the changes held (void ones
        are never held): the node persists it with the replica, so that a restart keeps
        refusing them (a change counting one would otherwise wait forever for its past)
        and keeps giving a peer that holds one a full state transfer."""
        return dict(self._void)

    def holds_void(self, clock: VectorClock) -> bool:
        """Whether a peer at ``clock`` holds a change this registry refused as void."""
        return any(clock.get(origin) >= counter for origin, counter in self._void.items())

    def compact(self, stable: VectorClock) -> int:
        """Fold the longest prefix of the apply order that ``stable`` counts into the
        snapshot, and forget those changes; how many were folded.

        :meth:`prepare_compaction`, then :meth:`commit_compaction`. The caller (the node
        core) makes sure no change it could still receive sorts before the new
        snapshot's end: ``stable`` is what every member has seen, and this registry
        holds whatever any member said it holds (see ``_node.py``, rule 9). Lookups
        answer exactly as before: the snapshot is the state that prefix left.
        """
        snapshot = self.prepare_compaction(stable)
        if snapshot is None:
            return 0
        before = self._base.changes
        self.commit_compaction(snapshot)
        return snapshot.changes - before

    def prepare_compaction(
        self,
        stable: VectorClock,
        *,
        members: Mapping[str, VectorClock | None] | None = None,
    ) -> Snapshot | None:
        """The snapshot :meth:`compact` would make (None: nothing to fold); changes nothing.

        Args:
            members: {member: the registry clock it last reported (None: not known)} of
                every member ever known and not forgotten (the grace ignored), if given
                (the node core does): the changes folded that one of them has not seen
                are kept in the snapshot's ``unconfirmed``. A member that a change
                folded in this very snapshot forgets counts no more: never before its
                forget is folded (rule 10 of ``_node.py``). With nothing to fold, the
                snapshot as it is, without what they all confirmed since (None if none).
        """
        count = self.stable_count(stable)
        if count:
            prefix = self._log[:count]
            scratch = Registry(self.node_id)
            scratch._base = self._base
            scratch._load_base()
            clock = self._base.clock
            for change in prefix:
                scratch._apply_ops(change)
                clock = clock.merge(change.clock)
            snapshot = scratch._export(clock, order_key(prefix[-1]), self._base.changes + count)
        elif members is None or not self._base.unconfirmed:
            return None
        else:  # nothing to fold: only what members confirmed since to let go of
            prefix, snapshot = [], self._base
        if members is not None:
            confirmed = self.confirmed_by(members, snapshot.forgotten)
            unconfirmed = tuple(
                c
                for c in (*self._base.unconfirmed, *prefix)
                if confirmed is None or not confirmed.dominates(c.clock)
            )
            if not count and len(unconfirmed) == len(self._base.unconfirmed):
                return None
            snapshot = msgspec.structs.replace(snapshot, unconfirmed=unconfirmed)
        return snapshot

    def confirmed_by(
        self, members: Mapping[str, VectorClock | None], forgotten: Collection[str] = ()
    ) -> VectorClock | None:
        """What this registry and every one of ``members`` (their last clocks; those in
        ``forgotten`` left out) have all seen; None while one of those clocks is unknown."""
        low = self._clock
        for member, clock in members.items():
            if member in forgotten:
                continue
            if clock is None:
                return None
            low = low.meet(clock)
        return low

    @property
    def forgotten(self) -> frozenset[str]:
        """Members forgotten by a change applied (folded or not): refused from now on."""
        return frozenset(self._forgotten)

    def transferable(self) -> Snapshot:
        """The snapshot as a state transfer sends it (without this node's unconfirmed)."""
        return msgspec.structs.replace(self._base, unconfirmed=())

    def commit_compaction(self, snapshot: Snapshot) -> None:
        """Take ``snapshot`` (from :meth:`prepare_compaction`, stored) as the new base."""
        clock = snapshot.clock
        count = self.stable_count(clock)
        for change in self._log[:count]:
            del self._changes[change.change_id]
            del self._totals[change.change_id]
        del self._log[:count]
        del self._keys[:count]
        for origin in list(self._by_origin):
            kept = [n for n in self._by_origin[origin] if n > clock.get(origin)]
            if kept:
                self._by_origin[origin] = kept
            else:
                del self._by_origin[origin]
        self._base = snapshot
        self._refuse_stale()

    def needs_transfer(self, snapshot: Snapshot) -> bool:
        """Whether ``snapshot`` (a peer's) covers changes this registry lacks, or makes
        changes it holds void: then only a full state transfer brings it up to date."""
        if not self._clock.dominates(snapshot.clock):
            return True
        last = snapshot.last
        return last is not None and any(
            order_key(c) < last and not snapshot.clock.dominates(c.clock)
            for c in self._changes.values()
        )

    def admissible(self, change: Change) -> bool:
        """Whether ``change`` can still take its place in the order here: False for a
        void one (concurrent with the snapshot, sorting before its end), remembered so
        that a peer holding it is given a full state transfer (:meth:`holds_void`)."""
        last = self._base.last
        if last is None or self.has_change(change.change_id):
            return True
        if (
            order_key(change) >= last
            and not self.holds_void(change.clock)
            and not self._counts_the_forgotten(change.clock)
        ):
            return True
        self._refuse(change)
        return False

    def _counts_the_forgotten(self, clock: VectorClock) -> bool:
        """Whether ``clock`` counts a change of a member whose forget is folded here and
        that this registry lacks: a past nobody will ever send (rule 10 of _node.py: every
        member not dead past the grace had applied the forget, and so stopped taking the
        forgotten member's messages, and this registry held all they held)."""
        forgotten = self._base.forgotten
        return bool(forgotten) and any(
            count > self._clock.get(writer) and node_of_writer(writer) in forgotten
            for writer, count in clock.entries.items()
        )

    def _refuse(self, change: Change) -> None:
        """Remember ``change`` as void, and drop what is held pending on it (it would
        wait forever): the node deletes those from its store (:meth:`take_purged`)."""
        if change.change_id in self._pending:
            self._forget(change)
            self._purged.append(change.change_id)
        counter = change.clock.get(change.origin)
        self._void[change.origin] = min(self._void.get(change.origin, counter), counter)
        for held in sorted(self._pending.values(), key=order_key):
            if held.change_id in self._pending and self.holds_void(held.clock):
                self._refuse(held)

    def _refuse_stale(self) -> None:
        """Refuse the pending changes a new snapshot made void: they sort before its end,
        so they can never take their place (their past is a void change, gone for good;
        a change whose past is still to come sorts after what every member has seen), or
        their past is a forgotten member's that never came here (gone with it)."""
        last = self._base.last
        if last is None:
            return
        for held in sorted(self._pending.values(), key=order_key):
            if held.change_id in self._pending and (
                order_key(held) < last or self._counts_the_forgotten(held.clock)
            ):
                self._refuse(held)

    def take_purged(self) -> list[str]:
        """Ids of pending changes dropped since the last call (they counted a void one)."""
        purged, self._purged = self._purged, []
        return purged

    def stable_count(self, stable: VectorClock) -> int:
        """How many changes :meth:`compact` with ``stable`` would fold."""
        count = 0
        for change in self._log:
            if not stable.dominates(change.clock):
                break
            count += 1
        return count

    def adopt(
        self,
        snapshot: Snapshot,
        changes: Iterable[Change],
        *,
        writer_id: str,
        now: float,
    ) -> tuple[Registry, list[Change]]:
        """A full state transfer: the registry ``snapshot`` and ``changes`` make, with
        what this one holds on top. (new registry, the changes it re-issued).

        Changes held here (in the log, or folded and kept as ``unconfirmed``) that the
        snapshot lacks and that can no longer take their place in the order (void:
        concurrent with it and sorting before its end, or counting a void change in
        their past) are dropped, and re-issued with the same ops as new changes of
        ``writer_id`` (a writer id never used before: a void change's id may be held,
        refused, elsewhere), each naming the change it re-issues (``reissue_of``), so
        nothing acknowledged is lost: they apply on top of the cluster's state, and a
        version whose number moved shows as a conflict in ``versions()``. Several nodes
        may re-issue one change: the first re-issue in the one order applies.
        """
        snapshot = msgspec.structs.replace(snapshot, unconfirmed=())
        new = Registry.from_snapshot(writer_id, snapshot, changes)
        void: list[Change] = []
        kept: list[Change] = []
        held = {c.change_id: c for c in (*self._base.unconfirmed, *self._changes.values())}
        mine = sorted(held.values(), key=order_key)
        for change in mine:
            if change.change_id in new._pending:
                kept.append(change)  # came with the transfer, still waiting: see below
                continue
            if new.has_change(change.change_id):
                continue
            if not new.admissible(change) or any(
                change.clock.get(v.origin) >= v.clock.get(v.origin) for v in void
            ):
                void.append(change)
            else:
                kept.append(change)
        new.apply_many(kept)
        # Kept ones whose past was only in the snapshot this one replaces never apply:
        # that past sorts before this snapshot's end (ours ends no later, see _rank in
        # _node.py) and is not in it, so it is void, and so are they.
        stuck = [c for c in kept if c.change_id in new._pending]
        for change in stuck:
            new._forget(change)
        void = sorted([*void, *stuck], key=order_key)
        renamed: dict[str, str] = {}
        reissued: list[Change] = []
        for change in void:
            # Every void change dropped here is re-issued, not only this node's own: a
            # change of another node may be here alone (its node counted it as seen by
            # all). Nodes that re-issue the same one: the first in the order applies.
            change_id = new._next_change_id()
            renamed[change.change_id] = change_id
            ops: list[Op] = []
            for op in change.ops:
                if isinstance(op, PublishSetOp):
                    members = {m: renamed.get(c, c) for m, c in op.members.items()}
                    op = msgspec.structs.replace(op, members=members)
                elif isinstance(op, RollbackOp):
                    op = msgspec.structs.replace(op, target=renamed.get(op.target, op.target))
                ops.append(op)
            fresh = msgspec.structs.replace(
                new._local_change(ops, now),
                reissue_of=change.reissue_of or change.change_id,
            )
            new.apply(fresh)
            reissued.append(fresh)
        return new, reissued

    def _forget(self, change: Change) -> None:
        """Drop a change held pending (adopt: its past is gone with the old snapshot)."""
        del self._pending[change.change_id]
        del self._changes[change.change_id]
        del self._totals[change.change_id]
        counters = self._by_origin[change.origin]
        counters.remove(change.clock.get(change.origin))
        if not counters:
            del self._by_origin[change.origin]

    def _load_base(self) -> None:
        """Make the derived state the snapshot's, in fresh mutable objects."""
        base = self._base
        self._functions = {}
        for saved in base.functions:
            function = _Function(saved.name)
            function.current, function.last, function.owner = (
                saved.current,
                saved.last,
                saved.owner,
            )
            for v in saved.versions:
                function.versions[v.number] = _Version(
                    v.number, v.record, v.change_id, v.proposed, v.set_name, v.at
                )
                function.by_change[v.change_id] = v.number
            self._functions[saved.name] = function
        self._sets = {}
        for saved_set in base.sets:
            group = _Set(saved_set.name)
            group.current = saved_set.current
            group.owned = set(saved_set.owned)
            for sv in saved_set.versions:
                group.versions[sv.number] = _SetVersion(
                    sv.number, sv.change_id, sv.proposed, sv.origin, sv.at, dict(sv.members)
                )
                group.by_change[sv.change_id] = sv.number
            self._sets[saved_set.name] = group
        self._high_water = dict(base.high_water)
        self._reissued = set(base.reissued)
        self._forgotten = set(base.forgotten)
        self._views = {}
        self._touched = None

    def _export(self, clock: VectorClock, last: tuple[int, str, str], changes: int) -> Snapshot:
        functions = tuple(
            SnapshotFunction(
                name,
                tuple(
                    SnapshotVersion(n, v.record, v.change_id, v.proposed, v.set_name, v.at)
                    for n, v in sorted(function.versions.items())
                ),
                function.current,
                function.last,
                function.owner,
            )
            for name, function in sorted(self._functions.items())
        )
        sets = tuple(
            SnapshotSet(
                name,
                tuple(
                    SnapshotSetVersion(n, v.change_id, v.proposed, v.origin, v.at, v.members)
                    for n, v in sorted(group.versions.items())
                ),
                group.current,
                tuple(sorted(group.owned)),
            )
            for name, group in sorted(self._sets.items())
        )
        return Snapshot(
            clock=clock,
            last=last,
            changes=changes,
            functions=functions,
            sets=sets,
            high_water=dict(sorted(self._high_water.items())),
            reissued=tuple(sorted(self._reissued)),
            forgotten=tuple(sorted(self._forgotten)),
        )

    def pending(self) -> list[Change]:
        """The changes held but not applied, waiting for their causal past, in apply order."""
        return sorted(self._pending.values(), key=order_key)

    # -- local changes --------------------------------------------------------

    def publish(
        self, records: Sequence[VersionRecord], *, now: float, set_name: str | None = None
    ) -> Change | None:
        """:meth:`prepare_publish`, then :meth:`apply`: for callers with nothing to persist."""
        return self._applied(self.prepare_publish(records, now=now, set_name=set_name))

    def rollback(self, name: str, to: int | None = None, *, now: float) -> Change:
        """:meth:`prepare_rollback`, then :meth:`apply`."""
        change = self._applied(self.prepare_rollback(name, to, now=now))
        assert change is not None
        return change

    def forget(self, members: Sequence[str], *, now: float) -> Change:
        """:meth:`prepare_forget`, then :meth:`apply`."""
        change = self._applied(self.prepare_forget(members, now=now))
        assert change is not None
        return change

    def vaporize(self, name: str, *, now: float) -> Change:
        """:meth:`prepare_vaporize`, then :meth:`apply`."""
        change = self._applied(self.prepare_vaporize(name, now=now))
        assert change is not None
        return change

    def _applied(self, change: Change | None) -> Change | None:
        if change is not None:
            self.apply(change)
        return change

    def prepare_publish(
        self, records: Sequence[VersionRecord], *, now: float, set_name: str | None = None
    ) -> Change | None:
        """The change that publishes new versions, all at once; they become current.

        Like every ``prepare_*`` method it changes nothing: the node persists the change
        first and applies it after (memory never runs ahead of disk). Prepare the next
        local change only once this one is applied or dropped: both would take one id.

        Args:
            records: the versions to publish, at most one per name. With ``set_name``,
                the set's complete membership: functions the set owns that are not
                listed are retired from its new version.
            now: unix seconds, recorded in the change.
            set_name: publish ``records`` as a new version of this function set.

        Returns:
            The change, not applied yet, for the node to persist, apply and gossip; or
            None when nothing would change (each record's content_id equals its
            function's current one, and for a set its current version is the same).

        Raises:
            ConfigError: duplicate or empty names; a name already used by the other
                kind (function/set); a function that belongs to another set.
        """
        records = list(records)
        if not records:
            raise ConfigError("nothing to publish: a set needs at least one function")
        names = [record.name for record in records]
        for name in names:
            check_name(name)
        if len(set(names)) != len(names):
            twice = sorted({name for name in names if names.count(name) > 1})
            raise ConfigError(f"publish got several versions of {_listing(twice)} in one change")
        if set_name is not None:
            check_name(set_name)
            if set_name in names:
                raise ConfigError(f"set {set_name!r} cannot have a member of the same name")
            if set_name in self._functions:
                raise ConfigError(
                    f"{set_name!r} is already a function; give the set another name or "
                    f"vaporize({set_name!r}) first"
                )

        ops: list[Op] = []
        members: dict[str, str] = {}  # for a set: {member: change_id of member version}
        change_id = self._next_change_id()
        for record in records:
            name = record.name
            if name in self._sets:
                raise ConfigError(
                    f"{name!r} is a function set; give the function another name or "
                    f"vaporize({name!r}) first"
                )
            function = self._functions.get(name)
            if function is not None and function.owner not in (None, set_name):
                raise ConfigError(
                    f"function {name!r} belongs to set {function.owner!r}; publish it with "
                    f"that set, or vaporize({function.owner!r}) first"
                )
            if function is not None and function.current is not None:
                current = function.versions[function.current]
                if current.record.same_code_key == record.same_code_key:
                    members[name] = current.change_id
                    continue
            ops.append(
                PublishOp(
                    record=record,
                    proposed_version=self._high_water.get(name, 0) + 1,
                    set_name=set_name,
                )
            )
            members[name] = change_id

        if set_name is None:
            if not ops:
                return None
        else:
            group = self._sets.get(set_name)
            if not ops and group is not None and self._set_matches(group, members):
                return None
            ops.append(
                PublishSetOp(
                    name=set_name,
                    proposed_version=self._high_water.get(set_name, 0) + 1,
                    members=members,
                )
            )
        return self._local_change(ops, now)

    def prepare_rollback(self, name: str, to: int | None = None, *, now: float) -> Change:
        """The change that makes an earlier (or the given) version current again.

        Args:
            name: a function, or a set (every member moves, in one change).
            to: the version number to make current; None: the highest live version
                below the current one.
            now: unix seconds, recorded in the change.

        Returns:
            The change, not applied yet, for the node to persist, apply and gossip.

        Raises:
            FunctionNotFound: no live function or set by that name.
            VersionNotFound: no earlier version, or no version ``to``.
            ConfigError: the function belongs to a set (roll back the set instead).
        """
        group = self._sets.get(name)
        if group is not None:
            number = _rollback_target("set", name, group.versions.keys(), group.current, to)
            target = group.versions[number].change_id
        else:
            function = self._functions.get(name)
            if function is None:
                raise self._not_found(name)
            if function.owner is not None:
                raise ConfigError(
                    f"function {name!r} belongs to set {function.owner!r}; roll back the "
                    f"whole set with rollback({function.owner!r})"
                )
            if function.current is None:  # only a set member can be retired
                raise self._not_found(name)
            number = _rollback_target(
                "function", name, function.versions.keys(), function.current, to
            )
            target = function.versions[number].change_id
        op = RollbackOp(name=name, target=target, target_version=number)
        return self._local_change([op], now)

    def prepare_forget(self, members: Sequence[str], *, now: float) -> Change:
        """A change that forgets ``members`` (node ids) for good; the node core decides
        whether it may (rule 10 of ``_node.py``): the registry only records it."""
        wanted = tuple(sorted(set(members) - self._forgotten))
        if not wanted or "" in wanted:
            raise ConfigError("name at least one member not forgotten already")
        return self._local_change([ForgetOp(members=wanted)], now)

    def prepare_vaporize(self, name: str, *, now: float) -> Change:
        """The change that deletes a function, or a set and all it owns, with every version.

        The name keeps its high-water mark: a later publish under it continues the
        numbering, so a number never names two bodies.

        Returns:
            The change, not applied yet, for the node to persist, apply and gossip.

        Raises:
            FunctionNotFound: no live function or set by that name.
            ConfigError: the function belongs to a set (vaporize the set, or publish
                the set without it).
        """
        if name not in self._sets:
            function = self._functions.get(name)
            if function is None:
                raise self._not_found(name)
            if function.owner is not None:
                raise ConfigError(
                    f"function {name!r} belongs to set {function.owner!r}; publish the set "
                    f"without it, or vaporize({function.owner!r})"
                )
        return self._local_change([VaporizeOp(name=name)], now)

    # -- changes from elsewhere ----------------------------------------------

    def apply(self, change: Change) -> set[str]:
        """Apply a change made elsewhere (or replayed); a change held already is ignored.

        A change whose causal past is not all applied yet is held, and applied with
        the change that completes it (see :meth:`pending`).

        Returns:
            The names (functions and sets) whose lookups changed: what ``resolve()``,
            ``view()`` or ``current_version()`` answers for them, or which versions
            they have. The node drops what it cached for them.

        Raises:
            ProtocolError: the change is malformed. Nothing was applied.
        """
        return self.apply_many((change,))

    def apply_many(self, changes: Iterable[Change]) -> set[str]:
        """Apply a batch of changes (an anti-entropy answer), replaying the log at most once.

        Returns:
            The names whose lookups changed.

        Raises:
            ProtocolError: a change is malformed. Nothing of the batch was applied.
        """
        fresh: dict[str, Change] = {}
        for change in changes:
            if change.change_id in fresh or self.has_change(change.change_id):
                continue
            _check_change(change)
            if not self.admissible(change):
                # Concurrent with the snapshot and sorting before its end: it cannot take
                # its place in the order any more. Only a node away past the grace (or
                # one that wrote before it ever synced) makes one; it re-issues it on top
                # after its full state transfer (rule 9 of _node.py). Never applied here.
                continue
            fresh[change.change_id] = change
        if not fresh:
            return set()
        for change in fresh.values():
            self._hold(change)
        batch = self._take_ready()
        if not batch:
            return set()
        if not self._keys or order_key(batch[0]) > self._keys[-1]:
            changed: set[str] = set()
            for change in batch:
                self._log.append(change)
                self._keys.append(order_key(change))
                changed |= self._apply_incrementally(change)
            return changed
        for change in batch:
            key = order_key(change)
            index = bisect.bisect_right(self._keys, key)
            self._keys.insert(index, key)
            self._log.insert(index, change)
        return self._rebuild()

    # -- lookups --------------------------------------------------------------

    def resolve(self, name: str, version: int | None = None) -> tuple[int, VersionRecord]:
        """The version a call runs: the current one, or the pinned ``version``.

        Returns:
            ``(number, record)``.

        Raises:
            FunctionNotFound: no function by that name (never was, vaporized, a set, or
                left out of its set's current version while unpinned).
            VersionNotFound: the function exists, version ``version`` does not.
        """
        number, _content_id = resolve_view(name, self.entry(name), version)
        return number, self._functions[name].versions[number].record

    def resolve_content(self, name: str, content_id: str) -> tuple[int, VersionRecord]:
        """The newest live version of ``name`` with ``content_id``: pinning that never moves.

        Raises:
            FunctionNotFound: no function by that name.
            VersionNotFound: no live version of it has that content id.
        """
        function = self._functions.get(name)
        if function is None:
            raise self._not_found(name)
        for number in sorted(function.versions, reverse=True):
            entry = function.versions[number]
            if entry.record.content_id == content_id:
                return number, entry.record
        raise VersionNotFound(
            f"function {name!r} has no version with content id {content_id!r}; it was "
            f"vaporized or never published here, check versions({name!r})"
        )

    def current_version(self, name: str) -> int:
        """The version an unpinned call runs now (for a set: its current version).

        Raises:
            FunctionNotFound: no function or set by that name.
        """
        group = self._sets.get(name)
        if group is not None:
            return group.current
        function = self._functions.get(name)
        if function is None:
            raise self._not_found(name)
        if function.current is None:
            raise self._retired(function)
        return function.current

    def view(self, name: str) -> FunctionView | None:
        """The compact lookup record of a function; None when there is none by that name.

        A dict lookup; the first call after a change to the function builds the
        record, in O(its live versions).
        """
        cached = self._views.get(name)
        if cached is not None:
            return cached
        function = self._functions.get(name)
        if function is None:
            return None
        versions = function.versions
        view = FunctionView(
            name=name,
            current=function.current,
            content_ids={n: v.record.content_id for n, v in versions.items()},
            signature_ids={n: v.record.signature_id for n, v in versions.items()},
            set_name=function.owner,
            unavailable="" if function.current is not None else str(self._retired(function)),
            timeouts={n: v.record.timeout for n, v in versions.items() if v.record.timeout},
        )
        self._views[name] = view
        return view

    def entry(self, name: str) -> FunctionView | None:
        """What a worker must know of ``name``: its view, or why it resolves to nothing.

        None only for a name this registry never heard of. A set or a vaporized
        function gets a view without versions whose ``unavailable`` says so: the node
        persists these for its workers (see :func:`resolve_view`).
        """
        view = self.view(name)
        if view is not None or name not in self._high_water:
            return view
        return FunctionView(
            name=name,
            current=None,
            content_ids={},
            signature_ids={},
            unavailable=str(self._not_found(name)),
        )

    def names(self) -> list[str]:
        """Every name ever used here: live functions and sets, and tombstones."""
        return list(self._high_water)

    def content_ids(self) -> set[str]:
        """The content ids of every live version: the bodies a node must keep (the
        fuzzer's oracle for the node core's own count)."""
        return {
            version.record.content_id
            for function in self._functions.values()
            for version in function.versions.values()
        }

    def versions(self, name: str) -> list[VersionInfo]:
        """The history of a function or a set, oldest first, without bodies.

        Raises:
            FunctionNotFound: no function or set by that name (or it was vaporized).
        """
        group = self._sets.get(name)
        if group is not None:
            return [
                VersionInfo(
                    name=name,
                    version=number,
                    kind="set",
                    current=number == group.current,
                    change_id=entry.change_id,
                    origin=entry.origin,
                    created_at=entry.at,
                    proposed_version=entry.proposed,
                    conflict=entry.proposed != number,
                    members=self._member_numbers(entry.members),
                )
                for number, entry in sorted(group.versions.items())
            ]
        function = self._functions.get(name)
        if function is None:
            raise self._not_found(name)
        return [
            VersionInfo(
                name=name,
                version=number,
                current=number == function.current,
                change_id=entry.change_id,
                origin=entry.record.origin,
                created_at=entry.record.created_at,
                proposed_version=entry.proposed,
                conflict=entry.proposed != number,
                set_name=entry.set_name,
                content_id=entry.record.content_id,
                signature_text=entry.record.signature_text,
                signature_id=entry.record.signature_id,
                python=entry.record.python,
                doc=entry.record.doc,
                timeout=entry.record.timeout,
            )
            for number, entry in sorted(function.versions.items())
        ]

    def functions(self) -> list[FunctionInfo]:
        """Every function callable by name, and every set, sorted by name."""
        found: list[FunctionInfo] = []
        for name, function in self._functions.items():
            if function.current is None:
                continue
            record = function.versions[function.current].record
            found.append(
                FunctionInfo(
                    name=name,
                    version=function.current,
                    origin=record.origin,
                    created_at=record.created_at,
                    set_name=function.owner,
                    content_id=record.content_id,
                    signature_text=record.signature_text,
                    signature_id=record.signature_id,
                    doc=record.doc,
                )
            )
        for name, group in self._sets.items():
            entry = group.versions[group.current]
            found.append(
                FunctionInfo(
                    name=name,
                    kind="set",
                    version=group.current,
                    origin=entry.origin,
                    created_at=entry.at,
                    members=self._member_numbers(entry.members),
                )
            )
        found.sort(key=lambda info: info.name)
        return found

    def statistics(self) -> RegistryStatistics:
        """Counts of what the registry holds."""
        live = self._functions.keys() | self._sets.keys()
        return RegistryStatistics(
            functions=sum(1 for f in self._functions.values() if f.current is not None),
            sets=len(self._sets),
            versions=sum(len(f.versions) for f in self._functions.values()),
            tombstones=sum(1 for name in self._high_water if name not in live),
            changes=len(self._log),
            pending=len(self._pending),
            rebuilds=self._rebuilds,
            compacted=self._base.changes,
            void=len(self._void),
        )

    def replica_hash(self) -> str:
        """A digest of the applied changes: equal on two replicas iff they hold the same set.

        By rule 3 the state is a function of that set, so equal digests mean equal
        registries; chaos checks compare them across nodes. The applied changes are
        causally closed (rule 4), so the clock names them exactly: for each writer, its
        changes 1..n, compacted or not. Held (pending) changes are left out: they have
        no effect yet. O(writers).
        """
        digest = hashlib.sha256()
        for writer, count in sorted(self._clock.entries.items()):
            digest.update(f"{writer}:{count}\n".encode())
        return digest.hexdigest()[:32]

    # -- internals: the log ---------------------------------------------------

    def _next_change_id(self) -> str:
        return f"{self.node_id}:{self._clock.get(self.node_id) + 1}"

    def _local_change(self, ops: list[Op], now: float) -> Change:
        # Its causal past is exactly what is applied here, and it sorts after all of
        # it: a local change always applies at once, on the incremental path.
        clock = self._clock.increment(self.node_id)
        return Change(
            change_id=f"{self.node_id}:{clock.get(self.node_id)}",
            origin=self.node_id,
            clock=clock,
            at=now,
            ops=tuple(ops),
        )

    def _hold(self, change: Change) -> None:
        """Remember a change as pending; :meth:`_take_ready` decides when it applies."""
        counters = self._by_origin.setdefault(change.origin, [])
        counter = change.clock.get(change.origin)
        if not counters or counter > counters[-1]:
            counters.append(counter)
        else:
            bisect.insort(counters, counter)
        self._changes[change.change_id] = change
        self._pending[change.change_id] = change
        self._totals[change.change_id] = change.clock.total()

    def _take_ready(self) -> list[Change]:
        """Remove from pending, in apply order, every change whose causal past is applied.

        One pass in apply order is enough: a change's causal past sorts before it
        (``_sorts_after_its_past``), so by the time a change is looked at, its past has
        been taken if it can be.
        """
        ready: list[Change] = []
        clock = self._clock
        for change in sorted(self._pending.values(), key=order_key):
            origin = change.origin
            wanted = change.clock
            if (
                wanted.get(origin) == clock.get(origin) + 1
                and all(
                    clock.get(node_id) >= count
                    for node_id, count in wanted.entries.items()
                    if node_id != origin
                )
                and self._sorts_after_its_past(change)
            ):
                ready.append(change)
                clock = clock.merge(wanted)
        for change in ready:
            del self._pending[change.change_id]
        self._clock = clock
        return ready

    def _sorts_after_its_past(self, change: Change) -> bool:
        """Whether ``change`` sorts after every change its clock counts (all applied).

        The newest change counted from each node sorts after that node's older ones and
        their pasts (checked when they applied), so comparing with those is enough: O(clock).
        A dishonest clock (one that drops an entry its predecessor had) fails here forever.
        """
        total = self._totals[change.change_id]
        for node_id, count in change.clock.entries.items():
            if node_id == change.origin:
                count -= 1
                if not count:
                    continue
            if count <= self._base.clock.get(node_id):
                continue  # compacted: it sorts before the snapshot's end, this after it
            if self._totals[f"{node_id}:{count}"] >= total:
                return False
        return True

    def _rebuild(self) -> set[str]:
        """Replay the whole sorted log from an empty state (a change arrived out of order)."""
        self._rebuilds += 1
        # Every name ever used, tombstones too: a replay can turn a name nobody had heard
        # of into a tombstone (published and vaporized in one batch), or move the
        # high-water mark a tombstone's lookup quotes.
        before = {name: self._full_key(name) for name in self._high_water}
        self._load_base()
        for change in self._log:
            self._apply_ops(change)
        names = before.keys() | self._high_water.keys()
        return {name for name in names if before.get(name) != self._full_key(name)}

    def _apply_incrementally(self, change: Change) -> set[str]:
        self._touched = {}
        try:
            self._apply_ops(change)
            return {name for name, key in self._touched.items() if key != self._quick_key(name)}
        finally:
            self._touched = None

    def _touch(self, name: str) -> None:
        """Call before changing anything that a lookup of ``name`` could see."""
        self._views.pop(name, None)
        if self._touched is not None and name not in self._touched:
            self._touched[name] = self._quick_key(name)

    def _quick_key(self, name: str) -> _LookupKey:
        # Enough to tell whether one change altered a lookup: while a function lives,
        # versions are only added (raising `last`), and vaporize removes it outright.
        function = self._functions.get(name)
        if function is not None:
            current = function.current
            change_id = None if current is None else function.versions[current].change_id
            return (
                "function",
                current,
                change_id,
                len(function.versions),
                function.last,
                function.owner,
            )
        group = self._sets.get(name)
        if group is not None:
            return ("set", group.current, len(group.versions))
        return None

    def _full_key(self, name: str) -> _LookupKey:
        # After a replay numbers may have moved: compare every (number, identity) pair.
        function = self._functions.get(name)
        if function is not None:
            return (
                "function",
                function.current,
                tuple((n, v.change_id) for n, v in sorted(function.versions.items())),
                function.owner,
            )
        group = self._sets.get(name)
        if group is not None:
            return (
                "set",
                group.current,
                tuple((n, v.change_id) for n, v in sorted(group.versions.items())),
            )
        if name in self._high_water:
            return ("tombstone", self._high_water[name])
        return None

    # -- internals: applying ops (THE ONE CONFLICT RULE lives in the order, not here) --

    def _apply_ops(self, change: Change) -> None:
        if change.reissue_of:
            if change.reissue_of in self._reissued:
                return  # another node re-issued it first, in the one order
            self._reissued.add(change.reissue_of)
        for op in change.ops:
            if isinstance(op, PublishOp):
                self._apply_publish(change, op)
            elif isinstance(op, PublishSetOp):
                self._apply_publish_set(change, op)
            elif isinstance(op, RollbackOp):
                self._apply_rollback(op)
            elif isinstance(op, ForgetOp):
                self._forgotten.update(op.members)
            else:
                self._vaporize(op.name)

    def _take_number(self, name: str) -> int:
        number = self._high_water.get(name, 0) + 1
        self._high_water[name] = number
        return number

    def _apply_publish(self, change: Change, op: PublishOp) -> None:
        name = op.record.name
        if name in self._sets:  # kind clash: the later change takes the name
            self._vaporize(name)
        self._touch(name)
        function = self._functions.get(name)
        if function is None:
            function = self._functions[name] = _Function(name)
        number = self._take_number(name)
        function.versions[number] = _Version(
            number, op.record, change.change_id, op.proposed_version, op.set_name, change.at
        )
        function.by_change[change.change_id] = number
        function.current = number
        function.last = number
        if op.set_name is None:
            self._release(function)
        # else: the PublishSetOp of the same change adopts it

    def _apply_publish_set(self, change: Change, op: PublishSetOp) -> None:
        name = op.name
        if name in self._functions:  # kind clash: the later change takes the name
            self._vaporize(name)
        self._touch(name)
        group = self._sets.get(name)
        if group is None:
            group = self._sets[name] = _Set(name)
        number = self._take_number(name)
        group.versions[number] = _SetVersion(
            number, change.change_id, op.proposed_version, change.origin, change.at, op.members
        )
        group.by_change[change.change_id] = number
        group.current = number
        self._move_members(group, op.members, adopt=True)

    def _move_members(self, group: _Set, members: dict[str, str], *, adopt: bool) -> None:
        """Point every member at its version in ``members``; retire the set's others.

        With ``adopt`` (a set publish) listed functions join the set, whichever set
        or none they belonged to; without it (a rollback) only functions the set still
        owns move: a rollback restores versions, it never takes a function back from
        the set it moved to since.
        """
        for member, change_id in members.items():
            function = self._functions.get(member)
            if function is None or change_id not in function.by_change:
                continue  # that version was vaporized by a change sorting earlier
            if not adopt and function.owner != group.name:
                continue
            number = function.by_change[change_id]
            if function.current != number or function.owner != group.name:
                self._touch(member)
                if function.owner != group.name:
                    self._release(function)
                    function.owner = group.name
                    group.owned.add(member)
                function.current = number
        for member in group.owned:
            function = self._functions[member]
            if function.current is not None and (members.get(member) not in function.by_change):
                self._touch(member)
                function.current = None

    def _apply_rollback(self, op: RollbackOp) -> None:
        group = self._sets.get(op.name)
        if group is not None:
            number = group.by_change.get(op.target)
            if number is None:
                return  # that set version was vaporized by a change sorting earlier
            if group.current != number:
                self._touch(op.name)
                group.current = number
            self._move_members(group, group.versions[number].members, adopt=False)
            return
        function = self._functions.get(op.name)
        if function is None:
            return
        number = function.by_change.get(op.target)
        if number is None or function.current == number:
            return
        self._touch(op.name)
        function.current = number

    def _vaporize(self, name: str) -> None:
        group = self._sets.get(name)
        if group is not None:
            self._touch(name)
            del self._sets[name]
            for member in sorted(group.owned):
                function = self._functions.get(member)
                if function is not None:
                    function.owner = None  # owned by a set that is going away
                    self._vaporize(member)
            return
        function = self._functions.get(name)
        if function is None:
            return
        self._touch(name)
        self._release(function)
        del self._functions[name]

    def _release(self, function: _Function) -> None:
        if function.owner is not None:
            owner = self._sets.get(function.owner)
            if owner is not None:
                owner.owned.discard(function.name)
            self._touch(function.name)
            function.owner = None

    # -- internals: answers ---------------------------------------------------

    def _set_matches(self, group: _Set, members: dict[str, str]) -> bool:
        """Whether publishing ``members`` would leave the set exactly as it is."""
        if group.versions[group.current].members != members:
            return False
        for member in group.owned:
            function = self._functions[member]
            if member in members:
                if function.current is None or (
                    function.versions[function.current].change_id != members[member]
                ):
                    return False
            elif function.current is not None:
                return False
        return all(self._functions[m].owner == group.name for m in members)

    def _member_numbers(self, members: dict[str, str]) -> dict[str, int]:
        numbers: dict[str, int] = {}
        for member, change_id in members.items():
            function = self._functions.get(member)
            if function is not None and change_id in function.by_change:
                numbers[member] = function.by_change[change_id]
        return numbers

    def _not_found(self, name: str) -> FunctionNotFound:
        if name in self._sets:
            members = sorted(self._sets[name].owned)
            return FunctionNotFound(
                f"{name!r} is a function set, not a function; call one of its members "
                f"({_listing(members)}) or check versions({name!r})"
            )
        if name in self._high_water:
            return FunctionNotFound(
                f"function {name!r} was vaporized; scatter it again to bring it back "
                f"(numbering continues after version {self._high_water[name]})"
            )
        return FunctionNotFound(_never_published(name))

    def _retired(self, function: _Function) -> FunctionNotFound:
        # No set version number in the words: workers hold this message in the function's
        # persisted view, which a later move of the set does not rewrite.
        owner = function.owner
        where = f"set {owner!r}" if owner is not None else "its set"
        return FunctionNotFound(
            f"function {function.name!r} is not part of the current version of {where}; "
            f"roll the set back to a version that has it, or pin one of its versions "
            f"({_numbers(function.versions)})"
        )


# ---------------------------------------------------------------------------
# Helpers without state.
# ---------------------------------------------------------------------------


# Function and set names (rule 6). A name is what a caller types (make_callable("add"),
# `scatter call add`) and what the callable becomes (its __name__, the name in Python's
# own arity errors), so it is a name you could give a def: a Python identifier, not a
# keyword, in the NFKC form Python itself reads identifiers in (so "ﬁle" and "file" are
# never two functions). No dots, dashes or spaces: they need quoting somewhere (a shell,
# a def, a log line), and a rule can be loosened later without breaking anyone, never
# tightened; dots stay free to mean namespaces one day. 128 characters is 2-3x the
# longest function names in large codebases, and keeps the CLI's tables readable; the
# wire's MAX_NAME_CHARS (256) stays the outer bound for what a peer may send.
MAX_FUNCTION_NAME_CHARS = 128
assert MAX_FUNCTION_NAME_CHARS <= MAX_NAME_CHARS
NAME_RULE = (
    "function and set names are Python identifiers (letters, digits and _, not starting "
    f"with a digit, not a keyword) of 1 to {MAX_FUNCTION_NAME_CHARS} characters"
)


def node_of_writer(writer: str) -> str:
    """The node id in a writer id (``<node id>.<start>.<random>``, or a re-issuing one
    ``<writer>~<n>``; see _node/_server.py): node ids have no dots."""
    return writer.split(".", 1)[0]


def check_name(name: object) -> str:
    """Refuse a new function or set name that breaks NAME_RULE; return it unchanged.

    Raises:
        TypeError: ``name`` is not a str.
        ConfigError: it is a str that breaks the rule; the message states the rule.
    """
    if not isinstance(name, str):
        raise TypeError(f"{NAME_RULE}; got {type(name).__name__} {_short(name)}")
    if (
        0 < len(name) <= MAX_FUNCTION_NAME_CHARS
        and name.isidentifier()
        and not keyword.iskeyword(name)
        and unicodedata.normalize("NFKC", name) == name
    ):
        return name
    why = f" ({len(name)} characters)" if len(name) > MAX_FUNCTION_NAME_CHARS else ""
    if name.isidentifier() and unicodedata.normalize("NFKC", name) != name:
        why = f" (Python reads it as {unicodedata.normalize('NFKC', name)!r})"
    raise ConfigError(f"{NAME_RULE}; got {_short(name)}{why}")


def _short(value: object, limit: int = 40) -> str:
    # A 300-character name in full would drown the rule it breaks.
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 4] + "..." + text[-1]


def _rollback_target(
    kind: str, name: str, numbers: Iterable[int], current: int, to: int | None
) -> int:
    live = sorted(numbers)
    if to is None:
        below = [n for n in live if n < current]
        if not below:
            raise VersionNotFound(
                f"{kind} {name!r} has no version before {current}; nothing to roll back to "
                f"(versions: {_numbers(live)})"
            )
        return below[-1]
    if to not in live:
        raise VersionNotFound(
            f"{kind} {name!r} has no version {to}; roll back to one of {_numbers(live)}"
        )
    return to


def _numbers(numbers: Iterable[int]) -> str:
    ordered = sorted(numbers)
    if not ordered:
        return "none"
    if len(ordered) > 10:
        return ", ".join(map(str, ordered[:3])) + ", ..., " + ", ".join(map(str, ordered[-5:]))
    return ", ".join(map(str, ordered))


def _listing(names: Iterable[str]) -> str:
    return ", ".join(repr(name) for name in names) or "none"


def _check_change(change: Change) -> None:
    """Refuse a change no honest node makes; the wire is never trusted.

    Raises:
        ProtocolError: saying what is wrong with it.
    """
    counter = change.clock.get(change.origin)
    if counter < 1 or change.change_id != f"{change.origin}:{counter}":
        raise ProtocolError(
            f"change {change.change_id!r} from {change.origin!r}: its id must be "
            f"'<origin>:<origin's clock entry>', and the clock says {counter}"
        )
    if not change.ops:
        raise ProtocolError(f"change {change.change_id!r} has no ops")
    seen: set[str] = set()
    sets: set[str] = set()
    member_of: set[str] = set()
    if any(isinstance(op, ForgetOp) for op in change.ops):
        (op, *others) = change.ops
        if others or not isinstance(op, ForgetOp):
            raise ProtocolError(f"change {change.change_id!r}: a forget must be alone in its change")
        if "" in op.members or len(set(op.members)) != len(op.members):
            raise ProtocolError(f"change {change.change_id!r} forgets an empty or repeated member")
        return
    for op in change.ops:
        if isinstance(op, PublishOp):
            name = op.record.name
            if op.proposed_version < 1:
                raise ProtocolError(f"change {change.change_id!r}: proposed version below 1")
            if op.set_name is not None:
                member_of.add(op.set_name)
        elif isinstance(op, PublishSetOp):
            name = op.name
            if op.proposed_version < 1:
                raise ProtocolError(f"change {change.change_id!r}: proposed version below 1")
            if name in op.members or "" in op.members:
                raise ProtocolError(
                    f"change {change.change_id!r}: set {name!r} has a bad member name"
                )
            sets.add(name)
        elif isinstance(op, RollbackOp | VaporizeOp):
            name = op.name
        else:  # a forget: alone in its change, checked above
            continue
        if not name:
            raise ProtocolError(f"change {change.change_id!r} has an op with an empty name")
        if name in seen:
            raise ProtocolError(f"change {change.change_id!r} touches {name!r} twice")
        seen.add(name)
    if not member_of <= sets:
        raise ProtocolError(
            f"change {change.change_id!r} publishes members of {_listing(sorted(member_of - sets))} "
            "without a new version of the set"
        )
