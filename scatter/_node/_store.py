"""The node's diskcache replica of the registry: the only thing a node persists.

Keys, and nothing else ever (``test_store_holds_registry_entries_only`` checks it):

* ``"format"``: the layout version below (``STORE_FORMAT``);
* ``"identity"``: this node's :class:`NodeIdentity`;
* ``("change", change_id)``: every registry change, the log the registry replays at start.
  Changes carry version records, never bodies;
* ``("body", content_id)`` and ``("record", content_id)``: a body and the record a worker
  loads it with, stored once per content id whatever the number of versions or names
  that use it, and deleted once no live version does;
* ``("fn", name)``: the view workers resolve a name with (``FunctionView``), derived from
  the registry: rewritten for the names a change moved, reconciled at every start;
* ``"members"``: the cluster's members as last seen, so a restarted node rejoins;
* ``"snapshot"``: the registry's state of the changes compacted away (bounded history,
  ``Snapshot``); the ``("change", id)`` keys are then only the changes on top of it. A
  store without one (format 2) loads as before: its log is the whole history.
* ``"void"``: what the registry refused as void (``Registry.void``, {writer: lowest
  counter}), so that a restart keeps refusing it; absent while nothing was.

Arguments and results are never written here, nor logged.

Every method that writes runs one diskcache (sqlite) transaction: all of it or none.
The node calls them from a thread, never from its Trio loop.
"""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Iterable, Mapping
from pathlib import Path

import diskcache
import msgspec

from .._core._membership import MemberInfo
from .._core._registry import Change, FunctionView, Snapshot, VersionRecord, snapshot_decoder

# 1: changes embedded bodies, records by content id with bodies, ("fn", name) entries
#    of [current, {number: content_id}], "node_id" (the single-node releases).
# 2: bodies once by content id, changes without bodies, views, an identity.
# 3: a "snapshot" key may hold what compaction folded (format 2 loads as is: no snapshot).
STORE_FORMAT = 3


class NodeIdentity(msgspec.Struct, frozen=True, kw_only=True):
    """Who this node is, and where its data directory was when it last started."""

    node_id: str  # stable across restarts of this data directory, here
    incarnation: int  # starts counted, this one included
    # The data directory's place ("<machine id>:<device>:<inode>"). A copy elsewhere
    # (another machine, another directory, a backup restored into a new directory) sees
    # another place and takes a new id, so two live nodes never share one. A cloned VM
    # keeps machine id and inode: clone it, then give it a new /etc/machine-id.
    home: str
    # Ids this directory's node had before it left its cluster and started afresh: the
    # new node forgets them once it has joined, should the cluster not have yet (rule 10
    # of _core/_node.py: the replica they acted with is gone).
    former: tuple[str, ...] = ()


_encoder = msgspec.msgpack.Encoder()
_change_decoder = msgspec.msgpack.Decoder(Change)
_record_decoder = msgspec.msgpack.Decoder(VersionRecord)
_void_decoder = msgspec.msgpack.Decoder(dict[str, int])
_view_decoder = msgspec.msgpack.Decoder(FunctionView)
_identity_decoder = msgspec.msgpack.Decoder(NodeIdentity)
_members_decoder = msgspec.msgpack.Decoder(list[MemberInfo])


class RegistryStore:
    """A diskcache directory holding one node's registry replica.

    Safe to open from several processes: the node writes, its workers read.
    """

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        # No eviction: a registry is not a cache, losing an entry would lose a version.
        self._cache = diskcache.Cache(str(directory), eviction_policy="none", size_limit=2**62)
        self.previous_node_id = ""  # the id this directory's node had before this start

    def close(self) -> None:
        self._cache.close()

    # -- the node, at start --

    def open_as_node(self) -> tuple[NodeIdentity, str]:
        """Bring an older layout up to date and count this start; (identity, notice).

        The notice is "" or one line for the node's log (a copied data directory).
        """
        with self._cache.transact():
            if self._cache.get("format") is None:
                self._upgrade_from_format_1()
            found = self._cache.get("identity")
            home = _home_of(self.directory)
            notice = ""
            if found is None:
                identity = NodeIdentity(node_id=_new_node_id(), incarnation=1, home=home)
            else:
                old = _identity_decoder.decode(found)
                self.previous_node_id = old.node_id
                if old.home == home:
                    identity = NodeIdentity(
                        node_id=old.node_id,
                        incarnation=old.incarnation + 1,
                        home=home,
                        former=old.former,
                    )
                else:
                    identity = NodeIdentity(
                        node_id=_new_node_id(), incarnation=1, home=home, former=old.former
                    )
                    notice = (
                        f"this data directory was node {old.node_id} elsewhere (copied or "
                        f"moved); this node takes the new id {identity.node_id} so that "
                        "two nodes never share one"
                    )
            self._cache.set("identity", _encoder.encode(identity))
            self._cache.set("format", STORE_FORMAT)
        return identity, notice

    def start_afresh(self) -> tuple[NodeIdentity, str]:
        """The node of this directory left its cluster for good (its registry forgot it):
        drop its replica, keep the members it knew (to rejoin through), take a new id."""
        with self._cache.transact():
            old = _identity_decoder.decode(self._cache["identity"])
            gone = {old.node_id, self.previous_node_id, *old.former} - {""}
            members = [m for m in self.members() if m.node not in gone]
            self._cache.clear()
            self._cache.set("members", _encoder.encode(members))
            identity = NodeIdentity(
                node_id=_new_node_id(), incarnation=1, home=old.home, former=tuple(sorted(gone))
            )
            self._cache.set("identity", _encoder.encode(identity))
            self._cache.set("format", STORE_FORMAT)
        notice = (
            f"node {old.node_id} of this data directory left its cluster for good; it "
            f"starts empty as the new node {identity.node_id}, joins through the members "
            "it knew, and makes sure they forgot the old one"
        )
        return identity, notice

    def _upgrade_from_format_1(self) -> None:
        node_id = self._cache.get("node_id")
        for key in list(self._cache.iterkeys()):
            if not isinstance(key, tuple):
                continue
            if key[0] == "record":
                old = msgspec.msgpack.decode(self._cache[key])
                body = old.pop("body", b"")
                self._cache.set(("body", key[1]), body)
                self._cache.set(key, _encoder.encode(msgspec.convert(old, VersionRecord)))
            elif key[0] == "fn":
                self._cache.delete(key)  # views are derived: the node reconciles them
            elif key[0] == "change":
                # Format 1 embedded each body in its change: decoding with today's record
                # drops it (the body is kept once, under ("body", id), above).
                self._cache.set(key, _encoder.encode(_change_decoder.decode(self._cache[key])))
        if isinstance(node_id, str):
            self._cache.delete("node_id")
            identity = NodeIdentity(node_id=node_id, incarnation=0, home=_home_of(self.directory))
            self._cache.set("identity", _encoder.encode(identity))

    def load(self) -> tuple[list[Change], dict[str, FunctionView], set[str]]:
        """(changes, views, body ids), without the snapshot: see :meth:`load_replica`."""
        _snapshot, changes, views, bodies = self.load_replica()
        return changes, views, bodies

    def load_replica(self) -> tuple[Snapshot, list[Change], dict[str, FunctionView], set[str]]:
        """(snapshot, changes on top of it, views, body ids): what the node starts from,
        in one read transaction.

        One pass over the keys, in one transaction: three passes, each read its own
        implicit transaction, took 1.7x as long at 10,000 changes.
        """
        changes: list[Change] = []
        views: dict[str, FunctionView] = {}
        bodies: set[str] = set()
        with self._cache.transact():
            raw = self._cache.get("snapshot")
            snapshot = Snapshot() if raw is None else snapshot_decoder.decode(raw)
            for key in self._cache.iterkeys():
                if not isinstance(key, tuple):
                    continue
                kind = key[0]
                if kind == "change":
                    changes.append(_change_decoder.decode(self._cache[key]))
                elif kind == "fn":
                    views[key[1]] = _view_decoder.decode(self._cache[key])
                elif kind == "body":
                    bodies.add(key[1])
        return snapshot, changes, views, bodies

    def changes(self) -> list[Change]:
        return self.load()[0]

    def void(self) -> dict[str, int]:
        """What the registry refused as void (``Registry.void``); {} if nothing."""
        raw = self._cache.get("void")
        return {} if raw is None else _void_decoder.decode(raw)

    def _put_void(self, void: Mapping[str, int] | None) -> None:
        if void is None:
            return
        if void:
            self._cache.set("void", _encoder.encode(dict(void)))
        else:
            self._cache.delete("void")

    def members(self) -> list[MemberInfo]:
        raw = self._cache.get("members")
        if raw is None:
            return []
        try:
            return _members_decoder.decode(raw)
        except msgspec.DecodeError:
            return []  # a table from another release: the node learns it again

    def commit_members(self, members: Iterable[MemberInfo]) -> None:
        self._cache.set("members", _encoder.encode(list(members)))

    # -- the node, for every change (from a thread) --

    def commit_changes(
        self,
        changes: Iterable[Change],
        bodies: Mapping[str, tuple[VersionRecord, bytes]],
        dropped: Iterable[str] = (),
        *,
        void: Mapping[str, int] | None = None,
    ) -> None:
        """Persist changes with the bodies they bring (``{content_id: (record, body)}``);
        delete the changes ``dropped`` (held pending on a change refused as void); store
        ``void`` (what the registry refused as void) unless None."""
        with self._cache.transact():
            self._put_void(void)
            for change_id in dropped:
                self._cache.delete(("change", change_id))
            for content_id, (record, body) in bodies.items():
                if ("body", content_id) not in self._cache:
                    self._cache.set(("record", content_id), _encoder.encode(record))
                    self._cache.set(("body", content_id), body)
            for change in changes:
                self._cache.set(("change", change.change_id), _encoder.encode(change))

    def commit_snapshot(
        self,
        snapshot: Snapshot,
        *,
        dropped: Iterable[str] = (),
        changes: Iterable[Change] = (),
        bodies: Mapping[str, tuple[VersionRecord, bytes]] | None = None,
        replace: bool = False,
        void: Mapping[str, int] | None = None,
    ) -> None:
        """Store a new snapshot, in one transaction: delete the changes it folded
        (``dropped``); for a full state transfer (``replace``) delete every change and
        store ``changes`` (and the ``bodies`` they and the snapshot bring) instead;
        store ``void`` unless None."""
        with self._cache.transact():
            self._put_void(void)
            for content_id, (record, body) in (bodies or {}).items():
                if ("body", content_id) not in self._cache:
                    self._cache.set(("record", content_id), _encoder.encode(record))
                    self._cache.set(("body", content_id), body)
            if replace:
                dropped = [
                    key[1]
                    for key in list(self._cache.iterkeys())
                    if isinstance(key, tuple) and key[0] == "change"
                ]
            for change_id in dropped:
                self._cache.delete(("change", change_id))
            for change in changes:
                self._cache.set(("change", change.change_id), _encoder.encode(change))
            self._cache.set("snapshot", _encoder.encode(snapshot))

    def commit_views(
        self, views: Mapping[str, FunctionView | None], dropped_bodies: Iterable[str] = ()
    ) -> None:
        """Write the workers' views of names (None: delete), and delete unused bodies."""
        with self._cache.transact():
            for name, view in views.items():
                if view is None:
                    self._cache.delete(("fn", name))
                else:
                    self._cache.set(("fn", name), _encoder.encode(view))
            for content_id in dropped_bodies:
                self._cache.delete(("body", content_id))
                self._cache.delete(("record", content_id))

    # -- workers --

    def view(self, name: str) -> FunctionView | None:
        raw = self._cache.get(("fn", name))
        return None if raw is None else _view_decoder.decode(raw)

    def record(self, content_id: str) -> VersionRecord | None:
        raw = self._cache.get(("record", content_id))
        return None if raw is None else _record_decoder.decode(raw)

    def body(self, content_id: str) -> bytes | None:
        raw = self._cache.get(("body", content_id))
        return raw if isinstance(raw, bytes) else None


def _new_node_id() -> str:
    return secrets.token_hex(6)


def _machine_id() -> str:
    for path in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        try:
            with open(path) as f:
                found = f.read().strip()
        except OSError:
            continue
        if found:
            return found
    return socket.gethostname()


def _home_of(directory: Path) -> str:
    stat = os.stat(directory)
    return f"{_machine_id()}:{stat.st_dev}:{stat.st_ino}"
