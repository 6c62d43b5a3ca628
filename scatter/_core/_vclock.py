"""Vector clocks: which registry changes happened before which.

Every registry change carries the clock of its origin, taken just after the origin
counted the change. Comparing two clocks tells whether one change could have seen the
other (BEFORE / AFTER) or whether they were made without knowledge of each other
(CONCURRENT). The registry needs nothing more: it orders changes by :meth:`total`,
which never contradicts BEFORE/AFTER, and settles CONCURRENT ties with its own rule.

A clock is a value: every operation returns a new clock, so a clock handed to the
wire, to the store or to another task can never change under it. A missing entry and
an entry of 0 mean the same thing; clocks drop zero entries when built, so ``==`` and
the msgpack encoding agree with :meth:`compare`.
"""

from __future__ import annotations

import enum
from typing import Annotated

import msgspec

from .._limits import MAX_CLOCK_ENTRIES, Ident

__all__ = ["Ordering", "VectorClock"]


class Ordering(enum.Enum):
    """How two clocks (and so the changes that carry them) relate."""

    BEFORE = "before"  # every entry <=, at least one <: the left side could be seen by the right
    AFTER = "after"
    EQUAL = "equal"
    CONCURRENT = "concurrent"  # each side has an entry the other lacks: neither saw the other


class VectorClock(msgspec.Struct, frozen=True):
    """An immutable vector clock: ``{node id: number of events counted at that node}``.

    Example::

        >>> a = VectorClock().increment("n1")
        >>> b = a.increment("n2")
        >>> a.compare(b), a <= b, b.dominates(a)
        (<Ordering.BEFORE: 'before'>, True, True)
        >>> a.increment("n1").compare(b)
        <Ordering.CONCURRENT: 'concurrent'>
    """

    # {node id: count}; never holds a zero (dropped in __post_init__), never a negative.
    # At most MAX_CLOCK_ENTRIES writers, checked when decoding (see _wire.py).
    entries: Annotated[
        dict[Ident, Annotated[int, msgspec.Meta(ge=0)]],
        msgspec.Meta(max_length=MAX_CLOCK_ENTRIES),
    ] = {}

    def __post_init__(self) -> None:
        # Runs on construction and on msgspec decoding alike; a ValueError here turns
        # into a msgspec.ValidationError for a clock that arrived over the wire.
        zeros = False
        for node_id, count in self.entries.items():
            if type(count) is not int or count < 0:
                raise ValueError(
                    f"vector clock entry {node_id!r} must be a non-negative int, got {count!r}"
                )
            zeros = zeros or count == 0
        if zeros:
            # Dropping zeros keeps ``==`` and hashing in line with compare(): {a: 0} is {}.
            msgspec.structs.force_setattr(
                self, "entries", {k: v for k, v in self.entries.items() if v}
            )

    def __hash__(self) -> int:
        # The generated hash would try to hash the dict; clocks are values, so hash by content.
        return hash(frozenset(self.entries.items()))

    def get(self, node_id: str) -> int:
        """The count for ``node_id``; 0 when the clock has never heard of it."""
        return self.entries.get(node_id, 0)

    def increment(self, node_id: str) -> VectorClock:
        """The clock after ``node_id`` counts one more event."""
        entries = dict(self.entries)
        entries[node_id] = entries.get(node_id, 0) + 1
        return VectorClock(entries)

    def merge(self, other: VectorClock) -> VectorClock:
        """The least clock that dominates both (entry-wise maximum)."""
        if not other.entries:
            return self
        entries = dict(self.entries)
        for node_id, count in other.entries.items():
            if count > entries.get(node_id, 0):
                entries[node_id] = count
        return VectorClock(entries)

    def meet(self, other: VectorClock) -> VectorClock:
        """The greatest clock both dominate (entry-wise minimum): what both have seen."""
        theirs = other.entries
        return VectorClock(
            {
                node_id: min(count, theirs[node_id])
                for node_id, count in self.entries.items()
                if node_id in theirs
            }
        )

    def dominates(self, other: VectorClock) -> bool:
        """Whether every entry of ``self`` is >= the same entry of ``other``.

        True also for equal clocks: "self has seen everything other has".
        """
        mine = self.entries
        return all(mine.get(node_id, 0) >= count for node_id, count in other.entries.items())

    def compare(self, other: VectorClock) -> Ordering:
        """How ``self`` relates to ``other`` in causal order.

        Returns:
            ``BEFORE`` when ``self < other``, ``AFTER`` when ``self > other``, ``EQUAL``,
            or ``CONCURRENT`` when neither dominates the other.
        """
        ge = self.dominates(other)
        le = other.dominates(self)
        if ge and le:
            return Ordering.EQUAL
        if le:
            return Ordering.BEFORE
        if ge:
            return Ordering.AFTER
        return Ordering.CONCURRENT

    def __le__(self, other: object) -> bool:
        if not isinstance(other, VectorClock):
            return NotImplemented
        return other.dominates(self)

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, VectorClock):
            return NotImplemented
        return other.dominates(self) and self != other

    def __ge__(self, other: object) -> bool:
        if not isinstance(other, VectorClock):
            return NotImplemented
        return self.dominates(other)

    def __gt__(self, other: object) -> bool:
        if not isinstance(other, VectorClock):
            return NotImplemented
        return self.dominates(other) and self != other

    def total(self) -> int:
        """The sum of all entries.

        If ``a < b`` then ``a.total() < b.total()``: sorting by ``total()`` (ties broken
        any fixed way) is a linear extension of causal order. The registry relies on it
        to apply changes in one order that every node agrees on.
        """
        return sum(self.entries.values())
