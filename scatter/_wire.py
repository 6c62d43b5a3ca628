"""Every message Scatter sends, as msgspec Structs: the versioned wire contract.

Two conversations use it:

* client <-> node (the node's ROUTER at its address): control requests such as
  ``Publish``, ``Lease`` or ``ListVersions``, each answered by one reply;
* client <-> worker (a worker process's ROUTER, leased through the node): ``Call`` and its
  ``Result`` or ``Failure``. These are the hot messages: ``array_like`` and small tags.

Sizes are checked against ``max_message_bytes`` before anything is decoded, and a frame
that fails to decode (``DECODE_ERRORS``) becomes a ``Failure`` of kind ``protocol``, never a
dead serve loop. The limits below are msgspec constraints on the Structs, so decoding itself
refuses a frame that breaks one, before anything is built from it.

ONLY APPEND: tags and fields. New fields get defaults (msgspec schema evolution), so a
peer one protocol version behind still decodes what it knows.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from ._core._membership import Ack, Alive, Dead, Nack, Ping, PingReq, Suspect, Sync
from ._core._registry import Change, Snapshot
from ._core._vclock import VectorClock

Membership = Ping | PingReq | Ack | Nack | Alive | Suspect | Dead | Sync

# Protocol versions and what each added:
#   1: calls, control requests, leases of worker processes (the single-node protocol).
#   2: CURVE on every TCP connection, roles (Failure kind "forbidden"), node-computed
#      content ids, NodeStatus incarnation and worker start failures; node to node:
#      PeerGossip (SWIM), PeerChanges, PeerDigest (anti-entropy), role "peer".
#   3: signatures travel to callers as msgspec type descriptions (Publish and
#      Description ``signature_spec``); Description.signature is no longer filled in.
#   4: a function's exception carries what rebuilds its class on the caller (Failure
#      ``remote_args``, ``remote_attributes``, ``remote_pickle``); what a call writes
#      to stdout and stderr comes back with its reply (Result and Failure ``output``);
#      generator functions stream (Yielded, More, Cancel); a type description says
#      whether the function streams (``SignatureSpec.streams``).
#   5: read your writes. Replies to changes (Published, Moved) carry the node's registry
#      clock after the change; reads (Describe, ListVersions, ListFunctions,
#      CurrentVersion) may carry the clock the client has seen, and are then answered
#      once the node holds all of it (or after its ``read_wait``), with its clock;
#      CatchUp / CaughtUp do the same before calls. A node answers Hello with the
#      client's protocol when it speaks it: a client of 4 works with a node of 5 (it
#      sends no clocks, its decoders skip the replies' new trailing field), and a client
#      of 5 sends clocks only to a node that said 5.
#   (5 too, fields with defaults and new tags only) forwarding: ``Lease`` may name a
#      function (a route: a worker that can run it, here or on a member), ``Leased`` names
#      the node whose worker it is; node to node: PeerRequest/PeerReply (a Describe or a
#      route Lease served by a member for a client of ours), and PeerDigest
#      ``cannot_load`` (the bodies a node learned it cannot load, and why).
#   (5 too, a field with a default) ``Lease.clock``: a route lease of the current
#      version carries a registry clock (the forwarding node's, or the client's), and
#      the member that serves it grants it only once it holds that clock (or after its
#      ``read_wait``), as a read (read your writes through a route).
#   (5 too, fields with defaults and new tags only) at most once: ``Call.caller`` (8
#      random bytes of the calling process, new in a forked child: with ``id``, unique
#      in the cluster) and ``Call.start_by`` (the worker's monotonic clock past which it
#      must not start the call: its caller has given up); ``Leased.monotonic`` (the leasing
#      node's monotonic clock, from which the client converts); Failure kinds
#      ``expired`` (not started: its caller gave up) and ``duplicate`` (this call id
#      reached this worker, or this relay, before: never run twice); the relay:
#      ``Relay`` (a call the client cannot send to a member's worker itself, as its
#      frame, run through the node) answered by ``Relayed`` (the worker's reply frame).
#   (5 too, a new tag only) node to node: bodies travel in bounded messages; a body that
#      did not fit is asked for (PeerBodiesWanted) and comes in a PeerChanges without
#      changes. An older node drops the new message (malformed): its pushes carry every
#      body, as before.
#   (5 too, new tags and fields with defaults) members gone for good: ``Forget``
#      (`scatter node forget`), answered ``Done``; ``Leave`` now hands this node's
#      changes over and forgets the node before it says goodbye; the registry op
#      ``forget``; node to node: ``PeerForgotten`` tells a forgotten node that its
#      messages are refused, ``PeerDigest.forgets`` says the sender applies forgets (an
#      older node cannot decode one: neither is made while a live member does not say
#      so); ``NodeStatus.forgotten`` and ``forgotten_by``.
PROTOCOL_VERSION_MIN = 4
PROTOCOL_VERSION_MAX = 5
PROTOCOL_VERSION = PROTOCOL_VERSION_MAX

# ----- limits: in _limits.py (the registry's records use them too); re-exported here -----

from ._limits import (  # noqa: E402
    DECODE_ERRORS as DECODE_ERRORS,
    MAX_ADDRESS_CHARS as MAX_ADDRESS_CHARS,
    MAX_BATCH_CHANGES as MAX_BATCH_CHANGES,
    MAX_CHANGE_OPS as MAX_CHANGE_OPS,
    MAX_CLOCK_ENTRIES as MAX_CLOCK_ENTRIES,
    MAX_DECODE_RECURSION as MAX_DECODE_RECURSION,
    MAX_GOSSIP_MESSAGES as MAX_GOSSIP_MESSAGES,
    MAX_ID_CHARS as MAX_ID_CHARS,
    MAX_NAME_CHARS as MAX_NAME_CHARS,
    MAX_PIPELINED_CALLS as MAX_PIPELINED_CALLS,
    MAX_SET_MEMBERS as MAX_SET_MEMBERS,
    MAX_TEXT_CHARS as MAX_TEXT_CHARS,
    PEER_QUEUE_FRAMES as PEER_QUEUE_FRAMES,
    PEER_REPLY_FRAMES as PEER_REPLY_FRAMES,
    REPLY_SEND_TIMEOUT_MS as REPLY_SEND_TIMEOUT_MS,
    Address as Address,
    Ident as Ident,
    Name as Name,
    Text as Text,
)

MAX_CANNOT_LOAD = 64  # entries of PeerDigest.cannot_load


class Call(msgspec.Struct, array_like=True, tag=1, frozen=True):
    """Run ``name`` with ``args`` (the msgpack map made by ``CallSpec.encode_arguments``)."""

    id: int  # echoed in the reply, so a late reply to an abandoned call is never mistaken
    name: Name
    version: int  # pinned version, or 0: the current one
    known_version: int  # the version whose signature the caller validated against
    signature_id: Ident  # that version's signature id; "" skips the signature check
    timeout: float  # seconds; 0: the function's own timeout, else the node's default
    args: msgspec.Raw
    # At most once (trailing, with defaults: a protocol-4 caller sends neither). The
    # caller's 8 random bytes: (caller, id) is unique in the cluster, and a worker or a
    # relay that saw it before answers ``duplicate`` rather than run it again.
    caller: Annotated[bytes, msgspec.Meta(max_length=16)] = b""
    # The latest moment, on the worker's node's CLOCK_MONOTONIC, at which the worker may
    # still start the call (its caller waits no longer); 0: no such bound. Past it the
    # worker answers ``expired`` and never runs it.
    start_by: float = 0.0


# What a call wrote to sys.stdout (1) and sys.stderr (2), in order, each line already
# prefixed on the worker with the function and the process: "(add pid=1234) hello\n".
Output = list[tuple[int, str]]


class Result(msgspec.Struct, array_like=True, tag=2, frozen=True):
    id: int
    version: int  # the version that ran: a body-only update moves callers along
    value: msgspec.Raw
    # Since protocol 4. Left out (a 4-element array) when the call wrote nothing: the
    # worker's one-pass encoding (CallSpec.encode_reply) writes this Struct as a tuple.
    output: Output = []


class Yielded(msgspec.Struct, array_like=True, tag=4, frozen=True):
    """One item of a generator function's stream (worker -> client), since protocol 4.

    A call of a generator function is answered by ``Yielded`` frames, one per item as it
    is produced, then one ``Result`` (value None: the generator returned) or ``Failure``.
    Credit-based back-pressure: the worker produces at most ``STREAM_WINDOW`` items
    beyond those the caller granted with ``More``; ``Cancel`` closes the generator (its
    ``finally`` runs) and is answered by the stream's end as well.
    """

    id: int
    value: msgspec.Raw
    output: Output = []


class More(msgspec.Struct, array_like=True, tag=5, frozen=True):
    """Client -> worker: the stream of call ``id`` may produce ``credit`` more items."""

    id: int
    credit: Annotated[int, msgspec.Meta(ge=1, le=1 << 20)]


class Cancel(msgspec.Struct, array_like=True, tag=6, frozen=True):
    """Client -> worker: close the stream of call ``id`` (the iterator was closed)."""

    id: int


# Items a worker may produce ahead of its caller before the first ``More``: enough to
# hide a round trip, few enough that an abandoned stream wastes little work.
STREAM_WINDOW = 8


FailureKind = Literal[
    "remote",  # the function raised
    "validation",  # arguments or result do not match the annotations
    "arity",  # Python's own TypeError for the call
    "not_found",
    "version_not_found",
    "signature_changed",
    "timeout",
    "protocol",
    "not_scatterable",
    "load",  # the version's body cannot be loaded on this node
    "internal",
    "invalid",  # a request the registry refuses (bad name, name taken by a set, ...)
    "forbidden",  # the client's role may not do this (a call-only secret asked for a change)
    "expired",  # the call never started: its caller's time ran out first (Call.start_by)
    "duplicate",  # a call with this (caller, id) came before: it is never run twice
    "crashed",  # a relayed call's worker was lost before it answered: it may have run
]


class Failure(msgspec.Struct, array_like=True, tag=3, frozen=True, omit_defaults=True):
    """Any request that did not succeed; ``kind`` picks the exception class on the caller."""

    id: int
    kind: FailureKind
    message: str
    remote_type: str = ""
    remote_traceback: str = ""
    parameter: str | None = None
    path: str | None = None
    name: str = ""
    old_version: int = 0
    new_version: int = 0
    # Since protocol 4, kind "remote": what lets a caller rebuild the exception as an
    # instance of its own class (scatter/_client/_remote_errors.py). ``remote_args`` and
    # ``remote_attributes`` are plain msgpack (``exc.args``, the ``__dict__`` entries
    # msgpack carries), read without unpickling; ``remote_pickle`` is the exception by
    # cloudpickle, sent only to callers whose role may unpickle (never call-only).
    remote_args: bytes = b""
    remote_attributes: bytes = b""
    remote_pickle: bytes = b""
    output: Output = []  # since protocol 4: what the call wrote before it failed


# ----- control requests (client -> node) -----


class Hello(msgspec.Struct, array_like=True, tag=10, frozen=True):
    id: int
    protocol: int = PROTOCOL_VERSION


class Publish(msgspec.Struct, array_like=True, tag=11, frozen=True):
    id: int
    name: Name
    body: bytes  # cloudpickle of the function, by value
    signature: bytes  # cloudpickle of its inspect.Signature, for the node's workers only
    signature_text: Text
    signature_id: Ident
    content_id: Ident  # the publisher's code id (VersionRecord.code_id)
    source: str | None = None
    doc: str | None = None
    python: Ident = ""
    timeout: float | None = None
    # The signature as a msgspec type description (_core/_typespec.py), for callers.
    signature_spec: bytes = b""


class Rollback(msgspec.Struct, array_like=True, tag=12, frozen=True):
    id: int
    name: Name
    to: int | None = None


class Vaporize(msgspec.Struct, array_like=True, tag=13, frozen=True):
    id: int
    name: Name


# Since protocol 5, on reads: the registry clock the client has seen (the merge of the
# clocks its process's changes were answered with), or None. A node that lacks part of
# it holds the read while it pulls the changes, at most its ``read_wait`` (read your
# writes); a client sends one only to a node not known to hold all of it already.
SeenClock = VectorClock | None


class Describe(msgspec.Struct, array_like=True, tag=14, frozen=True):
    """What a client needs to build a callable: signature, version, timeout."""

    id: int
    name: Name
    version: int = 0
    with_source: bool = False
    clock: SeenClock = None


class ListVersions(msgspec.Struct, array_like=True, tag=15, frozen=True):
    id: int
    name: Name
    clock: SeenClock = None


class ListFunctions(msgspec.Struct, array_like=True, tag=16, frozen=True):
    id: int
    clock: SeenClock = None


class Lease(msgspec.Struct, array_like=True, tag=17, frozen=True):
    """Ask for a worker process to send calls to directly.

    With a ``name``, a route: a worker that can run that function's ``version`` (0: the
    current one; ``content_id`` says which body the caller validated against), on this
    node or, when this node cannot (it lacks the version, or cannot load its body), on a
    member that can (``Leased.node`` says whose). ``avoid``: nodes whose workers refused
    the call already (it did not run there).
    """

    id: int
    name: str = ""
    version: int = 0
    content_id: str = ""
    avoid: Annotated[list[Ident], msgspec.Meta(max_length=64)] = []
    # (5 too) A route's read your writes: the registry clock whose changes the worker
    # must see. A node forwarding a route lease of the current version sends its own
    # registry clock (merged with the client's, if it sent one); a node that does not
    # dominate it holds the lease as it holds a read, pulling what it lacks, and grants
    # it once it has the changes (or at its ``read_wait``, with what it holds). None: as
    # before (an older peer or client sends none, and an older node skips it).
    clock: SeenClock = None


class Release(msgspec.Struct, array_like=True, tag=18, frozen=True):
    id: int
    lease: int


class Status(msgspec.Struct, array_like=True, tag=19, frozen=True):
    id: int


class Shutdown(msgspec.Struct, array_like=True, tag=20, frozen=True):
    id: int


class PublishSet(msgspec.Struct, array_like=True, tag=21, frozen=True):
    """Publish a function set: its complete membership, as one registry change."""

    id: int
    name: Name
    members: Annotated[list[Publish], msgspec.Meta(max_length=MAX_SET_MEMBERS)]


class CurrentVersion(msgspec.Struct, array_like=True, tag=22, frozen=True):
    """The current version of a function or a set; answered with ``Moved``."""

    id: int
    name: Name
    clock: SeenClock = None


class Leave(msgspec.Struct, array_like=True, tag=23, frozen=True):
    """Leave the cluster for good, then stop (`scatter node leave`): once a live member
    holds every change this node holds, the node forgets itself (a registry change the
    members apply), says goodbye and stops; its data directory starts afresh, as a new
    node, if started again. Refused (nothing done) if no live member takes them."""

    id: int


class CatchUp(msgspec.Struct, array_like=True, tag=24, frozen=True):
    """Since protocol 5: answer (``CaughtUp``) once this node holds every registry change
    ``clock`` counts, pulling what it lacks from the members that made them, or after
    ``wait`` seconds (at most the node's ``read_wait``), whichever comes first.

    A client sends it before the first call through a node that has not shown it the
    changes its process saw: calls go to workers, which cannot wait for the registry.
    """

    id: int
    clock: VectorClock
    wait: Annotated[float, msgspec.Meta(ge=0)] = 0.0  # 0: the node's read_wait


class Relay(msgspec.Struct, array_like=True, tag=25, frozen=True):
    """Run ``call`` (a ``Call`` frame, as the client encoded and validated it) on a
    worker of ``node`` that can run function ``name`` (``version``, ``content_id``: as a
    route ``Lease`` names them), through this node: for a client that cannot reach that
    member's worker itself. The node leases one (its own if ``node`` is this node's id,
    else through the peer connection, ``PeerRequest``), sends it the frame unchanged,
    and answers ``Relayed`` with the worker's reply frame. ``node`` is the member whose
    clock the call's ``start_by`` is on (the client learned it from a route lease).
    ``wait``: the seconds the caller waits for the reply (its call's timeout)."""

    id: int
    node: Ident
    name: Name
    version: int
    content_id: Ident
    call: bytes
    wait: Annotated[float, msgspec.Meta(gt=0, le=1e6)]


class Forget(msgspec.Struct, array_like=True, tag=26, frozen=True):
    """Forget ``nodes`` (node ids) for good (`scatter node forget`): members that crashed
    and whose data directories are gone, so that they never act again. Refused unless
    each is dead or left and every other member is alive. Answered ``Done`` once the
    change is stored here; it spreads as any registry change."""

    id: int
    nodes: Annotated[list[Ident], msgspec.Meta(min_length=1, max_length=256)]


# ----- node to node (on the control socket, role "peer"; one-way) -----


class PeerGossip(msgspec.Struct, array_like=True, tag=70, frozen=True):
    """Membership messages (SWIM) from the node ``source`` listening at ``address``."""

    source: Ident
    address: Address
    messages: Annotated[list[Membership], msgspec.Meta(max_length=MAX_GOSSIP_MESSAGES)]


class PeerChanges(msgspec.Struct, array_like=True, tag=71, frozen=True):
    """Registry changes, and the bodies they bring that the receiver may lack."""

    source: Ident
    address: Address
    changes: Annotated[list[Change], msgspec.Meta(max_length=MAX_BATCH_CHANGES)]
    # {content_id: body}; the receiver checks each id
    bodies: Annotated[dict[Ident, bytes], msgspec.Meta(max_length=MAX_BATCH_CHANGES)]
    # A full state transfer (bounded history): the sender's snapshot, ``changes`` being
    # every change it holds on top; sent to a peer whose clock lies below the snapshot.
    snapshot: Snapshot | None = None


class PeerDigest(msgspec.Struct, array_like=True, tag=72, frozen=True):
    """Anti-entropy: the registry clock of ``source``; with ``reply``, send back yours."""

    source: Ident
    address: Address
    clock: VectorClock
    reply: bool
    # {content id: why}: bodies ``source`` learned it cannot load (a missing module,
    # another Python); bounded, most recent first. Receivers route calls elsewhere.
    cannot_load: Annotated[dict[Ident, Text], msgspec.Meta(max_length=MAX_CANNOT_LOAD)] = {}
    # The sender applies registry changes that forget members (ForgetOp): a node leaves,
    # or forgets a member, only once every live member says so (an older one would drop
    # every batch holding such a change, and never get past it).
    forgets: bool = False
    # Live versions the sender holds without their bodies (still to come): a node that
    # leaves hands over only to a member that holds every change and every body.
    missing_bodies: int = 0


class PeerRequest(msgspec.Struct, array_like=True, tag=73, frozen=True):
    """Serve ``payload`` (a client's ``Describe`` or route ``Lease``, as it arrived) for a
    client of ``source`` whose role is ``role``; answer with ``PeerReply`` (``ticket``).
    Never forwarded again by the receiver."""

    source: Ident
    address: Address
    ticket: int
    role: Ident
    payload: bytes


class PeerReply(msgspec.Struct, array_like=True, tag=74, frozen=True):
    """The reply to the ``PeerRequest`` numbered ``ticket``, encoded as the client gets it."""

    source: Ident
    ticket: int
    payload: bytes


class PeerBodiesWanted(msgspec.Struct, array_like=True, tag=75, frozen=True):
    """Send ``source`` the bodies of ``content_ids`` you hold (``PeerChanges`` without
    changes): versions it holds whose bodies did not fit the message that brought them."""

    source: Ident
    address: Address
    content_ids: Annotated[list[Ident], msgspec.Meta(max_length=MAX_BATCH_CHANGES)]


class PeerForgotten(msgspec.Struct, array_like=True, tag=76, frozen=True):
    """To a node the cluster forgot (``Forget``): ``source`` refuses its messages. ``node``
    is the id forgotten: a new node at a forgotten one's address ignores the notice."""

    source: Ident
    address: Address
    node: Ident = ""


PeerMessage = (
    PeerGossip
    | PeerChanges
    | PeerDigest
    | PeerRequest
    | PeerReply
    | PeerBodiesWanted
    | PeerForgotten
)

ControlRequest = (
    Relay
    | CatchUp
    | PeerRequest
    | PeerReply
    | Leave
    | PeerGossip
    | PeerChanges
    | PeerDigest
    | PeerBodiesWanted
    | PeerForgotten
    | Forget
    | CurrentVersion
    | PublishSet
    | Hello
    | Publish
    | Rollback
    | Vaporize
    | Describe
    | ListVersions
    | ListFunctions
    | Lease
    | Release
    | Status
    | Shutdown
)

# ----- control replies (node -> client) -----


class Welcome(msgspec.Struct, array_like=True, tag=30, frozen=True):
    id: int
    node_id: str
    protocol: int
    address: str


class Published(msgspec.Struct, array_like=True, tag=31, frozen=True):
    id: int
    name: str
    version: int
    content_id: str
    unchanged: bool  # identical to the current version: nothing was changed
    # Since protocol 5: the node's registry clock once the change was applied (for an
    # unchanged publish, its clock now): what the client's later reads must see.
    clock: VectorClock | None = None


class Moved(msgspec.Struct, array_like=True, tag=32, frozen=True):
    """The current pointer moved (rollback) or the function is gone (vaporize, version 0);
    also the answer to ``CurrentVersion``."""

    id: int
    name: str
    version: int
    # Since protocol 5: after a rollback or a vaporize, the node's registry clock once
    # applied; answering a CurrentVersion that carried a clock, see CaughtUp.clock.
    clock: VectorClock | None = None


class Description(msgspec.Struct, array_like=True, tag=33, frozen=True):
    id: int
    name: str
    version: int
    current_version: int
    content_id: str
    signature: bytes  # always b"" since protocol 3: a caller never unpickles a signature
    signature_text: str
    signature_id: str
    timeout: float  # effective: the function's own, else the node's default
    doc: str | None = None
    source: str | None = None
    signature_spec: bytes = b""  # the type description the caller rebuilds its checks from
    clock: VectorClock | None = None  # since protocol 5: see CaughtUp.clock


class Listing(msgspec.Struct, array_like=True, tag=34, frozen=True):
    """Rows for ``versions()`` / ``functions()``: the registry's own info records."""

    id: int
    rows: list[dict[str, Any]]
    clock: VectorClock | None = None  # since protocol 5: see CaughtUp.clock


class Leased(msgspec.Struct, array_like=True, tag=35, frozen=True):
    id: int
    lease: int
    endpoint: str  # tcp://, reachable wherever the node is
    local_endpoint: str = ""  # ipc://, for clients on the node's machine
    # The worker's slot in the shared slots file, which lies next to local_endpoint's
    # socket: a client on the node's machine claims the worker there for each call.
    slot: int = -1
    # The node whose worker this is: "" for the node asked; a member's id for a route
    # lease it forwarded (the worker's key is the cluster's, derived from its secret).
    node: str = ""
    # The granting node's CLOCK_MONOTONIC as it answered (0: an older node): the client
    # converts its calls' ``start_by`` into that clock, its workers' (at most once).
    # Not ``clock``: replies' ``clock`` fields are registry clocks (read your writes).
    monotonic: float = 0.0


class Done(msgspec.Struct, array_like=True, tag=36, frozen=True):
    id: int


class NodeStatus(msgspec.Struct, array_like=True, tag=37, frozen=True):
    id: int
    node_id: str
    address: str
    pid: int
    data_dir: str
    started_at: float
    functions: int
    versions: int
    workers: int
    busy_workers: int
    leases: int
    python: str
    scatter_version: str
    incarnation: int = 0  # how many times this node's data directory was started
    worker_start_failures: int = 0  # failed worker starts in a row (retried with back-off)
    worker_start_error: str = ""  # why the last one failed
    # [{node, address, state, incarnation, changes_behind}] of every member known,
    # this node included; changes_behind: -1 until the member sent its clock
    members: list[dict[str, Any]] = []
    changes: int = 0  # registry changes applied here
    replica_hash: str = ""  # Registry.replica_hash(): equal on replicas holding the same changes
    pending_changes: int = 0  # changes held, waiting for their causal past
    # Bounded history: changes folded into the snapshot; changes in the log every member
    # has seen, to be folded next (-1: a member's clock is not known yet); changes refused
    # as void (sorting before the snapshot's end, from a node away past the grace).
    compacted_changes: int = 0
    stable_changes: int = 0
    void_changes: int = 0
    # Seconds since the node started, on its monotonic clock: started_at is its wall
    # clock's, and a wall clock stepped since (NTP) would make their difference lie.
    uptime: float = 0.0
    max_workers: int = 0
    # Every worker busy and no more may start: new calls wait for one to finish.
    saturated: bool = False
    queued: int = 0  # leases that waited or were given a busy worker while saturated
    # Bounded history: changes folded that the snapshot keeps for members that have not
    # seen them (Snapshot.unconfirmed): grows while a member is away, until it is back,
    # leaves, or is forgotten (`scatter node forget`).
    unconfirmed_changes: int = 0
    # Live versions whose bodies this node has not received yet (they did not fit the
    # message that brought them): asked of the members; calls to them run elsewhere.
    missing_bodies: int = 0
    # Node ids of the members this node's registry forgot (their messages are refused).
    forgotten: list[str] = []
    # The member that told this node the cluster forgot it ("" if none did): it refuses
    # changes, and must start again with a new data directory to rejoin.
    forgotten_by: str = ""


class CaughtUp(msgspec.Struct, array_like=True, tag=38, frozen=True):
    """The answer to ``CatchUp``. Its clock dominates the one asked for, unless the node
    gave up waiting (the changes had not reached it)."""

    id: int
    # The node's registry clock, plus the entries of the request's clock that name nodes
    # it never heard of (another cluster's changes, which it will never hold). The same
    # in a read's reply (Description, Listing, Moved) when the read carried a clock.
    clock: VectorClock


class Relayed(msgspec.Struct, array_like=True, tag=39, frozen=True):
    """The answer to ``Relay``: the worker's reply frame (``Result`` or ``Failure``),
    unchanged, or a ``Failure`` the relaying node made (``expired``, ``duplicate``, a
    worker lost mid-call: ``timeout`` with the call maybe run)."""

    id: int
    reply: bytes


ControlReply = (
    Relayed
    | Welcome
    | Published
    | Moved
    | Description
    | Listing
    | Leased
    | Done
    | NodeStatus
    | Failure
    | CaughtUp
)

WorkerReply = Result | Failure
StreamReply = Yielded | Result | Failure
StreamControl = More | Cancel

control_request_decoder = msgspec.msgpack.Decoder(ControlRequest)
control_reply_decoder = msgspec.msgpack.Decoder(ControlReply)
call_decoder = msgspec.msgpack.Decoder(Call)
worker_reply_decoder = msgspec.msgpack.Decoder(WorkerReply)
stream_reply_decoder = msgspec.msgpack.Decoder(StreamReply)
stream_control_decoder = msgspec.msgpack.Decoder(StreamControl)
encoder = msgspec.msgpack.Encoder()
