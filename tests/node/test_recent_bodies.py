"""The driver's in-memory bodies for pushes (``RecentBodies``): bounded, and never a
body whose last version went."""

from scatter._node._server import RecentBodies


def test_all_or_nothing() -> None:
    bodies = RecentBodies(limit=100, largest=50)
    bodies.put("a", b"x" * 10)
    assert bodies.get_all(["a"]) == {"a": b"x" * 10}
    assert bodies.get_all(["a", "b"]) is None  # one missing: the push reads the store
    assert bodies.get_all([]) == {}


def test_bounded_in_bytes_least_recent_out_first() -> None:
    bodies = RecentBodies(limit=30, largest=30)
    bodies.put("a", b"a" * 10)
    bodies.put("b", b"b" * 10)
    bodies.put("c", b"c" * 10)
    assert bodies.get_all(["a"]) is not None  # "a" used: "b" is now the oldest
    bodies.put("d", b"d" * 10)
    assert bodies.get_all(["b"]) is None
    assert len(bodies) == 3 and bodies.get_all(["a", "c", "d"]) is not None


def test_a_large_body_is_not_kept() -> None:
    bodies = RecentBodies(limit=100, largest=10)
    bodies.put("big", b"x" * 11)
    assert bodies.get_all(["big"]) is None and len(bodies) == 0


def test_dropped_bodies_go() -> None:
    bodies = RecentBodies(limit=100, largest=100)
    bodies.put("a", b"a")
    bodies.put("b", b"b")
    bodies.drop(["a", "never-held"])
    assert bodies.get_all(["a"]) is None
    assert bodies.get_all(["b"]) == {"b": b"b"}
    bodies.put("c", b"c" * 99)  # the size of "a" was given back: "b" still fits
    assert bodies.get_all(["b", "c"]) is not None
