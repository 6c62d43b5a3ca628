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
        # A Result's fields in order; its last, output, left out when the call wrote nothing.
        slow = _wire.encoder.encode(_wire.Result(7, 2, msgspec.Raw(msgspec.msgpack.encode(value))))
        assert (fast[0], slow[0]) == (0x94, 0x95)  # msgpack arrays of 4 and 5 elements
        assert fast[1:] == slow[1:-1] and slow[-1:] == b"\x90"  # the 5th: an empty list
        reply = _wire.worker_reply_decoder.decode(fast)
        assert isinstance(reply, _wire.Result)
        assert (reply.id, reply.version, msgspec.msgpack.decode(reply.value)) == (7, 2, value)
        assert reply.output == []
        printed = [(1, "(f pid=1) hi\n"), (2, "(f pid=1) oops\n")]
        with_output = spec.encode_reply(tag, 7, 2, value, printed)  # type: ignore[attr-defined]
        reply = _wire.worker_reply_decoder.decode(with_output)
        assert isinstance(reply, _wire.Result) and reply.output == printed
        assert msgspec.msgpack.decode(reply.value) == value


def test_plain_result_of_the_wrong_type_is_refused_by_the_slow_path() -> None:
    import pytest

    import scatter

    spec = _spec(int)
    with pytest.raises(scatter.ValidationError, match="return annotation int"):
        spec.encode_reply(2, 1, 1, True)  # type: ignore[attr-defined]
