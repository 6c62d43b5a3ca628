"""Run here, or forward: what a node knows it cannot load, and the requests it forwards.

Pure, as the node core that holds it (``_node.py``): no I/O, no clock reads.

A call reaches a worker of the client's node first (the fast path). When that node
cannot run it (it lacks the version, or cannot load the body: a module the function
imports is missing here, or the body was pickled by another Python major.minor), the
client asks its node for a *route* (a ``Lease`` naming the function). The node then
leases one of its own workers if it can run the call after all, else forwards the
request, as it arrived, to one member after another (``PeerRequest``) until one grants
a worker of its own (``Leased.node`` names it) or all have said why they cannot. A
pinned ``Describe`` of a version this node lacks is forwarded the same way.

What a node cannot load it learns from its workers (a worker that fails to unpickle a
body reports it, ``NodeCore.worker_cannot_load``) and from the record itself (its
``python``), keeps in a small bounded table (:class:`CannotLoad`), and tells every live
member at once and with every anti-entropy digest (``PeerDigest.cannot_load``): later
routes go straight to a member that can, and an error for a call nobody can run names
each member's reason (:func:`nobody_can_run`).
"""

from __future__ import annotations

import collections
from collections.abc import Mapping
from dataclasses import dataclass, field

# Entries a node keeps of what it cannot load (its own), and of each peer's.
MAX_CANNOT_LOAD_ENTRIES = 256
# Seconds a member gets to answer a forwarded request before the next one is asked.
FORWARD_TIMEOUT = 10.0
# Seconds a route that nobody can serve waits for the reasons of members whose workers
# refused the call (they report them right after) before it answers without them.
REASON_WAIT = 1.0
# Failure kinds after which the next member is asked: the request did not run there.
RETRY_KINDS = ("load", "not_found", "version_not_found")


class CannotLoad:
    """{content id: why} this node cannot load, and what each peer said of its own.

    Bounded: the oldest entries go first (a body that cannot load here stays so, but a
    table of every body ever refused would grow with history).
    """

    def __init__(self, limit: int = MAX_CANNOT_LOAD_ENTRIES) -> None:
        self.limit = limit
        self.mine: collections.OrderedDict[str, str] = collections.OrderedDict()
        self.peers: dict[str, collections.OrderedDict[str, str]] = {}

    def learn(self, content_id: str, reason: str) -> bool:
        """Record that this node cannot load ``content_id``; True if it is news."""
        news = self.mine.get(content_id) != reason
        self.mine[content_id] = reason
        self.mine.move_to_end(content_id)
        while len(self.mine) > self.limit:
            self.mine.popitem(last=False)
        return news

    def heard(self, node: str, entries: Mapping[str, str]) -> None:
        """What ``node`` said it cannot load (its digest's table, the latest first)."""
        if not entries:
            return
        table = self.peers.setdefault(node, collections.OrderedDict())
        for content_id, reason in entries.items():
            table[content_id] = reason
            table.move_to_end(content_id)
        while len(table) > self.limit:
            table.popitem(last=False)

    def reason(self, node: str, content_id: str) -> str:
        """Why ``node`` cannot load ``content_id``, or "" (as far as this node knows)."""
        table = self.peers.get(node)
        return table.get(content_id, "") if table is not None else ""

    def recent(self, count: int) -> dict[str, str]:
        """The ``count`` most recent entries of this node's own table, for a digest."""
        items = list(self.mine.items())[-count:]
        return dict(reversed(items))


def python_problem(body_python: str, node_python: str) -> str:
    """Why a body pickled under ``body_python`` cannot load under ``node_python``, or ""
    (cloudpickle bodies load only on the same major.minor)."""
    body, node = _major_minor(body_python), _major_minor(node_python)
    if not body or not node or body == node:
        return ""
    return f"Python {body} body on Python {node}"


def _major_minor(version: str) -> str:
    parts = version.split(".")
    return ".".join(parts[:2]) if len(parts) >= 2 and all(p.isdigit() for p in parts[:2]) else ""


@dataclass
class Forward:
    """A client's request forwarded to members, one after another."""

    peer: bytes  # the client's ROUTER identity
    request_id: int
    payload: bytes  # the request, as the members get it
    role: str
    what: str  # "describe" or "lease"
    content_id: str  # the body at stake ("" when this node lacks the version)
    own_failure: bytes  # this node's own answer, given when nobody can do better
    candidates: list[tuple[str, str]]  # (node, address) still to ask, in order
    reasons: dict[str, str] = field(default_factory=dict)  # {node: why it cannot}
    load_failures: int = 0  # members (this one included) that hold it but cannot load it
    asked: tuple[str, str] = ("", "")  # (node, address) asked now
    deadline: float = 0.0


# Relayed calls (``Relay``): how many call ids a node remembers having relayed, and for
# how long (seconds past the caller's wait): a repeat is answered ``duplicate``.
MAX_RELAYED_IDS = 1 << 16
REMEMBER_RELAYED_FOR = 60.0


@dataclass
class Relaying:
    """A client's ``Relay`` while its worker is leased (a stand-in identity waits)."""

    peer: bytes  # the client's ROUTER identity
    request_id: int
    role: str
    call: bytes  # the Call frame, as the client encoded it
    call_id: int
    wait: float  # seconds the caller waits for the reply


class RelayedIds:
    """The (caller, call id) pairs a node relayed lately: a call it relayed once is
    never relayed again (at most once), whatever its client retries. Bounded in count
    and time, oldest first."""

    def __init__(self, limit: int = MAX_RELAYED_IDS) -> None:
        self.limit = limit
        self._seen: set[tuple[bytes, int]] = set()
        self._order: collections.deque[tuple[float, tuple[bytes, int]]] = collections.deque()

    def admit(self, caller: bytes, call_id: int, until: float, now: float) -> bool:
        """Remember the pair until ``until``; False if it was relayed before."""
        key = (caller, call_id)
        if key in self._seen:
            return False
        order = self._order
        while order and (order[0][0] < now or len(order) >= self.limit):
            self._seen.discard(order.popleft()[1])
        self._seen.add(key)
        order.append((until, key))
        return True


def nobody_can_run(what: str, reasons: Mapping[str, str]) -> str:
    """One message for a call that no member can run, grouped by reason::

        add v3 cannot run on any member: missing module `numpy` on nodes a, b;
        Python 3.12 body on Python 3.11 on node c
    """
    by_reason: dict[str, list[str]] = {}
    for node, reason in reasons.items():
        by_reason.setdefault(reason, []).append(node)
    parts = [
        f"{reason} on node{'s' if len(nodes) > 1 else ''} {', '.join(sorted(nodes))}"
        for reason, nodes in by_reason.items()
    ]
    return f"{what} cannot run on any member: {'; '.join(parts)}"
