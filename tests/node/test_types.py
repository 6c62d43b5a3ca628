"""Every type msgspec supports crosses a real node natively; the rest through cloudpickle."""

from __future__ import annotations

import dataclasses
import datetime
import enum
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
