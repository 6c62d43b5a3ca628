"""Every message Scatter sends, as msgspec Structs: the versioned wire contract.

Two conversations use it:

* client <-> node (the node's ROUTER at its address): control requests such as
  ``Publish``, ``Lease`` or ``Versions``, each answered by one reply;
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

# Protocol versions and what each added:
#   1: calls, control requests, leases of worker processes (the single-node protocol).
#   2: CURVE on every TCP connection, roles (Failure kind "forbidden"), node-computed
#      content ids, NodeStatus incarnation and worker start failures.
PROTOCOL_VERSION_MIN = 2
PROTOCOL_VERSION_MAX = 2
PROTOCOL_VERSION = PROTOCOL_VERSION_MAX

# ----- limits: what one peer may make a node or a worker hold -----
#
# The frame size (``MAX_MESSAGE_BYTES`` in _config.py, 64 MiB, checked before decoding)
# bounds every frame; msgspec also checks each length header against the bytes left before
# allocating (measured: a 5-byte frame declaring 2**32 items is refused in microseconds),
# so no header can make a decoder allocate beyond the frame. These bound what a frame may
# carry into the registry, which keeps all of it, and into the logs and views.

# Function and set names: identifiers in practice; they key the store, the views and
# every log line. 256 characters is 10x the longest name in any codebase we looked at.
MAX_NAME_CHARS = 256
# Node, writer, change, content and signature ids: ours are 12 to ~40 ASCII characters
# (a writer id is "<node id>.<start>.<random>", a change id that plus ":<counter>").
MAX_ID_CHARS = 128
# Other short strings a registry keeps for every version: the Python version of the
# publisher, the signature's text (a long parameter list is a few hundred characters).
MAX_TEXT_CHARS = 64 * 1024
# Members in one PublishSet, and so in one PublishSetOp: a set is a module's worth of
# functions published together; each member costs a record and a view on every node.
MAX_SET_MEMBERS = 1024
# Ops in one registry Change: a set publish is one op per member plus the set's own.
MAX_CHANGE_OPS = MAX_SET_MEMBERS + 1
# Entries in one vector clock: one per writer that ever made a change, and a node takes
# a new writer id at every start. 16,384 is 4 years of daily restarts of a 10-node
# cluster that publishes from every node; past it a change is refused (an operator
# problem worth hearing about, not a reason to let a peer send clocks of 10^6 entries).
MAX_CLOCK_ENTRIES = 16 * 1024
# Changes in one gossip or anti-entropy batch: a peer behind by more asks again.
MAX_BATCH_CHANGES = 4096
# Frames one peer may queue in a node's control ROUTER or a worker's ROUTER, not read yet
# (ZMQ_RCVHWM; libzmq's default is 1,000, so 1,000 x MAX_MESSAGE_BYTES per peer). A
# full queue stops reading that peer's connection (backpressure, nothing is lost): a
# client keeps one control request in flight per socket and pipelines at most
# MAX_PIPELINED_CALLS calls, the rest wait in its own send queue and in the kernel.
# Not bounded by anything here: libzmq counts whole messages, so a peer writing raw
# ZMTP can grow ONE unfinished multipart message without bound (measured: +1 MiB of RSS
# per MiB sent; MAXMSGSIZE is per part). Only peers that completed the CURVE handshake
# reach these sockets on TCP, and only the user on the Unix sockets.
PEER_QUEUE_FRAMES = 16
# Calls one client connection keeps in flight at most (the client's map pipelining).
MAX_PIPELINED_CALLS = 32
# Replies queued for one peer, not yet written to its connection (ZMQ_SNDHWM). A ROUTER
# DROPS a reply past it, and libzmq learns what its I/O thread wrote in batches, so it
# must exceed what one honest peer can have outstanding: MAX_PIPELINED_CALLS, twice.
# (16 lost replies under map's bursts; measured by test_map.)
PEER_REPLY_FRAMES = 2 * MAX_PIPELINED_CALLS
# Nesting depth of msgpack values: msgspec decodes nested containers recursively and
# guards each level with Py_EnterRecursiveCall, so a frame nested deeper than the
# interpreter's recursion limit raises RecursionError (100,000 nested arrays: refused in
# ~20 us by every decoder here). That is a decode error like any other (DECODE_ERRORS).
# On Python 3.11 the guard is sys.getrecursionlimit(), which a function may raise
# (sys.setrecursionlimit(10**6) is common): then the same frame overflows the C stack
# and kills the worker (measured: SIGSEGV). So a worker decodes with the limit at most
# MAX_DECODE_RECURSION (the interpreter's default), and a control frame, whose Structs
# nest 3 deep, can never need more. 3.12+ has a fixed C recursion limit of its own.
MAX_DECODE_RECURSION = 1000

# What a decoder raises for a frame it refuses.
DECODE_ERRORS = (msgspec.DecodeError, msgspec.ValidationError, RecursionError)

Name = Annotated[str, msgspec.Meta(max_length=MAX_NAME_CHARS)]
Ident = Annotated[str, msgspec.Meta(max_length=MAX_ID_CHARS)]
Text = Annotated[str, msgspec.Meta(max_length=MAX_TEXT_CHARS)]


class Call(msgspec.Struct, array_like=True, tag=1, frozen=True):
    """Run ``name`` with ``args`` (the msgpack map made by ``CallSpec.encode_arguments``)."""

    id: int  # echoed in the reply, so a late reply to an abandoned call is never mistaken
    name: Name
    version: int  # pinned version, or 0: the current one
    known_version: int  # the version whose signature the caller validated against
    signature_id: Ident  # that version's signature id; "" skips the signature check
    timeout: float  # seconds; 0: the function's own timeout, else the node's default
    args: msgspec.Raw


class Result(msgspec.Struct, array_like=True, tag=2, frozen=True):
    id: int
    version: int  # the version that ran: a body-only update moves callers along
    value: msgspec.Raw


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


# ----- control requests (client -> node) -----


class Hello(msgspec.Struct, array_like=True, tag=10, frozen=True):
    id: int
    protocol: int = PROTOCOL_VERSION


class Publish(msgspec.Struct, array_like=True, tag=11, frozen=True):
    id: int
    name: Name
    body: bytes  # cloudpickle of the function, by value
    signature: bytes  # cloudpickle of its inspect.Signature (annotations, defaults)
    signature_text: Text
    signature_id: Ident
    content_id: Ident  # the publisher's code id (VersionRecord.code_id)
    source: str | None = None
    doc: str | None = None
    python: Ident = ""
    timeout: float | None = None


class Rollback(msgspec.Struct, array_like=True, tag=12, frozen=True):
    id: int
    name: Name
    to: int | None = None


class Vaporize(msgspec.Struct, array_like=True, tag=13, frozen=True):
    id: int
    name: Name


class Describe(msgspec.Struct, array_like=True, tag=14, frozen=True):
    """What a client needs to build a callable: signature, version, timeout."""

    id: int
    name: Name
    version: int = 0
    with_source: bool = False


class ListVersions(msgspec.Struct, array_like=True, tag=15, frozen=True):
    id: int
    name: Name


class ListFunctions(msgspec.Struct, array_like=True, tag=16, frozen=True):
    id: int


class Lease(msgspec.Struct, array_like=True, tag=17, frozen=True):
    """Ask for a worker process to send calls to directly."""

    id: int


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


ControlRequest = (
    CurrentVersion
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


class Moved(msgspec.Struct, array_like=True, tag=32, frozen=True):
    """The current pointer moved (rollback) or the function is gone (vaporize, version 0)."""

    id: int
    name: str
    version: int


class Description(msgspec.Struct, array_like=True, tag=33, frozen=True):
    id: int
    name: str
    version: int
    current_version: int
    content_id: str
    signature: bytes
    signature_text: str
    signature_id: str
    timeout: float  # effective: the function's own, else the node's default
    doc: str | None = None
    source: str | None = None


class Listing(msgspec.Struct, array_like=True, tag=34, frozen=True):
    """Rows for ``versions()`` / ``functions()``: the registry's own info records."""

    id: int
    rows: list[dict[str, Any]]


class Leased(msgspec.Struct, array_like=True, tag=35, frozen=True):
    id: int
    lease: int
    endpoint: str  # tcp://, reachable wherever the node is
    local_endpoint: str = ""  # ipc://, for clients on the node's machine


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


ControlReply = (
    Welcome | Published | Moved | Description | Listing | Leased | Done | NodeStatus | Failure
)

WorkerReply = Result | Failure

control_request_decoder = msgspec.msgpack.Decoder(ControlRequest)
control_reply_decoder = msgspec.msgpack.Decoder(ControlReply)
call_decoder = msgspec.msgpack.Decoder(Call)
worker_reply_decoder = msgspec.msgpack.Decoder(WorkerReply)
encoder = msgspec.msgpack.Encoder()
