"""A caller never runs a publisher's code to learn a signature, and a pickle is loaded only
where an annotation calls for one (DESIGN.md, "Security"; scatter/_core/_typespec.py).

The tripwires here are pickles (and a class hook) that create a marker file when they are
loaded; each test checks that no caller, and no node where it must not, loaded one.
"""

from __future__ import annotations

import contextlib
import datetime
import inspect
import os
import pickle
import subprocess
import sys
import textwrap
import typing
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal, Optional, Union

import cloudpickle
import msgspec
import pytest
import zmq

import scatter
from cluster.launch import LocalNode
from scatter import _wire
from scatter._core._typespec import FORMAT, OpaqueValue
from scatter._publish import prepare_publish
from tests.raw_sockets import dealer


class Tripwire:
    """Pickles as a call to ``Path.touch(marker)``: loading the pickle creates the marker."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


def _add(a: int, b: int) -> int:
    return a + b


@pytest.mark.timeout(60)
def test_a_signature_pickle_that_runs_code_is_never_loaded_by_a_caller(
    client: scatter.Client, tmp_path: Path
) -> None:
    marker = tmp_path / "signature-pickle-loaded"
    fields = prepare_publish(_add, name="add")
    fields["signature"] = pickle.dumps(Tripwire(marker))  # what the finding's publisher sent
    client.request(lambda i: _wire.Publish(id=i, **fields))

    try:
        description = client.describe("add")
        remote = client.make_callable("add")
    finally:
        assert not marker.exists(), "the caller loaded the publisher's signature pickle"
    assert description.signature == b""  # the node no longer hands the pickle to callers
    assert str(inspect.signature(remote)) == "(a: int, b: int) -> int"
    with pytest.raises(scatter.ValidationError) as caught:
        remote("x", 1)  # validated here, from the type description
    assert caught.value.parameter == "a"
    with pytest.raises(TypeError, match=r"add\(\) missing 1 required positional argument: 'b'"):
        remote(1)
    assert not marker.exists()


def _hostile_spec(parameter: str, *, field: str = "x", record: tuple[str, str] = ("m", "C")) -> bytes:
    module, qualname = record
    return msgspec.msgpack.encode(
        {
            "format": FORMAT,
            "types": [
                {"kind": "prim", "name": "int"},
                {
                    "kind": "record",
                    "module": module,
                    "qualname": qualname,
                    "origin": "struct",
                    "fields": [{"name": field, "type": 0}],
                },
                {"kind": "opaque", "module": "subprocess", "qualname": "Popen"},
            ],
            "parameters": [
                {"name": parameter, "kind": "POSITIONAL_OR_KEYWORD", "type": 1},
                {"name": "p", "kind": "KEYWORD_ONLY", "type": 2, "has_default": True,
                 "default_repr": "__import__('os').system('true')"},
            ],
            "returns": 0,
        }
    )


@pytest.mark.timeout(60)
def test_a_type_description_that_tries_to_run_code_is_refused_or_inert(
    client: scatter.Client, tmp_path: Path
) -> None:
    marker = tmp_path / "description-ran-code"
    inject = f"a=__import__('pathlib').Path({str(marker)!r}).touch()"
    for name, spec in [
        ("injected_parameter", _hostile_spec(inject)),
        ("injected_field", _hostile_spec("a", field=f"x: int = {inject}")),
        ("truncated", _hostile_spec("a")[:-3]),
    ]:
        fields = prepare_publish(_add, name=name)
        fields["signature_spec"] = spec
        client.request(lambda i, fields=fields: _wire.Publish(id=i, **fields))
        with pytest.raises(scatter.ScatterError, match="cannot rebuild the signature"):
            client.make_callable(name)

    # Names of real things (os.system, subprocess.Popen) become inert stand-ins.
    fields = prepare_publish(_add, name="inert")
    fields["signature_spec"] = _hostile_spec("a", record=("os", "system"))
    client.request(lambda i: _wire.Publish(id=i, **fields))
    remote = client.make_callable("inert")
    params = inspect.signature(remote).parameters
    struct = params["a"].annotation
    assert issubclass(struct, msgspec.Struct) and struct.__qualname__ == "system"
    assert issubclass(params["p"].annotation, OpaqueValue)
    assert repr(params["p"].default) == "__import__('os').system('true')"
    with pytest.raises(scatter.ValidationError):
        remote({"x": "not an int"})
    assert not marker.exists()


@contextlib.contextmanager
def _worker_socket(client: scatter.Client) -> Iterator[zmq.Socket[bytes]]:
    leased = client.request(lambda i: _wire.Lease(i))
    context = zmq.Context()
    sock = dealer(context, leased.endpoint)
    try:
        yield sock
    finally:
        sock.close()
        context.term()


def _raw_call(sock: zmq.Socket[bytes], name: str, arguments: dict[str, Any]) -> Any:
    """A call that skips the caller's own validation, as a hostile caller's would."""
    payload = msgspec.Raw(msgspec.msgpack.encode(arguments))
    sock.send(_wire.encoder.encode(_wire.Call(7, name, 0, 0, "", 0.0, payload)))
    assert sock.poll(20_000), f"no reply to {name}"
    return _wire.worker_reply_decoder.decode(sock.recv())


@pytest.mark.timeout(90)
def test_a_pickle_under_any_is_refused_and_never_loaded(
    client: scatter.Client, tmp_path: Path
) -> None:
    marker = tmp_path / "pickle-loaded"
    pickled = msgspec.msgpack.Ext(1, pickle.dumps(Tripwire(marker)))

    def keep(x: Any) -> int:
        return 1

    def keep_nested(x: dict[str, Any]) -> int:
        return 1

    def keep_object(x: object) -> int:
        return 1

    def give(path: str) -> Any:
        class Trap:  # pickled by value on the node; loading it would touch `path`
            def __reduce__(self) -> tuple[Any, ...]:
                return (Path.touch, (Path(path),))

        return Trap()

    for fn in (keep, keep_nested, keep_object, give):
        client.publish(fn)

    # The caller refuses to send it ...
    for name, argument in [("keep", Tripwire(marker)), ("keep_nested", {"k": Tripwire(marker)})]:
        with pytest.raises(scatter.ValidationError) as caught:
            client.make_callable(name)(argument)
        assert caught.value.parameter == "x"
        assert "pickled value" in str(caught.value)
    # ... the node refuses it from a caller that skips that check ...
    with _worker_socket(client) as sock:
        for name, value in [
            ("keep", pickled),
            ("keep_nested", {"k": pickled}),
            ("keep_object", pickled),
        ]:
            failure = _raw_call(sock, name, {"x": value})
            assert isinstance(failure, _wire.Failure), (name, failure)
            assert (failure.kind, failure.parameter) == ("validation", "x"), failure
            assert "was not unpickled" in failure.message
        assert msgspec.msgpack.decode(_raw_call(sock, "keep", {"x": [1, "two"]}).value) == 1
    # ... and a caller refuses one in a result.
    with pytest.raises(scatter.ValidationError) as caught:
        client.make_callable("give")(str(marker))
    assert caught.value.parameter == "return"
    assert "was not unpickled" in str(caught.value)
    assert not marker.exists()


@pytest.mark.timeout(90)
def test_a_big_int_extension_is_read_as_an_int_and_never_unpickled(
    client: scatter.Client, tmp_path: Path
) -> None:
    # Extension type 2 (BIG_INT_EXT_CODE) is an int's bytes: int.from_bytes, nothing else.
    marker = tmp_path / "pickle-loaded"
    tripwire = pickle.dumps(Tripwire(marker))

    def big_int(value: int) -> msgspec.msgpack.Ext:
        return msgspec.msgpack.Ext(2, value.to_bytes(16, "big", signed=True))

    def twice(n: int) -> int:
        return 2 * n

    def bits(x: Any) -> int:
        return x.bit_length() if type(x) is int else -1

    def text(s: str) -> int:
        return 1

    def both(n: int, x: Any) -> int:
        return 1

    for fn in (twice, bits, text, both):
        client.publish(fn)
    big = -(2**100)
    with _worker_socket(client) as sock:
        reply = _raw_call(sock, "twice", {"n": big_int(big)})
        assert isinstance(reply, _wire.Result), reply
        value = msgspec.msgpack.decode(reply.value, ext_hook=lambda code, data: (code, bytes(data)))
        assert value[0] == 2 and int.from_bytes(value[1], "big", signed=True) == 2 * big
        # A pickle's bytes under code 2 are only a (large) number.
        reply = _raw_call(sock, "bits", {"x": msgspec.msgpack.Ext(2, tripwire)})
        assert isinstance(reply, _wire.Result), reply
        assert msgspec.msgpack.decode(reply.value) > 64
        failure = _raw_call(sock, "text", {"s": big_int(big)})
        assert isinstance(failure, _wire.Failure), failure
        assert (failure.kind, failure.parameter) == ("validation", "s"), failure
        assert "Expected `str`, got `int`" in failure.message
        # A pickle under Any is refused as ever, with a big int beside it.
        pickled = msgspec.msgpack.Ext(1, tripwire)
        failure = _raw_call(sock, "both", {"n": big_int(big), "x": pickled})
        assert isinstance(failure, _wire.Failure), failure
        assert (failure.kind, failure.parameter) == ("validation", "x"), failure
        assert "was not unpickled" in failure.message
        failure = _raw_call(sock, "both", {"n": pickled, "x": big_int(big)})
        assert isinstance(failure, _wire.Failure), failure
        assert (failure.kind, failure.parameter) == ("validation", "n"), failure
    with pytest.raises(scatter.ValidationError) as caught:
        client.make_callable("both")(big, Tripwire(marker))
    assert caught.value.parameter == "x"
    assert "was not unpickled" in str(caught.value)
    assert client.make_callable("both")(big, [big]) == 1
    assert not marker.exists()


@pytest.mark.timeout(60)
def test_a_plain_class_annotation_still_travels_pickled(client: scatter.Client) -> None:
    class Blob:  # msgspec cannot encode it, and no caller can import it (a local class)
        def __init__(self, items: list[int]) -> None:
            self.items = items

    def grow(blob, more=None):  # type: ignore[no-untyped-def]
        extra = [i for b in more or [] for i in b.items]
        return Blob(blob.items + extra)

    # Set by hand: this module's string annotations cannot name a local class.
    grow.__annotations__ = {"blob": Blob, "more": Optional[list[Blob]], "return": Blob}  # noqa: UP045

    client.publish(grow)
    remote = client.make_callable("grow")
    annotation = inspect.signature(remote).parameters["blob"].annotation
    assert issubclass(annotation, OpaqueValue)  # a stand-in, not the class by value
    assert annotation.__qualname__ == Blob.__qualname__
    assert annotation.__module__ == Blob.__module__
    result = remote(Blob([1]), [Blob([2]), Blob([3])])
    assert type(result) is Blob and result.items == [1, 2, 3]
    assert remote(Blob([4])).items == [4]
    with pytest.raises(scatter.ValidationError) as caught:
        remote(5)  # the caller validates nothing about a Blob: the node does
    assert caught.value.parameter == "blob"


PUBLISHER = """
import dataclasses, datetime, enum, os, uuid
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal, NamedTuple, Optional, TypedDict, Union

import msgspec
import scatter

MARKERS = __MARKERS__
PUBLISHER = os.getpid()


class Tripwire:
    # Rebuilding a subclass of this class in another process (as unpickling it by value
    # does) leaves a marker named after that process.
    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if os.getpid() != PUBLISHER:
            Path(MARKERS, "loaded-by-" + str(os.getpid())).touch()


class Color(enum.Enum):
    RED = "red"
    GREEN = "green"


@dataclasses.dataclass
class Point(Tripwire):
    x: float
    y: float = 0.0


class Item(msgspec.Struct, tag="item", array_like=True, kw_only=True):
    name: str
    price: Decimal = Decimal("1.50")


class Movie(TypedDict, total=False):
    title: str
    year: int


class Pair(NamedTuple):
    left: int
    right: str = "r"


class Summary(msgspec.Struct, frozen=True):
    text: str
    point: Point


@scatter.scatter
def everything(
    i: int, f: float, s: str, raw: bytes, flag: bool,
    numbers: list[int], counts: dict[str, int], pair_t: tuple[int, str],
    tags: set[int], names: frozenset[str],
    maybe: Optional[int], either: Union[int, str], mode: Literal["a", "b"],
    color: Color, when: datetime.datetime, day: datetime.date, at: datetime.time,
    span: datetime.timedelta, key: uuid.UUID, money: Decimal,
    item: Item, point: Point, movie: Movie, pair: Pair, anything: Any,
    /, *rest: int, scale: float = 1.5, **named: str,
) -> Summary:
    text = "|".join(
        str(v) for v in (i, f, s, raw, flag, numbers, counts, pair_t, sorted(tags),
                         sorted(names), maybe, either, mode, color.value, when.isoformat(),
                         day, at, span, key, money, item.name, item.price, point,
                         sorted(movie.items()), pair, anything, rest, scale, sorted(named.items()))
    )
    return Summary(text, Point(point.y, point.x))

print("published")
"""


@pytest.mark.timeout(120)
def test_signature_shows_every_supported_type_and_calls_validate(
    node: LocalNode, client: scatter.Client, tmp_path: Path
) -> None:
    markers = tmp_path / "markers"
    markers.mkdir()
    script = tmp_path / "publisher.py"
    script.write_text(textwrap.dedent(PUBLISHER).replace("__MARKERS__", repr(str(markers))))
    env = dict(os.environ, SCATTER_ADDRESS=node.address)
    result = subprocess.run(
        [sys.executable, str(script)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "published\n"

    try:
        remote = client.make_callable("everything")
    finally:
        assert not (markers / f"loaded-by-{os.getpid()}").exists(), "publisher code ran here"
    sig = inspect.signature(remote)
    params = sig.parameters
    assert list(params) == [
        "i", "f", "s", "raw", "flag", "numbers", "counts", "pair_t", "tags", "names",
        "maybe", "either", "mode", "color", "when", "day", "at", "span", "key", "money",
        "item", "point", "movie", "pair", "anything", "rest", "scale", "named",
    ]
    kinds = inspect.Parameter
    assert params["i"].kind is kinds.POSITIONAL_ONLY
    assert params["rest"].kind is kinds.VAR_POSITIONAL
    assert params["scale"].kind is kinds.KEYWORD_ONLY and params["scale"].default == 1.5
    assert params["named"].kind is kinds.VAR_KEYWORD
    plain = {
        "i": int, "f": float, "s": str, "raw": bytes, "flag": bool, "numbers": list[int],
        "counts": dict[str, int], "pair_t": tuple[int, str], "tags": set[int],
        "names": frozenset[str], "maybe": Optional[int],  # noqa: UP045
        "either": Union[int, str],  # noqa: UP007
        "mode": Literal["a", "b"], "when": datetime.datetime, "day": datetime.date,
        "at": datetime.time, "span": datetime.timedelta, "key": uuid.UUID, "money": Decimal,
        "anything": Any, "rest": int, "scale": float, "named": str,
    }
    for name, annotation in plain.items():
        assert params[name].annotation == annotation, name

    color = params["color"].annotation
    assert [(m.name, m.value) for m in color] == [("RED", "red"), ("GREEN", "green")]
    item = params["item"].annotation
    assert [f.name for f in msgspec.structs.fields(item)] == ["name", "price"]
    assert item.__struct_config__.tag == "item" and item.__struct_config__.array_like
    assert msgspec.structs.fields(item)[1].default == Decimal("1.50")
    with pytest.raises(TypeError):
        item("tea")  # keyword-only, as the original
    point = params["point"].annotation  # a dataclass, rebuilt as a Struct of its shape
    assert [(f.name, f.type, f.required) for f in msgspec.structs.fields(point)] == [
        ("x", float, True), ("y", float, False)
    ]
    movie = params["movie"].annotation
    assert typing.is_typeddict(movie) and movie.__optional_keys__ == {"title", "year"}
    pair = params["pair"].annotation
    assert pair._fields == ("left", "right") and pair._field_defaults == {"right": "r"}
    summary = sig.return_annotation
    assert summary.__qualname__ == "Summary" and summary.__struct_config__.frozen
    assert typing.get_type_hints(summary)["point"] is point

    when = datetime.datetime(2026, 1, 2, 3, 4, tzinfo=datetime.UTC)
    key = uuid.UUID(int=7)
    arguments = (
        1, 2.5, "s", b"\x00", True, [1], {"a": 1}, (1, "x"), {3}, frozenset({"n"}), None, "e",
        "b", color.GREEN, when, when.date(), datetime.time(5), datetime.timedelta(seconds=6),
        key, Decimal("9.99"), item(name="tea"), point(1.0, 2.0), movie(title="Alien"), pair(4),
        [None], 7, 8,
    )
    returned = remote(*arguments, scale=2.0, who="me")
    assert type(returned) is summary
    assert returned.point == point(2.0, 1.0)
    assert returned.text.startswith("1|2.5|s|b'\\x00'|True|[1]|{'a': 1}|(1, 'x')|[3]|['n']|None|e|b|")
    assert "|green|2026-01-02T03:04:00+00:00|" in returned.text
    assert returned.text.endswith("|(7, 8)|2.0|[('who', 'me')]")

    with pytest.raises(scatter.ValidationError) as caught:
        remote(*arguments[:21], point(1.0, "far"), *arguments[22:])
    assert caught.value.parameter == "point" and caught.value.path == "$.point.y"
    with pytest.raises(scatter.ValidationError) as caught:
        remote(*arguments[:12], "c", *arguments[13:])
    assert caught.value.parameter == "mode"

    assert not (markers / f"loaded-by-{os.getpid()}").exists()


class Box:
    """A plain class: msgspec cannot encode it, so it travels pickled (an opaque type)."""

    def __init__(self, value: int) -> None:
        self.value = value


def unbox(box: Box) -> int:
    return box.value


@pytest.mark.timeout(90)
def test_a_call_only_client_cannot_make_a_worker_unpickle(
    client: scatter.Client, tmp_path: Path
) -> None:
    # Found by the fuzzing helper: a call-only secret could run code on a worker by
    # sending a pickle for a parameter of an opaque type. The worker's ZAP now tells it
    # the caller's role, and a call-only caller's pickles are refused unloaded.
    from scatter._config import default_data_dir
    from scatter._security import call_only_secret, read_user_secret

    client.publish(unbox)
    marker = tmp_path / "unpickled-for-a-call-only-client"
    cluster_secret = read_user_secret(default_data_dir())
    assert cluster_secret is not None
    leased = client.request(lambda i: _wire.Lease(i))
    context = zmq.Context()
    try:
        caller = dealer(context, leased.endpoint, secret=call_only_secret(cluster_secret))
        tripwire = msgspec.msgpack.Ext(1, pickle.dumps(Tripwire(marker)))
        refused = _raw_call(caller, "unbox", {"box": tripwire})
        assert isinstance(refused, _wire.Failure) and refused.kind == "forbidden", refused
        assert "call-only" in refused.message
        assert not marker.exists(), "the worker unpickled a call-only client's argument"
        # The cluster secret's holder may still pass a Box (deploy role, over TCP too).
        owner = dealer(context, leased.endpoint, secret=cluster_secret)
        box = msgspec.msgpack.Ext(1, cloudpickle.dumps(Box(7)))
        done = _raw_call(owner, "unbox", {"box": box})
        assert isinstance(done, _wire.Result) and msgspec.msgpack.decode(done.value) == 7
    finally:
        context.destroy(linger=0)


def _box_that_marks(directory: Path) -> Box:
    # Loaded by a worker (it checks its own results), or by a caller: the marker names
    # the process that loaded the pickle.
    (directory / f"loaded-by-{os.getpid()}").touch()
    return Box(0)


class TrappedBox(Box):
    """A Box whose pickle, once loaded, marks the process that loaded it."""

    def __init__(self, directory: Path) -> None:
        super().__init__(0)
        self.directory = directory

    def __reduce__(self) -> tuple[Any, ...]:
        return (_box_that_marks, (self.directory,))


def trapped(directory: str) -> Box:
    return TrappedBox(Path(directory))


@pytest.mark.timeout(90)
def test_a_call_only_client_never_unpickles_a_result(
    client: scatter.Client, node: LocalNode, tmp_path: Path
) -> None:
    # Found in review: a result (or a stream item) of an opaque type was unpickled by
    # every caller, so a publisher's code ran in call-only clients too.
    from scatter._config import default_data_dir
    from scatter._security import call_only_secret, read_user_secret

    client.publish(trapped)
    mine = tmp_path / f"loaded-by-{os.getpid()}"
    cluster_secret = read_user_secret(default_data_dir())
    assert cluster_secret is not None
    with scatter.Client(
        node.address, autostart=False, secret=call_only_secret(cluster_secret)
    ) as caller:
        with pytest.raises(scatter.ValidationError, match="call-only") as caught:
            caller.make_callable("trapped")(str(tmp_path))
        assert caught.value.parameter == "return"
        assert not mine.exists(), "a call-only client unpickled a result"
    # The cluster secret's holder loads it: the tripwire is real.
    assert isinstance(client.make_callable("trapped")(str(tmp_path)), Box)
    assert mine.exists()
