"""Every type msgspec supports crosses a real node natively; the rest through cloudpickle.
An int is Python's int: beyond 64 bits too (rule 7 of scatter/_core/_signature.py)."""

from __future__ import annotations

import dataclasses
import datetime
import enum
import math
import uuid
from decimal import Decimal
from typing import Any, Literal, NamedTuple, Optional, TypedDict, Union

import msgspec
import pytest

import scatter


class Color(enum.Enum):
    RED = "red"
    GREEN = "green"


@dataclasses.dataclass
class Point:
    x: float
    y: float


class Item(msgspec.Struct):
    name: str
    price: Decimal
    tags: list[str] = []


class Movie(TypedDict):
    title: str
    year: int


class Pair(NamedTuple):
    left: int
    right: str


class Opaque:
    """A class msgspec cannot encode: it travels as a cloudpickle extension value."""

    def __init__(self, payload: list[int]) -> None:
        self.payload = payload

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Opaque) and other.payload == self.payload


def _echo_of(annotation: Any) -> Any:
    def echo(value):  # type: ignore[no-untyped-def]
        return value

    echo.__annotations__ = {"value": annotation, "return": annotation}
    return echo


CASES: list[tuple[str, Any, Any]] = [
    ("int", int, 42),
    ("float", float, 2.5),
    ("str", str, "héllo"),
    ("bytes", bytes, b"\x00\xff"),
    ("bool", bool, True),
    ("none", None, None),
    ("list", list[int], [1, 2, 3]),
    ("dict", dict[str, int], {"a": 1}),
    ("tuple", tuple[int, str], (1, "a")),
    ("set", set[int], {1, 2}),
    ("optional_none", Optional[int], None),  # noqa: UP045 - the spelling users write
    ("optional_value", Optional[int], 3),  # noqa: UP045
    ("union", Union[int, str], "x"),  # noqa: UP007
    ("literal", Literal["a", "b"], "b"),
    ("enum", Color, Color.GREEN),
    ("datetime", datetime.datetime, datetime.datetime(2026, 11, 24, 12, 0, tzinfo=datetime.UTC)),
    ("date", datetime.date, datetime.date(2026, 11, 24)),
    ("uuid", uuid.UUID, uuid.UUID("12345678-1234-5678-1234-567812345678")),
    ("decimal", Decimal, Decimal("1.10")),
    ("dataclass", Point, Point(1.0, 2.0)),
    ("struct", Item, Item("tea", Decimal("2.50"), ["hot"])),
    ("typeddict", Movie, {"title": "Alien", "year": 1979}),
    ("namedtuple", Pair, Pair(1, "one")),
    ("nested", dict[str, list[Point]], {"a": [Point(0.0, 1.0)], "b": []}),
    ("opaque", Opaque, Opaque([1, 2])),
]


@pytest.mark.timeout(90)
def test_every_supported_type_round_trips_through_a_node(connected: object) -> None:
    for label, annotation, _value in CASES:
        scatter.scatter(_echo_of(annotation), name=f"echo_{label}")
    for label, _annotation, value in CASES:
        echo = scatter.make_callable(f"echo_{label}")
        result = echo(value)
        assert result == value, label
        assert type(result) is type(value), label


@pytest.mark.timeout(60)
def test_defaults_keyword_only_and_variadic_parameters(connected: object) -> None:
    @scatter.scatter
    def mix(a: int, b: int = 10, *rest: int, scale: float = 1.0, **named: str) -> str:
        return f"{a}|{b}|{list(rest)}|{scale}|{sorted(named.items())}"

    remote = scatter.make_callable("mix")
    for args, kwargs in [
        ((1,), {}),
        ((1, 2, 3, 4), {"scale": 2.0, "tag": "x"}),
        ((1,), {"scale": 0.5}),
        ((), {"a": 5, "b": 6, "who": "me"}),
    ]:
        assert remote(*args, **kwargs) == mix(*args, **kwargs)


@pytest.mark.timeout(60)
def test_positional_only_parameters(connected: object) -> None:
    @scatter.scatter
    def power(base: int, exponent: int = 2, /) -> int:
        return base**exponent

    remote = scatter.make_callable("power")
    assert remote(3) == 9
    assert remote(2, 5) == 32
    with pytest.raises(TypeError, match="positional-only"):
        remote(base=2)


@pytest.mark.timeout(60)
def test_nested_dataclass_error_names_parameter_and_path(connected: object) -> None:
    @scatter.scatter
    def centroid(points: list[Point]) -> Point:
        n = len(points)
        return Point(sum(p.x for p in points) / n, sum(p.y for p in points) / n)

    remote = scatter.make_callable("centroid")
    assert remote([Point(0.0, 0.0), Point(2.0, 4.0)]) == Point(1.0, 2.0)
    with pytest.raises(scatter.ValidationError) as caught:
        remote([Point(0.0, 0.0), Point("far", 1.0)])  # type: ignore[arg-type]
    assert caught.value.parameter == "points"
    assert caught.value.path == "$.points[1].x"
    assert "points" in str(caught.value) and "$.points[1].x" in str(caught.value)


class Account(msgspec.Struct):
    owner: str
    balance: int


@dataclasses.dataclass
class Ledger:
    entries: list[int]


BIG = 10**30
BIG_CASES: list[tuple[str, Any, Any]] = [
    ("int", int, -BIG),
    ("edges", list[int], [2**64 - 1, 2**64, -(2**63), -(2**63) - 1, 2**1000]),
    ("list", list[int], [1, BIG, -BIG]),
    ("dict", dict[str, int], {"a": BIG, "b": -BIG, "c": 1}),
    ("keys", dict[int, str], {BIG: "big", 1: "small"}),
    ("tuple", tuple[int, str], (BIG, "x")),
    ("optional", Optional[int], BIG),  # noqa: UP045
    ("union", Union[int, str], -BIG),  # noqa: UP007
    ("struct", Account, Account("ada", BIG)),
    ("dataclass", Ledger, Ledger([BIG, -1])),
    ("namedtuple", Pair, Pair(-BIG, "minus")),
    ("any", Any, {"n": [BIG, -BIG], "m": 2}),
]


@pytest.mark.timeout(90)
def test_ints_beyond_64_bits_cross_a_node_in_arguments_and_results(connected: object) -> None:
    @scatter.scatter
    def factorial(n: int) -> int:
        return math.factorial(n)

    @scatter.scatter
    def add(a: int, b: int) -> int:
        return a + b

    for label, annotation, _value in BIG_CASES:
        scatter.scatter(_echo_of(annotation), name=f"echo_big_{label}")

    assert scatter.make_callable("factorial")(30) == math.factorial(30)
    assert scatter.make_callable("add")(BIG, 1) == BIG + 1
    assert scatter.make_callable("add")(-BIG, -BIG) == -2 * BIG
    for label, _annotation, value in BIG_CASES:
        result = scatter.make_callable(f"echo_big_{label}")(value)
        assert result == value, label
        assert type(result) is type(value), label


@pytest.mark.timeout(90)
def test_big_ints_are_still_validated(connected: object) -> None:
    @scatter.scatter
    def add(a: int, b: int) -> int:
        return a + b

    @scatter.scatter
    def half(x: float) -> float:
        return x / 2

    @scatter.scatter
    def as_float() -> float:
        return BIG

    @scatter.scatter
    def as_text() -> str:
        return BIG  # type: ignore[return-value]

    remote = scatter.make_callable("add")
    with pytest.raises(scatter.ValidationError) as caught:
        remote("1", 2)
    assert (caught.value.parameter, caught.value.path) == ("a", "$.a")
    with pytest.raises(scatter.ValidationError) as caught:
        remote(BIG, "1")  # the big int's path through validation refuses the str too
    assert (caught.value.parameter, caught.value.path) == ("b", "$.b")
    assert "Expected `int`, got `str`" in str(caught.value)
    with pytest.raises(scatter.ValidationError) as caught:
        remote(BIG, 2.5)
    assert caught.value.parameter == "b"
    # Where a float goes, a big int becomes a float, as msgspec converts any int; past a
    # float's range it is refused, as msgspec refuses such a number for a float.
    assert scatter.make_callable("half")(BIG) == BIG / 2
    result = scatter.make_callable("as_float")()
    assert (result, type(result)) == (float(BIG), float)
    with pytest.raises(scatter.ValidationError, match="Number out of range") as caught:
        scatter.make_callable("half")(10**400)
    assert caught.value.parameter == "x"
    # Nor does a big int pass for a str, on the node's side.
    with pytest.raises(scatter.ValidationError) as caught:
        scatter.make_callable("as_text")()
    assert caught.value.parameter == "return"
    assert "Expected `str`, got `int`" in str(caught.value)
