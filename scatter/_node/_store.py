"""The node's diskcache replica of the registry: the only thing a node persists.

Keys, and nothing else ever (``test_store_holds_registry_entries_only`` checks it):

* ``"node_id"``: this node's identity, made once;
* ``("change", change_id)``: every registry change, the log the registry replays at start;
* ``("record", content_id)``: version records (bodies), immutable;
* ``("fn", name)``: the lookup entry workers read: current number and live versions.

Arguments and results are never written here, nor logged.

A change, its records and the lookup entries it moves are written in one diskcache
transaction: a worker reading after the generation bump sees all of a change or none.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from pathlib import Path

import diskcache
import msgspec

from .._core._registry import Change, VersionRecord


class LookupEntry(msgspec.Struct, frozen=True, array_like=True):
    """What a worker needs to find a function's body: current number and live versions."""

    current: int  # 0: no current version (retired from its set)
    versions: dict[int, str]  # {version number: content_id}


_encoder = msgspec.msgpack.Encoder()
_change_decoder = msgspec.msgpack.Decoder(Change)
_record_decoder = msgspec.msgpack.Decoder(VersionRecord)
_entry_decoder = msgspec.msgpack.Decoder(LookupEntry)


class RegistryStore:
    """A diskcache directory holding one node's registry replica.

    Safe to open from several processes: the node writes, its workers read.
    """

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        # No eviction: a registry is not a cache, losing an entry would lose a version.
        self._cache = diskcache.Cache(str(directory), eviction_policy="none", size_limit=2**62)

    def close(self) -> None:
        self._cache.close()

    def node_id(self) -> str:
        """This node's persistent identity, created on first use."""
        existing = self._cache.get("node_id")
        if isinstance(existing, str):
            return existing
        new = uuid.uuid4().hex[:12]
        # add() keeps the first writer's id if two processes race here.
        self._cache.add("node_id", new)
        return str(self._cache.get("node_id"))

    def changes(self) -> list[Change]:
        out: list[Change] = []
        for key in self._cache.iterkeys():
            if isinstance(key, tuple) and key[0] == "change":
                out.append(_change_decoder.decode(self._cache[key]))
        return out

    def commit(
        self,
        changes: Iterable[Change],
        records: Iterable[VersionRecord],
        entries: dict[str, LookupEntry | None],
    ) -> None:
        """Write changes, their records and the moved lookup entries atomically."""
        with self._cache.transact():
            for change in changes:
                self._cache.set(("change", change.change_id), _encoder.encode(change))
            for record in records:
                key = ("record", record.content_id)
                if key not in self._cache:
                    self._cache.set(key, _encoder.encode(record))
            for name, entry in entries.items():
                if entry is None:
                    self._cache.delete(("fn", name))
                else:
                    self._cache.set(("fn", name), _encoder.encode(entry))

    def entry(self, name: str) -> LookupEntry | None:
        raw = self._cache.get(("fn", name))
        return None if raw is None else _entry_decoder.decode(raw)

    def record(self, content_id: str) -> VersionRecord | None:
        raw = self._cache.get(("record", content_id))
        return None if raw is None else _record_decoder.decode(raw)
