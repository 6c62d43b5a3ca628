"""A function's exception reaches its caller as an instance of its own class and of
RemoteError (scatter/_client/_remote_errors.py), on real node processes."""

from __future__ import annotations

import os
import pickle
import traceback
from pathlib import Path
from typing import Any

import pytest

import scatter
from cluster.launch import LocalNode
from scatter._exceptions import RemoteTraceback
from scatter._security import call_only_secret


class InsufficientFunds(ValueError):
    def __init__(self, need: int) -> None:
        super().__init__(f"need {need} more")
        self.need = need


class KeywordsOnly(KeyError):
    """An __init__ that cannot be called with ``args`` (where Ray's rebuilding fails)."""

    def __init__(self, *, account: str, missing: int) -> None:
        super().__init__(f"{account} is missing {missing}")
        self.account = account
        self.missing = missing


def withdraw(amount: int) -> int:
    if amount > 100:
        raise InsufficientFunds(amount - 100)
    return 100 - amount


def look_up(account: str) -> int:
    raise KeywordsOnly(account=account, missing=3)


def divide(a: float, b: float) -> float:
    return a / b


def leave(code: int) -> int:
    raise SystemExit(code)


@pytest.mark.timeout(90)
def test_a_remote_exception_is_caught_by_its_own_class_and_its_bases(
    client: scatter.Client,
) -> None:
    for fn in (withdraw, look_up, divide, leave):
        client.publish(fn)
    remote = client.make_callable("withdraw")

    with pytest.raises(InsufficientFunds) as caught:
        remote(150)
    error = caught.value
    assert isinstance(error, ValueError) and isinstance(error, scatter.RemoteError)
    assert error.need == 50
    assert str(error) == "need 50 more"
    assert error.args == ("need 50 more",)
    assert error.remote_type == f"{__name__}.InsufficientFunds"
    assert isinstance(error.__cause__, RemoteTraceback)
    assert "raise InsufficientFunds(amount - 100)" in str(error.__cause__)
    printed = "".join(traceback.format_exception(error))
    assert "raise InsufficientFunds(amount - 100)" in printed  # the cause, printed above
    try:
        remote(130)
    except ValueError as plain_except:  # what a caller writes without knowing of Scatter
        assert plain_except.need == 30  # type: ignore[attr-defined]
    assert remote(30) == 70

    with pytest.raises(KeywordsOnly) as odd:
        client.make_callable("look_up")("savings")
    assert (odd.value.account, odd.value.missing) == ("savings", 3)
    assert str(odd.value) == "'savings is missing 3'"  # KeyError's own str: a repr

    with pytest.raises(ZeroDivisionError, match="division by zero") as builtin:
        client.make_callable("divide")(1.0, 0.0)
    assert isinstance(builtin.value, scatter.RemoteError)
    # A pickled copy is the plain RemoteError: the dual class exists in this process only.
    copy = pickle.loads(pickle.dumps(builtin.value))
    assert type(copy) is scatter.RemoteError and copy.remote_type == "ZeroDivisionError"

    # Never SystemExit on the caller on a function's behalf.
    with pytest.raises(scatter.RemoteError) as exit_error:
        client.make_callable("leave")(3)
    assert type(exit_error.value) is scatter.RemoteError
    assert exit_error.value.remote_type == "SystemExit"


class Tripwire:
    """Pickles as a call to ``Path.touch(marker)``: loading the pickle creates the marker."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


def _publish_local_classes(client: scatter.Client) -> None:
    def overdrawn(need: int) -> int:
        class Overdrawn(ArithmeticError):  # no caller can import it: it goes by value
            pass

        error = Overdrawn(f"short by {need}")
        error.need = need  # type: ignore[attr-defined]
        raise error

    def trap(marker: str) -> int:
        class Trap(ValueError):
            def __reduce__(self) -> tuple[Any, ...]:
                return (Path.touch, (Path(marker),))

        raise Trap("loading my pickle runs code")

    client.publish(overdrawn)
    client.publish(trap)


@pytest.mark.timeout(90)
def test_a_class_no_caller_can_import_comes_by_value_only_to_a_deploying_client(
    client: scatter.Client, node: LocalNode, tmp_path: Path
) -> None:
    _publish_local_classes(client)
    with pytest.raises(ArithmeticError) as caught:
        client.make_callable("overdrawn")(7)
    assert type(caught.value).__name__ == "Overdrawn"
    assert isinstance(caught.value, scatter.RemoteError)
    assert caught.value.need == 7  # type: ignore[attr-defined]
    assert str(caught.value) == "short by 7"

    # A call-only client never loads a pickle the publisher chose: plain RemoteError,
    # with the attributes plain msgpack carries still readable from its message.
    marker = tmp_path / "exception-pickle-loaded"
    cluster_secret = (Path(os.environ["XDG_DATA_HOME"]) / "scatter" / "secret").read_text()
    for transport in ("auto", "tcp"):  # the Unix socket (role "") and CURVE (role "call")
        with scatter.Client(
            node.address,
            autostart=False,
            secret=call_only_secret(cluster_secret.strip()),
            transport=transport,  # type: ignore[arg-type]
        ) as caller:
            with pytest.raises(scatter.RemoteError) as plain:
                caller.make_callable("overdrawn")(7)
            assert type(plain.value) is scatter.RemoteError, transport
            assert plain.value.remote_type.endswith("Overdrawn")
            assert "short by 7" in str(plain.value)
            with pytest.raises(scatter.RemoteError) as trapped:
                caller.make_callable("trap")(str(marker))
            assert type(trapped.value) is scatter.RemoteError
            assert not marker.exists(), f"a call-only client loaded a pickle ({transport})"


@pytest.mark.timeout(60)
def test_the_worker_sends_no_exception_pickle_to_a_call_only_key(
    client: scatter.Client, tmp_path: Path
) -> None:
    import msgspec
    import zmq

    from scatter import _wire
    from scatter._config import default_data_dir
    from scatter._security import read_user_secret
    from tests.raw_sockets import dealer

    _publish_local_classes(client)
    cluster_secret = read_user_secret(default_data_dir())
    assert cluster_secret is not None
    leased = client.request(lambda i: _wire.Lease(i))
    context = zmq.Context()
    try:
        replies = {}
        for role, secret in (("call", call_only_secret(cluster_secret)), ("deploy", cluster_secret)):
            sock = dealer(context, leased.endpoint, secret=secret)
            args = msgspec.msgpack.encode({"need": 7})
            sock.send(_wire.encoder.encode(_wire.Call(1, "overdrawn", 0, 0, "", 0.0, msgspec.Raw(args))))
            try:
                assert sock.poll(20_000), role
                replies[role] = _wire.worker_reply_decoder.decode(sock.recv())
            finally:
                sock.close(linger=0)
        for reply in replies.values():
            assert isinstance(reply, _wire.Failure) and reply.kind == "remote", reply
            assert msgspec.msgpack.decode(reply.remote_args) == ["short by 7"]
            assert msgspec.msgpack.decode(reply.remote_attributes) == {"need": 7}
        assert replies["call"].remote_pickle == b""
        assert replies["deploy"].remote_pickle != b""
    finally:
        context.destroy(linger=0)


SUBCLASSED_HERE: list[str] = []


class Hooked(ValueError):
    """A class whose subclassing runs code: a caller that built its dual class ran it."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        SUBCLASSED_HERE.append(cls.__name__)


def raise_hooked() -> None:
    raise Hooked("hooked")


@pytest.mark.timeout(60)
def test_a_class_whose_subclassing_runs_code_arrives_as_a_plain_remote_error(
    client: scatter.Client,
) -> None:
    # Found in review: rebuilding the remote class as a subclass ran the class's own
    # __init_subclass__ (and would have run a metaclass, __new__, or property setters for
    # the attributes) in the caller: code the remote side chose to run.
    client.publish(raise_hooked)
    with pytest.raises(scatter.RemoteError) as caught:
        client.make_callable("raise_hooked")()
    assert not isinstance(caught.value, Hooked)
    assert caught.value.remote_type == f"{__name__}.Hooked"
    assert SUBCLASSED_HERE == []
