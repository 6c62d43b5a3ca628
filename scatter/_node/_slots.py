"""Shared memory between a node and its worker processes.

A small memory-mapped file under the node's runtime directory. It carries no arguments
and no results, only what lets the node supervise without a message per call:

* the registry generation: the node bumps it after every committed registry change; a
  worker compares it before each call and drops its name lookups when it moved. Reading
  8 bytes costs far less than a control message, so calls pay nothing for freshness.
* one slot per worker: the number of the call it runs and that call's deadline
  (``time.monotonic()``, shared by all processes of a machine; 0.0 when idle). The
  supervisor interrupts or replaces a worker whose deadline passed.

Writes are single aligned 8-byte stores, which x86-64 and AArch64 perform atomically;
a reader may see a slot one call behind, never a torn value.
"""

from __future__ import annotations

import mmap
import os
import struct
from pathlib import Path

MAGIC = 0x53434154  # "SCAT"
MAX_SLOTS = 256
_HEADER = struct.Struct("<IIQ")  # magic, layout version, registry generation
_SLOT = struct.Struct("<Qd")  # call number, deadline (0.0: idle)
_GENERATION = struct.Struct("<Q")
_DEADLINE = struct.Struct("<d")
_SLOTS_OFFSET = 64
_SLOT_SIZE = 16
SIZE = _SLOTS_OFFSET + MAX_SLOTS * _SLOT_SIZE


class SharedSlots:
    """The node's and its workers' view of the mapped file."""

    def __init__(self, path: Path, *, create: bool = False) -> None:
        self.path = path
        if create:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "wb") as f:
                f.write(b"\0" * SIZE)
        self._fd = os.open(path, os.O_RDWR)
        self._map = mmap.mmap(self._fd, SIZE)
        if create:
            _HEADER.pack_into(self._map, 0, MAGIC, 1, 1)
        magic, _layout, _gen = _HEADER.unpack_from(self._map, 0)
        if magic != MAGIC:
            raise RuntimeError(f"{path} is not a Scatter runtime file")

    def close(self) -> None:
        try:
            self._map.close()
        finally:
            os.close(self._fd)

    # -- registry generation --

    def generation(self) -> int:
        generation: int = _GENERATION.unpack_from(self._map, 8)[0]
        return generation

    def bump_generation(self) -> int:
        new = self.generation() + 1
        _GENERATION.pack_into(self._map, 8, new)
        return new

    # -- worker slots --

    def begin_call(self, slot: int, number: int, deadline: float) -> None:
        _SLOT.pack_into(self._map, _SLOTS_OFFSET + slot * _SLOT_SIZE, number, deadline)

    def end_call(self, slot: int) -> None:
        _DEADLINE.pack_into(self._map, _SLOTS_OFFSET + slot * _SLOT_SIZE + 8, 0.0)

    def read(self, slot: int) -> tuple[int, float]:
        """(call number, deadline) of a worker slot; deadline 0.0 means idle."""
        number, deadline = _SLOT.unpack_from(self._map, _SLOTS_OFFSET + slot * _SLOT_SIZE)
        return number, deadline

    def clear(self, slot: int) -> None:
        _SLOT.pack_into(self._map, _SLOTS_OFFSET + slot * _SLOT_SIZE, 0, 0.0)
