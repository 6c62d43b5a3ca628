"""Ints beyond 64 bits (rule 7 of scatter/_core/_signature.py): the fallback encodes and
validates exactly as the usual path does, and the usual path never takes it."""

from __future__ import annotations

import inspect
from typing import Any

import msgspec
import pytest

import scatter
from scatter import _wire
from scatter._core import _signature
from scatter._core._signature import (
    BIG_INT_EXT_CODE,
    ENCODER,
    PICKLE_EXT_CODE,
    big_int_ext,
    build_call_spec,
    decode_with_big_ints,
    decoding,
    encode_with_big_ints,
)
from tests.node.test_types import BIG_CASES, CASES

TAG: int = _wire.Result.__struct_config__.tag  # type: ignore[assignment]
BIG_CASES_BY_TYPE = [(annotation, value) for _label, annotation, value in BIG_CASES]


def _spec(params: dict[str, Any], returns: Any, *, caller: bool = False) -> Any:
    sig = inspect.Signature(
        [
            inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=a)
            for name, a in params.items()
        ],
        return_annotation=returns,
    )
    return build_call_spec("f", sig, caller=caller)


def test_the_extension_is_the_ints_own_bytes_under_a_code_of_its_own() -> None:
    assert BIG_INT_EXT_CODE != PICKLE_EXT_CODE
    for value, data in [
        (2**64, b"\x01" + bytes(8)),
        (-(2**63) - 1, b"\xff\x7f" + b"\xff" * 7),
        (-(2**64), b"\xff" + bytes(8)),
        (2**71 - 1, b"\x7f" + b"\xff" * 8),
    ]:
        ext = big_int_ext(value)
        assert (ext.code, ext.data) == (BIG_INT_EXT_CODE, data)
        assert int.from_bytes(ext.data, "big", signed=True) == value
    # Only ints msgpack cannot carry take it: the edges stay plain msgpack ints.
    for edge in (2**64 - 1, -(2**63)):
        assert encode_with_big_ints([edge]) == ENCODER.encode([edge])
    assert encode_with_big_ints([2**64]) == ENCODER.encode([big_int_ext(2**64)])


@pytest.mark.parametrize(("label", "annotation", "value"), CASES, ids=[c[0] for c in CASES])
def test_the_fallback_encodes_and_decodes_as_the_usual_path(
    label: str, annotation: Any, value: Any
) -> None:
    # Encoding: to_builtins flattens every supported type to the bytes the encoder makes.
    assert encode_with_big_ints(value) == ENCODER.encode(value)
    # Decoding: with a big int beside it, a value decodes through untyped decoding and
    # msgspec.convert to what typed decoding makes of it.
    both = tuple[annotation, int]  # type: ignore[valid-type]
    expected = decoding(annotation, unpickle=True)(ENCODER.encode(value))
    decoded = decode_with_big_ints(both, encode_with_big_ints((value, 2**70)), unpickle=True)
    assert decoded == (expected, 2**70)
    assert type(decoded[0]) is type(expected)


@pytest.mark.parametrize(
    ("annotation", "wrong"),
    [
        (int, "1"),
        (int, 1.5),
        (int, True),
        (str, 1),
        (bytes, "aGk="),  # no base64 for bytes: msgpack carries bytes as bytes
        (float, "1.0"),
        (bool, 1),
        (list[int], [1, "2"]),
        (dict[str, int], {"a": "b"}),
        (dict[int, str], {"1": "a"}),
        (tuple[int, str], [1, 2]),
    ],
)
def test_the_fallback_refuses_what_typed_decoding_refuses(annotation: Any, wrong: Any) -> None:
    both = tuple[annotation, int]  # type: ignore[valid-type]
    with pytest.raises(msgspec.ValidationError) as typed:
        decoding(both, unpickle=True)(ENCODER.encode((wrong, 1)))
    with pytest.raises(msgspec.ValidationError) as fallback:
        decode_with_big_ints(both, encode_with_big_ints((wrong, 2**70)), unpickle=True)
    assert str(fallback.value) == str(typed.value)


def test_a_big_int_goes_where_an_int_goes_and_nowhere_else() -> None:
    for annotation, value in BIG_CASES_BY_TYPE:
        spec = _spec({"x": annotation}, annotation)
        payload = spec.encode_arguments((value,), {})
        assert spec.decode_arguments(payload) == {"x": value}
        reply = _wire.worker_reply_decoder.decode(spec.encode_reply(TAG, 1, 1, value))
        assert isinstance(reply, _wire.Result)
        assert spec.decode_result(reply.value) == value
    floats = _spec({"x": float}, float)
    assert floats.decode_arguments(floats.encode_arguments((10**30,), {})) == {"x": 1e30}
    reply = _wire.worker_reply_decoder.decode(floats.encode_reply(TAG, 1, 1, 10**30))
    assert isinstance(reply, _wire.Result)
    assert floats.decode_result(reply.value) == 1e30
    with pytest.raises(scatter.ValidationError, match="Number out of range"):
        floats.encode_arguments((10**400,), {})
    with pytest.raises(scatter.ValidationError, match="Number out of range"):
        floats.encode_reply(TAG, 1, 1, 10**400)
    for annotation in (str, bool, bytes, list[int], dict[str, int]):
        spec = _spec({"x": annotation}, annotation)
        with pytest.raises(scatter.ValidationError) as caught:
            spec.encode_arguments((10**30,), {})
        assert caught.value.parameter == "x"
        with pytest.raises(scatter.ValidationError) as caught:
            spec.encode_reply(TAG, 1, 1, 10**30)
        assert caught.value.parameter == "return"


def test_the_usual_path_never_takes_the_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> Any:
        raise AssertionError("the big-int fallback ran for a value that needs none")

    monkeypatch.setattr(_signature, "encode_with_big_ints", refuse)
    monkeypatch.setattr(_signature, "decode_with_big_ints", refuse)
    spec = _spec({"a": int, "b": int}, int)
    payload = spec.encode_arguments((1, 2), {})
    assert spec.decode_arguments(payload) == {"a": 1, "b": 2}
    reply = spec.encode_reply(TAG, 1, 1, 2**64 - 1)
    decoded = _wire.worker_reply_decoder.decode(reply)
    assert isinstance(decoded, _wire.Result)
    assert spec.decode_result(decoded.value) == 2**64 - 1
    # A plain validation error does not look for big ints either.
    with pytest.raises(scatter.ValidationError):
        spec.encode_arguments((1, "2"), {})
