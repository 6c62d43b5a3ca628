"""Wire invariants that the fast paths rely on."""

from __future__ import annotations

import inspect

import msgspec

from scatter import _wire
from scatter._core._signature import build_call_spec


def _spec(annotation: object) -> object:
    def f() -> None: ...

    sig = inspect.Signature(return_annotation=annotation)
    return build_call_spec("f", sig)


def test_one_pass_reply_is_a_result_on_the_wire() -> None:
    tag = _wire.Result.__struct_config__.tag
    for annotation, value in [(int, 3), (float, 2.5), (str, "x"), (list[int], [1, 2]), (None, None)]:
        spec = _spec(annotation)
        fast = spec.encode_reply(tag, 7, 2, value)  # type: ignore[attr-defined]
        slow = _wire.encoder.encode(_wire.Result(7, 2, msgspec.Raw(msgspec.msgpack.encode(value))))
        assert fast == slow
        reply = _wire.worker_reply_decoder.decode(fast)
        assert isinstance(reply, _wire.Result)
        assert (reply.id, reply.version, msgspec.msgpack.decode(reply.value)) == (7, 2, value)


def test_plain_result_of_the_wrong_type_is_refused_by_the_slow_path() -> None:
    import pytest

    import scatter

    spec = _spec(int)
    with pytest.raises(scatter.ValidationError, match="return annotation int"):
        spec.encode_reply(2, 1, 1, True)  # type: ignore[attr-defined]
