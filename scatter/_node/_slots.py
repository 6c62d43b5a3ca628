"""Shared memory between a node and its worker processes.

A small memory-mapped file under the node's runtime directory. It carries no arguments
and no results, only what lets the node supervise without a message per call:

* the registry generation: the node bumps it after every committed registry change; a
  worker compares it before each call and drops its name lookups when it moved. Reading
  8 bytes costs far less than a control message, so calls pay nothing for freshness.
* one slot per worker: the number of the call it runs and that call's deadline
  (``time.monotonic()``, shared by all processes of a machine; 0.0 when idle). The
  supervisor interrupts or replaces a worker whose deadline passed, and a client on
  this machine (read-only) takes another worker rather than queue a call behind a
  busy one.
* clients' claims (``WorkerClaims``): a lock on a slot's first byte while a client has
  a call in flight at that worker; the mapping never sees them.

Writes are single aligned 8-byte stores, which x86-64 and AArch64 perform atomically;
a reader may see a slot one call behind, never a torn value.

A new inode at every node start: the file is written under a temporary name and renamed
over ``slots``, never truncated in place. A worker left over from a node killed with
SIGKILL (it lives until its running call ends, see ``_worker.py``) keeps its mapping of
the old, unlinked file, so it can never write into the slot of a new start's worker.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import mmap
import os
import struct
import tempfile
import threading
import time
import weakref
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

    def __init__(self, path: Path, *, create: bool = False, read_only: bool = False) -> None:
        """Map the file at ``path`` (a new one with ``create``); ``read_only`` for a
        client, which only looks whether its worker is busy."""
        self.path = path
        if create:
            self._fd = self._create(path)
        else:
            self._fd = os.open(path, os.O_RDONLY if read_only else os.O_RDWR)
        try:
            access = mmap.ACCESS_READ if read_only else mmap.ACCESS_WRITE
            self._map = mmap.mmap(self._fd, SIZE, access=access)
        except BaseException:
            os.close(self._fd)
            raise
        magic, _layout, _gen = _HEADER.unpack_from(self._map, 0)
        if magic != MAGIC:
            raise RuntimeError(f"{path} is not a Scatter runtime file")

    @staticmethod
    def _create(path: Path) -> int:
        """A fresh file, complete before it appears under ``path`` (the module docstring
        says why a new inode); returns an fd open on it."""
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
        try:
            with open(fd, "wb", closefd=False) as f:
                f.write(_HEADER.pack(MAGIC, 1, 1) + b"\0" * (SIZE - _HEADER.size))
            os.replace(temporary, path)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise
        return fd

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


_fcntl = fcntl.fcntl
# How long a claim outlives its call (seconds), kept for the holder's next call: a client
# calling in a loop then pays no system call per call (WorkerClaims.release). Another
# client finds the worker busy for at most this long after a call ended.
CLAIM_KEPT_FOR = 0.02
# How long the thread that drops kept claims stays awake without one (seconds).
_DROPPER_LINGER = 0.25
_F_OFD_SETLK: int = getattr(fcntl, "F_OFD_SETLK", 37)  # Linux 3.15+


class WorkerClaims:
    """A client process's claims on workers: "I have a call in flight there".

    Clients on the node's machine claim a worker before sending it a call and drop the
    claim once the reply is in; a worker claimed by another connection (or running a
    call, whoever sent it) is busy, and the client takes another. A claim is an OFD
    lock (``F_OFD_SETLK``) on the worker's slot byte of the slots file, so the kernel
    makes the test-and-set atomic across processes and drops the claims of a process
    that dies; ``claimed`` makes it so between the threads of this process (OFD locks
    are per open file, which they share). Only clients of this
    machine take part: a call from another machine shows as busy only once it runs.

    After a fork the child must not unlock the parent's claims (they share the open
    file): ``forked`` makes its releases do nothing; it makes claims of its own.

    A claim is kept past its call for ``CLAIM_KEPT_FOR`` (``release(keep=True)``): the
    holder's next call within that time takes it back without a system call, and a
    thread of this object's drops it once it is that old. A lock and an unlock per call
    cost 3.6 us of Python and kernel time, about 6% of a call's client CPU on the
    Unix-socket path; taking a kept claim back costs 0.5 us. The claim is the same
    kernel lock all along, so calls stay apart exactly as before; only another client's
    wait for a worker just used can grow, by at most that time.
    """

    def __init__(self, path: Path) -> None:
        self.view = SharedSlots(path, read_only=True)
        try:
            # Write access only for the write lock; nothing writes through this fd.
            self._fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except BaseException:
            self.view.close()
            raise
        self.claimed: dict[int, object] = {}  # {slot: the connection holding it}
        # {slot: (lock request, unlock request)}: packed once, used on every call.
        self._requests: dict[int, tuple[bytes, bytes]] = {}
        try:  # a filesystem without OFD locks refuses here, not at every call
            _fcntl(self._fd, _F_OFD_SETLK, self._requests_for(-1)[0])
            _fcntl(self._fd, _F_OFD_SETLK, self._requests_for(-1)[1])
        except BaseException:
            os.close(self._fd)
            self.view.close()
            raise
        self.forked = False  # in a child forked while this was open: release nothing
        # {slot: (holder, monotonic time its call ended)}: claims kept past their call.
        # Whoever pops an entry (the holder's next claim, or the dropping thread) owns
        # it: dict.pop is atomic under the GIL.
        self.kept: dict[int, tuple[object, float]] = {}
        self._kept_work = threading.Event()  # set while claims are kept
        self._dropper: threading.Thread | None = None
        self._closed = False
        # Orders the slow paths and the dropping thread (never the hot path: a claim
        # taken back from ``kept``, and a claim kept, take no lock).
        self._lock = threading.Lock()
        _ALL_CLAIMS.add(self)

    def _requests_for(self, slot: int) -> tuple[bytes, bytes]:
        requests = self._requests.get(slot)
        if requests is None:
            offset = _SLOTS_OFFSET + slot * _SLOT_SIZE
            requests = self._requests[slot] = (
                struct.pack("hhqqi", fcntl.F_WRLCK, 0, offset, 1, 0),
                struct.pack("hhqqi", fcntl.F_UNLCK, 0, offset, 1, 0),
            )
        return requests

    def claim(self, slot: int, holder: object) -> bool:
        """Claim ``slot`` for ``holder`` unless another connection has a call there or
        the worker runs one; True if claimed."""
        # A claim kept since the holder's last call: whoever pops it owns it (the
        # dropping thread pops only under the lock, and gives back one not yet due).
        # Only its holder pops it here: another connection of this process to the
        # same worker, popping and putting back, could hide it from its holder in
        # between, which would then lock anew while the dropping thread drops it.
        if self._kept_by_another(slot, holder):
            return False
        kept = self.kept.pop(slot, None)
        if kept is None:
            with self._lock:
                if self._kept_by_another(slot, holder):
                    return False
                kept = self.kept.pop(slot, None)
                if kept is None:
                    return self._claim_locked(slot, holder)
        if kept[0] is not holder:  # one holder per slot: not expected, but kept as it was
            self.kept[slot] = kept
            return False
        if _DEADLINE.unpack_from(self.view._map, _SLOTS_OFFSET + slot * _SLOT_SIZE + 8)[0]:
            self.release(slot, holder)  # it runs a call of a client that did not claim
            return False
        return True

    def _kept_by_another(self, slot: int, holder: object) -> bool:
        seen = self.kept.get(slot)
        return seen is not None and seen[0] is not holder

    def _claim_locked(self, slot: int, holder: object) -> bool:
        # dict.setdefault: one thread of this process wins a slot.
        if self.claimed.setdefault(slot, holder) is not holder:
            return False
        lock, _unlock = self._requests_for(slot)
        try:
            _fcntl(self._fd, _F_OFD_SETLK, lock)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                return True  # no locks here (a filesystem without them): as unclaimed
            del self.claimed[slot]  # another process's claim
            return False
        offset = _SLOTS_OFFSET + slot * _SLOT_SIZE + 8
        if _DEADLINE.unpack_from(self.view._map, offset)[0] != 0.0:
            self._release_locked(slot, holder)  # it runs a call of a client that did not claim
            return False
        return True

    def release(self, slot: int, holder: object, *, keep: bool = False) -> None:
        """End ``holder``'s claim on ``slot``; with ``keep``, only once it is
        ``CLAIM_KEPT_FOR`` old and not taken back (see the class docstring)."""
        if self.claimed.get(slot) is not holder or self.forked:
            return
        if keep and not self._closed:
            self.kept[slot] = (holder, time.monotonic())
            if not self._kept_work.is_set():
                self._wake_dropper()
            return
        with self._lock:
            self.kept.pop(slot, None)
            self._release_locked(slot, holder)

    def _release_locked(self, slot: int, holder: object) -> None:
        if self.claimed.get(slot) is not holder:
            return
        with contextlib.suppress(OSError):
            _fcntl(self._fd, _F_OFD_SETLK, self._requests_for(slot)[1])
        del self.claimed[slot]

    def _wake_dropper(self) -> None:
        with self._lock:
            if self._dropper is None or not self._dropper.is_alive():
                self._dropper = threading.Thread(
                    target=self._drop_kept, name="scatter-claims", daemon=True
                )
                self._dropper.start()
        self._kept_work.set()

    def _drop_kept(self) -> None:
        """(Its own thread.) Release the claims kept past ``CLAIM_KEPT_FOR``.

        It stays awake while claims come and go (a caller in a loop keeps one between
        its calls, and has none during them): waking it at every call cost more than
        the lock it saves. Asleep after ``_DROPPER_LINGER`` without a kept claim.
        """
        while not self._closed:
            self._kept_work.wait()
            idle_since = time.monotonic()
            while not self._closed:
                now = time.monotonic()
                next_due = now + CLAIM_KEPT_FOR
                with self._lock:
                    if self._closed:
                        return
                    for slot in list(self.kept):
                        taken = self.kept.pop(slot, None)
                        if taken is None:
                            continue  # its holder took it back meanwhile
                        holder, since = taken
                        if now - since < CLAIM_KEPT_FOR:
                            self.kept[slot] = taken  # ours to give back: nobody else pops
                            next_due = min(next_due, since + CLAIM_KEPT_FOR)
                            continue
                        self._release_locked(slot, holder)
                    if self.kept:
                        idle_since = now
                    elif now - idle_since > _DROPPER_LINGER:
                        # Cleared, then one more look: a claim kept before the clear is
                        # seen here, one kept after it finds the event clear and sets it.
                        self._kept_work.clear()
                        if not self.kept:
                            break
                        self._kept_work.set()
                time.sleep(max(0.0, next_due - time.monotonic()))

    def close(self) -> None:
        """Close the file: the claims go with it (in a forked child, the parent's stay:
        an open file's locks end with its last descriptor)."""
        # Under the lock, so that the dropping thread never unlocks through a closed fd
        # (its number may be another file's by then); not in a forked child, where the
        # parent's thread may have held it at the fork and exists no more.
        with contextlib.nullcontext() if self.forked else self._lock:
            self._closed = True
            self.kept.clear()
            os.close(self._fd)
        self._kept_work.set()  # the dropping thread ends
        self.view.close()


_ALL_CLAIMS: weakref.WeakSet[WorkerClaims] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for claims in list(_ALL_CLAIMS):
        claims.forked = True


os.register_at_fork(after_in_child=_after_fork_in_child)
