"""A transmit-limited broadcast queue: news piggybacked a bounded number of times.

As memberlist's ``TransmitLimitedQueue`` (queue.go): every piece of news is sent at most
``retransmit_mult * ceil(log10(n + 1))`` times, the least sent first, and news about a
subject replaces older news about the same subject (a node's newer state makes its
older one worthless). Pure: no I/O, no clock.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


def retransmit_limit(retransmit_mult: int, members: int) -> int:
    """How many times one piece of news is sent: O(log N), so it reaches everyone whp."""
    return retransmit_mult * max(1, math.ceil(math.log10(members + 1)))


@dataclass
class _Item(Generic[T]):
    message: T
    transmits: int = 0
    order: int = field(default=0)  # newer news first among equals


class BroadcastQueue(Generic[T]):
    """News to piggyback, keyed by subject; newer news about a subject replaces older."""

    def __init__(self) -> None:
        self._items: dict[Hashable, _Item[T]] = {}  # {subject: item}
        self._counter = 0

    def __len__(self) -> int:
        return len(self._items)

    def put(self, subject: Hashable, message: T) -> None:
        self._counter += 1
        self._items[subject] = _Item(message, 0, self._counter)

    def take(self, limit: int, *, members: int, retransmit_mult: int) -> list[T]:
        """Up to ``limit`` messages, least transmitted (then newest) first; each counted."""
        if not self._items or limit <= 0:
            return []
        most = retransmit_limit(retransmit_mult, members)
        chosen = heapq.nsmallest(
            limit, self._items.items(), key=lambda kv: (kv[1].transmits, -kv[1].order)
        )
        out: list[T] = []
        for subject, item in chosen:
            out.append(item.message)
            item.transmits += 1
            if item.transmits >= most:
                del self._items[subject]
        return out
