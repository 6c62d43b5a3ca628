"""VectorClock: the causal order the registry's one conflict rule builds on."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given, settings, strategies as st

from scatter._core._vclock import Ordering, VectorClock

NODES = ["a", "b", "c"]

clocks = st.dictionaries(st.sampled_from(NODES), st.integers(0, 4)).map(VectorClock)


def test_empty_clock_is_equal_to_a_clock_of_zeros() -> None:
    zeros = VectorClock({"a": 0, "b": 0})
    assert zeros == VectorClock()
    assert hash(zeros) == hash(VectorClock())
    assert zeros.entries == {}
    assert zeros.compare(VectorClock()) is Ordering.EQUAL
    assert msgspec.msgpack.encode(zeros) == msgspec.msgpack.encode(VectorClock())


def test_increment_returns_a_new_clock_and_leaves_the_old_one_alone() -> None:
    a = VectorClock({"a": 1})
    b = a.increment("a").increment("b")
    assert a == VectorClock({"a": 1})
    assert b == VectorClock({"a": 2, "b": 1})
    assert b.get("a") == 2 and b.get("zz") == 0
    with pytest.raises(AttributeError):
        a.entries = {}  # type: ignore[misc]


def test_compare_names_all_four_orderings() -> None:
    base = VectorClock().increment("a")
    later = base.increment("b")
    other = base.increment("c")
    assert base.compare(later) is Ordering.BEFORE
    assert later.compare(base) is Ordering.AFTER
    assert later.compare(VectorClock({"a": 1, "b": 1})) is Ordering.EQUAL
    assert later.compare(other) is Ordering.CONCURRENT


def test_le_is_causal_not_total() -> None:
    base = VectorClock({"a": 1})
    left, right = base.increment("b"), base.increment("c")
    assert base <= left and base < left and left >= base and left > base
    assert left <= left and not left < left
    assert not left <= right and not right <= left
    assert left.dominates(base) and not base.dominates(left)


def test_merge_is_the_entrywise_maximum() -> None:
    merged = VectorClock({"a": 3, "b": 1}).merge(VectorClock({"b": 2, "c": 1}))
    assert merged == VectorClock({"a": 3, "b": 2, "c": 1})


def test_clock_round_trips_through_msgpack() -> None:
    clock = VectorClock({"a": 3, "node-b": 1})
    decoded = msgspec.msgpack.Decoder(VectorClock).decode(msgspec.msgpack.encode(clock))
    assert decoded == clock


def test_clock_from_the_wire_refuses_negative_entries() -> None:
    with pytest.raises(msgspec.ValidationError):
        msgspec.msgpack.Decoder(VectorClock).decode(msgspec.msgpack.encode({"entries": {"a": -1}}))
    with pytest.raises(ValueError):
        VectorClock({"a": -1})


@settings(max_examples=100, deadline=None)
@given(clocks, clocks)
def test_compare_is_antisymmetric_and_agrees_with_le(a: VectorClock, b: VectorClock) -> None:
    mirror = {
        Ordering.BEFORE: Ordering.AFTER,
        Ordering.AFTER: Ordering.BEFORE,
        Ordering.EQUAL: Ordering.EQUAL,
        Ordering.CONCURRENT: Ordering.CONCURRENT,
    }
    assert b.compare(a) is mirror[a.compare(b)]
    assert (a <= b) == (a.compare(b) in (Ordering.BEFORE, Ordering.EQUAL))
    assert (a == b) == (a.compare(b) is Ordering.EQUAL)


@settings(max_examples=100, deadline=None)
@given(clocks, clocks, clocks)
def test_merge_is_the_least_upper_bound(a: VectorClock, b: VectorClock, c: VectorClock) -> None:
    m = a.merge(b)
    assert m == b.merge(a)
    assert m.dominates(a) and m.dominates(b)
    assert a.merge(a) == a
    assert a.merge(b).merge(c) == a.merge(b.merge(c))
    if c.dominates(a) and c.dominates(b):
        assert c.dominates(m)


@settings(max_examples=100, deadline=None)
@given(clocks, clocks, clocks)
def test_meet_is_the_greatest_lower_bound(a: VectorClock, b: VectorClock, c: VectorClock) -> None:
    m = a.meet(b)
    assert m == b.meet(a)
    assert a.dominates(m) and b.dominates(m)
    assert a.meet(a) == a
    assert a.meet(b).meet(c) == a.meet(b.meet(c))
    if a.dominates(c) and b.dominates(c):
        assert m.dominates(c)


@settings(max_examples=100, deadline=None)
@given(clocks, clocks, st.sampled_from(NODES))
def test_total_extends_causal_order(a: VectorClock, b: VectorClock, node: str) -> None:
    # The registry sorts changes by total(): it must never put an effect before its cause.
    if a < b:
        assert a.total() < b.total()
    assert a.increment(node).total() == a.total() + 1
    assert a < a.increment(node)
