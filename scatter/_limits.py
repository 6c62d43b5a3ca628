"""Limits on what one peer may make a node or a worker hold, checked by decoding.

Every wire message (``_wire.py``) and every registry record (``_core/_registry.py``,
``_core/_vclock.py``) is typed with these, so msgspec refuses an oversized field while
decoding, before anything is kept. Kept apart from ``_wire.py`` because the registry's
records, which the wire carries, need them too.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

__all__ = [
    "DECODE_ERRORS",
    "MAX_ADDRESS_CHARS",
    "MAX_BATCH_CHANGES",
    "MAX_CHANGE_OPS",
    "MAX_CLOCK_ENTRIES",
    "MAX_DECODE_RECURSION",
    "MAX_GOSSIP_MESSAGES",
    "MAX_ID_CHARS",
    "MAX_NAME_CHARS",
    "MAX_PIPELINED_CALLS",
    "MAX_SET_MEMBERS",
    "MAX_TEXT_CHARS",
    "PEER_QUEUE_FRAMES",
    "PEER_REPLY_FRAMES",
    "REPLY_SEND_TIMEOUT_MS",
    "Address",
    "Ident",
    "Name",
    "Text",
]
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
# Replies queued for one peer, not yet written to its connection (ZMQ_SNDHWM). libzmq
# learns what its I/O thread wrote in batches, so this must well exceed what one honest
# peer can have outstanding (MAX_PIPELINED_CALLS): at 2x, replies were still dropped
# under a loaded machine (the benchmark's map: "reply 8285 to call 8274"). A worker's
# ROUTER is also ROUTER_MANDATORY, so a full queue makes the worker wait (up to
# REPLY_SEND_TIMEOUT) instead of dropping a reply silently.
PEER_REPLY_FRAMES = 8 * MAX_PIPELINED_CALLS
# Milliseconds a worker waits for room in a peer's reply queue before it gives that
# reply up (a client that stopped reading): the call's caller then times out.
REPLY_SEND_TIMEOUT_MS = 5000
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

# SWIM messages in one PeerGossip packet: a probe plus piggybacked news (16 at most from
# an honest node, MembershipConfig.max_piggyback).
MAX_GOSSIP_MESSAGES = 256
# An address: tcp://HOST:PORT.
MAX_ADDRESS_CHARS = 512

Name = Annotated[str, msgspec.Meta(max_length=MAX_NAME_CHARS)]
Address = Annotated[str, msgspec.Meta(max_length=MAX_ADDRESS_CHARS)]
Ident = Annotated[str, msgspec.Meta(max_length=MAX_ID_CHARS)]
Text = Annotated[str, msgspec.Meta(max_length=MAX_TEXT_CHARS)]


