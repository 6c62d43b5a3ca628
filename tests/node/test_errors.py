"""Bad input gets its own clear error, and the node keeps serving afterwards."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
import zmq

import scatter
from cluster.launch import LocalNode, free_port, process_gone
from scatter import _wire
from scatter._client import start_background_node
from scatter._config import NodeConfig
from tests.raw_sockets import dealer
from tests.waiting import wait_until


def add(a: int, b: int) -> int:
    return a + b


@pytest.fixture
def with_add(connected: LocalNode) -> Iterator[scatter.RemoteFunction]:
    scatter.scatter(add)
    yield scatter.make_callable("add")


def still_serving(remote: scatter.RemoteFunction) -> None:
    assert remote(20, 22) == 42


@pytest.mark.timeout(60)
def test_wrong_arity_is_pythons_own_type_error(with_add: scatter.RemoteFunction) -> None:
    with pytest.raises(TypeError) as caught:
        with_add(1)
    assert str(caught.value) == "add() missing 1 required positional argument: 'b'"
    assert not isinstance(caught.value, scatter.ScatterError)
    with pytest.raises(TypeError, match=r"add\(\) takes 2 positional arguments but 3 were given"):
        with_add(1, 2, 3)
    with pytest.raises(TypeError, match="unexpected keyword argument 'c'"):
        with_add(1, 2, c=3)
    still_serving(with_add)


@pytest.mark.timeout(60)
def test_wrong_type_names_parameter_and_path(with_add: scatter.RemoteFunction) -> None:
    with pytest.raises(scatter.ValidationError) as caught:
        with_add(1, "two")  # type: ignore[arg-type]
    assert isinstance(caught.value, TypeError)
    assert caught.value.parameter == "b"
    assert caught.value.path == "$.b"
    assert "argument 'b'" in str(caught.value) and "Expected `int`, got `str`" in str(caught.value)
    still_serving(with_add)


@pytest.mark.timeout(60)
def test_unknown_function_and_version(with_add: scatter.RemoteFunction) -> None:
    with pytest.raises(scatter.FunctionNotFound, match="no function named 'nope'"):
        scatter.make_callable("nope")
    with pytest.raises(scatter.VersionNotFound, match="version 7"):
        scatter.make_callable("add", version=7)
    assert isinstance(scatter.FunctionNotFound("x"), LookupError)
    still_serving(with_add)


@pytest.mark.timeout(60)
def test_exception_inside_function_reraises_with_remote_details(connected: LocalNode) -> None:
    @scatter.scatter
    def divide(a: float, b: float) -> float:
        if b == 0:
            raise ZeroDivisionError("b must not be zero here")
        return a / b

    remote = scatter.make_callable("divide")
    with pytest.raises(scatter.RemoteError) as caught:
        remote(1.0, 0.0)
    error = caught.value
    assert error.remote_type == "ZeroDivisionError"
    assert error.remote_message == "b must not be zero here"
    assert 'raise ZeroDivisionError("b must not be zero here")' in error.remote_traceback
    assert "_worker.py" not in error.remote_traceback
    assert remote(1.0, 4.0) == 0.25


@pytest.mark.timeout(60)
def test_wrong_return_type_is_a_validation_error(connected: LocalNode) -> None:
    @scatter.scatter
    def liar(a: int) -> int:
        return str(a)  # type: ignore[return-value]

    with pytest.raises(scatter.ValidationError) as caught:
        scatter.make_callable("liar")(3)
    assert caught.value.parameter == "return"
    assert "return annotation int" in str(caught.value)


@pytest.mark.timeout(60)
def test_hung_function_times_out_while_other_calls_go_on(
    with_add: scatter.RemoteFunction, node: LocalNode
) -> None:
    @scatter.scatter(timeout=1.5)
    def hang(seconds: float) -> float:
        time.sleep(seconds)
        return seconds

    hang_remote = scatter.make_callable("hang")
    outcome: dict[str, BaseException | float] = {}

    def call_hang() -> None:
        try:
            outcome["hang"] = hang_remote(120.0)
        except BaseException as exc:
            outcome["hang"] = exc

    thread = threading.Thread(target=call_hang)
    started = time.monotonic()
    thread.start()
    other = scatter.Client(node.address, autostart=False)
    try:
        quick = other.make_callable("add")
        served = 0
        while thread.is_alive() and time.monotonic() - started < 30:
            assert quick(1, served) == 1 + served
            served += 1
        thread.join(30)
    finally:
        other.close()
    assert isinstance(outcome["hang"], scatter.CallTimeout), outcome
    assert isinstance(outcome["hang"], TimeoutError)
    # The soft interrupt ended it (not the kill, not the client giving up).
    assert "ran past its timeout of 1.5 s and was interrupted" in str(outcome["hang"])
    assert served > 10  # calls went on while the hung one waited for its deadline
    assert hang_remote.call(0.01) == 0.01
    with pytest.raises(scatter.CallTimeout, match=r"timeout of 0\.3 s and was interrupted"):
        hang_remote.call(5.0, timeout=0.3)  # a per-call timeout beats the function's


def worker_pid() -> int:
    return os.getpid()


@pytest.mark.timeout(60)
def test_function_ignoring_the_interrupt_is_killed_and_replaced(
    with_add: scatter.RemoteFunction, node: LocalNode, tmp_path: Path
) -> None:
    timeout = 0.5
    kill_grace = NodeConfig().kill_grace  # the node fixture runs with the default
    # The client gives up on its own at timeout + 3 s with "no reply within ...": only
    # the node's SIGKILL ends the call sooner, with the message below.
    bound = timeout + kill_grace + 1.5

    @scatter.scatter(timeout=timeout)
    def stubborn(pid_file: str) -> None:
        # Deaf to the worker's own alarm: only the node's kill ends it.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
        Path(pid_file).write_text(str(os.getpid()))
        time.sleep(60)

    scatter.scatter(worker_pid)
    pid_file = tmp_path / "stubborn.pid"
    remote = scatter.make_callable("stubborn")
    started = time.monotonic()
    with pytest.raises(scatter.CallTimeout) as caught:
        remote(str(pid_file))
    elapsed = time.monotonic() - started
    message = str(caught.value)
    assert "ran past its timeout of 0.5 s; its worker was stopped and replaced" in message
    assert elapsed < bound, f"took {elapsed:.2f} s: the worker was not killed in time"
    stubborn_pid = int(pid_file.read_text())
    wait_until(lambda: process_gone(stubborn_pid), 10, f"stubborn's worker {stubborn_pid} is gone")
    new_pid = scatter.make_callable("worker_pid")()
    assert new_pid != stubborn_pid and not process_gone(new_pid)
    assert node.process is not None and node.process.poll() is None
    with scatter.Client(node.address, autostart=False) as other:
        assert other.status().pid == node.pid
    still_serving(with_add)


@pytest.mark.timeout(60)
def test_function_that_exits_its_interpreter_costs_only_that_call(
    with_add: scatter.RemoteFunction,
) -> None:
    @scatter.scatter
    def crash(code: int) -> int:
        os._exit(code)

    with pytest.raises(scatter.WorkerCrashed, match="exited before answering"):
        scatter.make_callable("crash")(3)
    still_serving(with_add)
    for _ in range(20):
        still_serving(with_add)


@pytest.mark.timeout(30)
def test_functions_that_cannot_be_remote_are_refused_at_scatter_time(connected: LocalNode) -> None:
    def untyped(a, b):  # type: ignore[no-untyped-def]
        return a + b

    with pytest.raises(scatter.NotScatterable, match="needs annotations for: a, b, return"):
        scatter.scatter(untyped)

    def numbers(n: int) -> list[int]:
        yield from range(n)  # type: ignore[misc]

    with pytest.raises(scatter.NotScatterable, match="generator"):
        scatter.scatter(numbers)

    with pytest.raises(scatter.NotScatterable, match="not a usable function name"):
        scatter.scatter(lambda x: x)
    assert scatter.functions() == []


NAME_RULE = r"function and set names are Python identifiers .* of 1 to 128 characters; got "


def test_a_name_that_breaks_the_rule_is_refused_before_anything_is_sent() -> None:
    # No node listens there: a ConfigError rather than Unreachable proves nothing was sent.
    nowhere = f"tcp://127.0.0.1:{free_port()}"
    scatter.connect(nowhere, autostart=False)
    for bad in ("", "my-func", "a" * 300, "class"):
        with pytest.raises(scatter.ConfigError, match=NAME_RULE):
            scatter.scatter(add, name=bad)  # "" used to mean add's own name
        with pytest.raises(scatter.ConfigError, match=NAME_RULE):
            scatter.FunctionSet(bad)
        with pytest.raises(scatter.ConfigError, match=NAME_RULE):
            scatter.FunctionSet("billing").function(name=bad)
    with pytest.raises(TypeError, match=NAME_RULE + "int 5"):
        scatter.scatter(add, name=5)  # type: ignore[call-overload]  # was AttributeError
    with pytest.raises(TypeError, match=NAME_RULE):
        scatter.FunctionSet(None)  # type: ignore[arg-type]
    with pytest.raises(scatter.NotScatterable, match="not a usable function name: " + NAME_RULE):
        scatter.scatter(lambda x: x)
    with scatter.Client(nowhere, autostart=False) as client:
        with pytest.raises(scatter.ConfigError, match=NAME_RULE + "'my set'"):
            client.publish_set("my set", [(add, None, None)])
        with pytest.raises(scatter.Unreachable):  # a good name does try to send
            client.publish(add, name="add_" + "x" * 124)


def _raw_request(address: str, frames: list[bytes], timeout_ms: int = 5000) -> bytes | None:
    context = zmq.Context()
    sock = dealer(context, address)
    try:
        sock.send_multipart(frames)
        if sock.poll(timeout_ms):
            return sock.recv()
        return None
    finally:
        sock.close()
        context.term()


@pytest.mark.timeout(60)
def test_malformed_frames_to_node_and_worker_get_protocol_errors(
    client: scatter.Client, node: LocalNode
) -> None:
    client.publish(add)
    decoder = msgspec.msgpack.Decoder(_wire.Failure)
    for garbage in (b"", b"\xc1", b"not msgpack at all", msgspec.msgpack.encode([99, 1])):
        reply = _raw_request(node.address, [garbage])
        assert reply is not None
        failure = decoder.decode(reply)
        assert failure.kind == "protocol"
    leased = client.request(lambda i: _wire.Lease(i))
    reply = _raw_request(leased.endpoint, [b"\x93garbage"])
    assert reply is not None and decoder.decode(reply).kind == "protocol"
    # A well-formed call with arguments of the wrong type is refused by the node too:
    # it never trusts the client's validation.
    bad = _wire.Call(1, "add", 0, 0, "", 0.0, msgspec.Raw(msgspec.msgpack.encode({"a": 1, "b": "x"})))
    reply = _raw_request(leased.endpoint, [_wire.encoder.encode(bad)])
    assert reply is not None
    failure = decoder.decode(reply)
    assert failure.kind == "validation" and failure.parameter == "b"
    assert client.make_callable("add")(1, 2) == 3
    assert client.status().workers >= 1


@pytest.mark.timeout(60)
def test_oversized_frame_is_refused_and_node_keeps_serving(
    client: scatter.Client, node: LocalNode
) -> None:
    client.publish(add)
    huge = b"\x00" * (scatter._config.MAX_MESSAGE_BYTES + 1024)
    reply = _raw_request(node.address, [huge])
    assert reply is not None
    failure = msgspec.msgpack.decode(reply, type=_wire.Failure)
    assert failure.kind == "protocol" and "refused: the limit is" in failure.message
    # Far past the limit, zmq itself drops the connection before anything is read.
    assert _raw_request(node.address, [huge + huge[:8192]], timeout_ms=1000) is None
    remote = client.make_callable("add")
    assert remote(1, 2) == 3

    @scatter.scatter(address=node.address)
    def size(data: bytes) -> int:
        return len(data)

    with pytest.raises(scatter.ProtocolError, match="limit"):
        client.make_callable("size")(huge)
    assert client.make_callable("size")(b"abc") == 3


@pytest.mark.timeout(60)
def test_a_body_over_the_frame_limit_says_so_before_sending_and_the_node_serves_on(
    client: scatter.Client,
) -> None:
    # A closure over 70 MiB: past what zmq lets through, where the node drops the frame
    # with its connection, unread (this once read "Unreachable ... start one").
    table = bytes(range(256)) * (70 * 4096)

    def lookup(i: int) -> int:
        return table[i]

    with pytest.raises(scatter.NotScatterable) as caught:
        client.publish(lookup)
    message = str(caught.value)
    assert "cannot ship 'lookup': the body of lookup() pickles to 70.0 MiB" in message
    found = re.search(r"the request is ([\d,]+) bytes", message)
    assert found, message
    over = int(found[1].replace(",", ""))
    assert 6 * 2**20 < over < 6 * 2**20 + 64 * 1024, message
    assert "over the 64.0 MiB a node accepts in one message" in message
    assert "pass it as an argument, or load it inside the function" in message
    # Refused before anything was sent: without a node too, the body is what is blamed.
    with (
        scatter.Client(f"tcp://127.0.0.1:{free_port()}", autostart=False) as nobody,
        pytest.raises(scatter.NotScatterable, match="cannot ship 'lookup'"),
    ):
        nobody.publish(lookup)
    with pytest.raises(scatter.NotScatterable, match="cannot ship the set 'tables'"):
        client.publish_set("tables", [(add, None, None), (lookup, None, None)])
    client.publish(add)
    assert client.make_callable("add")(20, 22) == 42
    assert [row["name"] for row in client.functions()] == ["add"]


@pytest.mark.timeout(60)
def test_a_background_node_that_fails_to_start_is_not_called_unreachable(tmp_path: Path) -> None:
    address = f"tcp://127.0.0.1:{free_port()}"
    with pytest.raises(scatter.ScatterError, match=r"exited with code 2: .*--no-such-option") as caught:
        start_background_node(address, tmp_path / "node", node_options=["--no-such-option"])
    assert not isinstance(caught.value, scatter.Unreachable)  # its log says why, not silence


@pytest.mark.timeout(60)
def test_a_node_that_listens_but_does_not_answer_is_not_called_absent(
    client: scatter.Client, node: LocalNode
) -> None:
    assert client.status().pid == node.pid
    os.kill(node.pid, signal.SIGSTOP)
    try:
        with pytest.raises(scatter.Unreachable) as caught:
            client.request(lambda i: _wire.Status(i), timeout=0.5)
    finally:
        os.kill(node.pid, signal.SIGCONT)
    assert f"the node at {node.address} did not answer within 0.5 s: something listens" in str(
        caught.value
    )
    assert "scatter node start" not in str(caught.value)
    assert client.status().pid == node.pid  # the late answer is skipped by its id


@pytest.mark.timeout(60)
def test_large_arguments_are_validated_as_strictly_as_small_ones(connected: LocalNode) -> None:
    @scatter.scatter
    def total(xs: list[float]) -> float:
        return sum(xs)

    remote = scatter.make_callable("total")
    xs = [float(i) for i in range(1000)]
    assert remote(xs) == sum(xs)
    xs[500] = "five hundred"  # type: ignore[call-overload]
    with pytest.raises(scatter.ValidationError) as caught:
        remote(xs)
    assert (caught.value.parameter, caught.value.path) == ("xs", "$.xs[500]")
    with pytest.raises(scatter.ValidationError, match="got `bool`"):
        remote([1.0] * 999 + [True])


@pytest.mark.timeout(60)
def test_node_default_timeout_applies_to_functions_without_their_own(tmp_path: Path) -> None:
    def nap(seconds: float) -> float:
        time.sleep(seconds)
        return seconds

    with (
        LocalNode(tmp_path / "node", options=["--call-timeout=0.5"]) as short,
        scatter.Client(short.address, autostart=False) as client,
    ):
        client.publish(nap)
        remote = client.make_callable("nap")
        assert remote(0.01) == 0.01
        with pytest.raises(scatter.CallTimeout, match=r"timeout of 0\.5 s and was interrupted"):
            remote(30.0)
        assert remote.call(0.8, timeout=5.0) == 0.8  # a per-call timeout beats the node's
