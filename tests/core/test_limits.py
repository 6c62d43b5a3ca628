"""The input limits of _wire.py: each refuses one past it, takes it exactly, and a refusal
is a ``protocol`` failure, never a dead serve loop."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import msgspec
import pytest
import zmq

from cluster import fuzz_corpus
from cluster.launch import free_port
from scatter import _wire
from scatter._config import NodeConfig
from scatter._core._registry import (
    Change,
    VaporizeOp,
    change_batch_decoder,
    change_decoder,
)
from scatter._core._vclock import VectorClock
from scatter._node._server import _bind_control
from scatter._node._worker import worker_socket
from scatter._security import new_secret, node_keys

DEEP = b"\x91" * 100_000 + b"\xc0"  # 100,000 nested arrays: 100 kB, far below the frame limit


def node_reply(payload: bytes) -> Any:
    core = fuzz_corpus.base_disk().core()
    (send,) = core.receive(b"peer", payload, role="deploy", now=1.0, wall=1.0, readings=dict)
    return _wire.control_reply_decoder.decode(send.payload)


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Any:
    built = fuzz_corpus.build_worker(tmp_path_factory.mktemp("worker"))
    yield built
    built.store.close()
    built.slots.close()


def worker_reply(worker: Any, payload: bytes) -> Any:
    return _wire.worker_reply_decoder.decode(worker.handle(payload))


def call(name: str = "sample", signature_id: str = "", args: bytes = b"\x81\xa1a\x01") -> bytes:
    return _wire.encoder.encode(_wire.Call(1, name, 0, 1, signature_id, 0.0, msgspec.Raw(args)))


# -- strings ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("limit", "build"),
    [
        (_wire.MAX_NAME_CHARS, lambda text: _wire.Vaporize(1, text)),
        (_wire.MAX_NAME_CHARS, lambda text: _wire.PublishSet(1, text, [])),
        (_wire.MAX_ID_CHARS, lambda text: fuzz_corpus.publish(fuzz_corpus.m1, content_id=text)),
        (_wire.MAX_ID_CHARS, lambda text: fuzz_corpus.publish(fuzz_corpus.m1, python=text)),
        (
            _wire.MAX_TEXT_CHARS,
            lambda text: fuzz_corpus.publish(fuzz_corpus.m1, signature_text=text),
        ),
    ],
)
def test_control_strings_past_their_limit_are_protocol_failures(limit: int, build: Any) -> None:
    at_limit = node_reply(_wire.encoder.encode(build("x" * limit)))
    assert not (isinstance(at_limit, _wire.Failure) and at_limit.kind == "protocol")
    past = node_reply(_wire.encoder.encode(build("x" * (limit + 1))))
    assert isinstance(past, _wire.Failure) and past.kind == "protocol"
    assert f"length <= {limit}" in past.message


def test_call_names_and_signature_ids_past_their_limit_are_protocol_failures(worker: Any) -> None:
    name = worker_reply(worker, call("x" * _wire.MAX_NAME_CHARS))
    assert name.kind == "not_found"
    for frame in (
        call("x" * (_wire.MAX_NAME_CHARS + 1)),
        call(signature_id="s" * (_wire.MAX_ID_CHARS + 1)),
    ):
        reply = worker_reply(worker, frame)
        assert isinstance(reply, _wire.Failure) and reply.kind == "protocol", reply


# -- collections ------------------------------------------------------------------------


def test_a_set_of_more_members_than_the_limit_is_a_protocol_failure() -> None:
    member = fuzz_corpus.publish(fuzz_corpus.m1, 0)
    members = [
        msgspec.structs.replace(member, name=f"f{i}") for i in range(_wire.MAX_SET_MEMBERS + 1)
    ]
    reply = node_reply(_wire.encoder.encode(_wire.PublishSet(1, "big", members)))
    assert isinstance(reply, _wire.Failure) and reply.kind == "protocol"
    assert f"length <= {_wire.MAX_SET_MEMBERS}" in reply.message
    # (test_node_core's test_a_change_writes_only_the_views_it_moved publishes exactly the limit)


def _change(ops: int, entries: int = 1) -> Change:
    clock = {"o": 1} | {f"w{i}": 1 for i in range(entries - 1)}
    vaporize = tuple(VaporizeOp(name=f"f{i}") for i in range(ops))
    return Change(change_id="o:1", origin="o", clock=VectorClock(clock), at=0.0, ops=vaporize)


@pytest.mark.parametrize(
    ("decoder", "at_limit", "past_it"),
    [
        (change_decoder, _change(_wire.MAX_CHANGE_OPS), _change(_wire.MAX_CHANGE_OPS + 1)),
        (
            change_decoder,
            _change(1, entries=_wire.MAX_CLOCK_ENTRIES),
            _change(1, entries=_wire.MAX_CLOCK_ENTRIES + 1),
        ),
        (
            change_batch_decoder,
            [_change(1)] * _wire.MAX_BATCH_CHANGES,
            [_change(1)] * (_wire.MAX_BATCH_CHANGES + 1),
        ),
        (
            msgspec.msgpack.Decoder(VectorClock),
            VectorClock({"x" * _wire.MAX_ID_CHARS: 1}),
            VectorClock({"x" * (_wire.MAX_ID_CHARS + 1): 1}),
        ),
    ],
    ids=["ops in a change", "clock entries", "changes in a batch", "clock ids"],
)
def test_changes_from_peers_past_a_limit_do_not_decode(
    decoder: msgspec.msgpack.Decoder[Any], at_limit: Any, past_it: Any
) -> None:
    decoder.decode(_wire.encoder.encode(at_limit))
    with pytest.raises(msgspec.ValidationError, match="length <="):
        decoder.decode(_wire.encoder.encode(past_it))


# -- frames and nesting -----------------------------------------------------------------


def test_a_frame_past_the_size_limit_is_refused_before_decoding(worker: Any) -> None:
    reply = worker_reply(worker, b"\x00" * (worker.max_message_bytes + 1))
    assert reply.kind == "protocol" and "refused: the limit is" in reply.message


def test_a_control_frame_nested_100000_deep_is_a_protocol_failure_not_a_dead_node() -> None:
    """Found while measuring: the extra field of a Status was skipped recursively, the
    RecursionError escaped NodeCore.receive, and so the node's serve loop."""
    reply = node_reply(b"\x93\x13\x01" + DEEP)  # [Status tag, id, <100,000 nested arrays>]
    assert isinstance(reply, _wire.Failure) and reply.kind == "protocol"
    assert "recursion" in reply.message


def test_a_call_nested_100000_deep_is_a_protocol_failure_not_internal(worker: Any) -> None:
    reply = worker_reply(worker, call(args=DEEP))
    assert isinstance(reply, _wire.Failure) and reply.kind == "protocol"
    fine = worker_reply(
        worker, call(args=b"\x82\xa1a\x01\xa1c" + b"\x91" * 1 + b"\xcb" + b"\0" * 8)
    )
    assert isinstance(fine, _wire.Result)


def test_values_nested_a_few_hundred_deep_still_decode() -> None:
    nested = b"\x91" * 300 + b"\xc0"
    decoded = _wire.call_decoder.decode(call(args=nested))
    assert bytes(decoded.args) == nested


def test_a_worker_whose_function_raised_the_recursion_limit_survives_a_deep_frame(
    tmp_path: Path,
) -> None:
    """Found while measuring: on Python 3.11 msgspec's nesting guard is the recursion limit,
    so after a function's sys.setrecursionlimit(10**6) a 100,000-deep frame overflowed
    the C stack and the worker died of SIGSEGV. It runs in a child: a regression crashes."""
    script = textwrap.dedent(
        f"""
        import sys
        from pathlib import Path
        import msgspec
        from cluster import fuzz_corpus
        from scatter import _wire
        worker = fuzz_corpus.build_worker(Path({str(tmp_path)!r}))
        sys.setrecursionlimit(10**6)
        deep = b"\\x91" * 1_000_000 + b"\\xc0"
        frame = _wire.encoder.encode(_wire.Call(1, "sample", 0, 1, "", 0.0, msgspec.Raw(deep)))
        print(_wire.worker_reply_decoder.decode(worker.handle(frame)).kind)
        print(sys.getrecursionlimit())
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["protocol", str(10**6)]


def test_arguments_that_do_not_decode_are_a_validation_failure_without_a_log_line(
    worker: Any, capfd: pytest.CaptureFixture[str]
) -> None:
    """Found by the fuzzer: invalid UTF-8 in the arguments took the unexpected-error path,
    which logs a line to the node's log for every such call a peer sends."""
    reply = worker_reply(worker, call(args=b"\x82\xa1a\x01\xa1b\xa1\xff"))  # b: bad UTF-8
    assert reply.kind == "validation" and "Invalid UTF-8" in reply.message
    assert capfd.readouterr().err == ""


# -- queues -----------------------------------------------------------------------------


def test_each_peer_may_queue_a_bounded_number_of_frames_on_node_and_worker() -> None:
    config = NodeConfig.local(address=f"tcp://127.0.0.1:{free_port()}")
    control = _bind_control(config, node_keys(new_secret()))
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    worker = worker_socket(context, 1024)
    try:
        for sock in (control, worker):
            assert sock.getsockopt(zmq.RCVHWM) == _wire.PEER_QUEUE_FRAMES
            assert sock.getsockopt(zmq.SNDHWM) == _wire.PEER_REPLY_FRAMES
    finally:
        control.close(linger=0)
        worker.close(linger=0)
        context.term()
