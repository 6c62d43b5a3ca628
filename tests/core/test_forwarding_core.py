"""Run here, or forward, in the pure cores: what a node cannot load, and why nobody can."""

from __future__ import annotations

import msgspec

from scatter import _wire
from scatter._core._forwarding import CannotLoad, nobody_can_run, python_problem
from scatter._core._node import RelayCall, Send
from scatter._core._pool import StartWorker
from tests.core.test_node_core import PEER, Disk, receive, request


def test_a_body_loads_only_on_its_own_python_major_minor() -> None:
    assert python_problem("3.11.2", "3.11.7") == ""
    assert python_problem("3.12.1", "3.11.7") == "Python 3.12 body on Python 3.11"
    assert python_problem("", "3.11.7") == ""  # an older publisher said nothing


def test_the_error_for_a_call_nobody_can_run_groups_members_by_reason() -> None:
    message = nobody_can_run(
        "add v3",
        {"b": "missing module `x`", "a": "missing module `x`", "c": "Python 3.12 body on Python 3.11"},
    )
    assert message == (
        "add v3 cannot run on any member: missing module `x` on nodes a, b; "
        "Python 3.12 body on Python 3.11 on node c"
    )


def test_the_cannot_load_table_is_bounded_and_says_the_latest_first() -> None:
    table = CannotLoad(limit=3)
    for n in range(5):
        assert table.learn(f"cid{n}", "missing module `x`")
    assert not table.learn("cid4", "missing module `x`")  # no news
    assert list(table.mine) == ["cid2", "cid3", "cid4"]
    assert list(table.recent(2)) == ["cid4", "cid3"]
    table.heard("b", {"cid9": "why"})
    assert table.reason("b", "cid9") == "why" and table.reason("c", "cid9") == ""


def _publish_from(python: str) -> bytes:
    return request(
        _wire.Publish(
            id=1,
            name="add",
            body=b"v1",
            signature=b"",
            signature_text="(a: int) -> int",
            signature_id="sig",
            content_id="code-add",
            python=python,
        )
    )


def test_a_route_to_a_body_of_another_python_fails_with_the_reason_when_alone() -> None:
    disk = Disk()
    core = disk.core()
    disk.run(core, core.start(0.0))
    disk.run(core, receive(core, _publish_from("3.0.1")))
    replies = disk.run(core, receive(core, request(_wire.Lease(7, name="add"))))
    assert [type(r) for r in replies] == [_wire.Failure]
    assert replies[0].kind == "load"
    assert "Python 3.0 body on Python" in replies[0].message
    assert core.facts.node_id in replies[0].message
    assert core.cannot_load.mine  # learned, and told to peers with the next digest


def test_a_route_to_a_body_this_node_runs_leases_its_own_worker() -> None:
    disk = Disk()
    core = disk.core()
    disk.run(core, core.start(0.0))
    disk.run(core, receive(core, _publish_from("")))
    effects = receive(core, request(_wire.Lease(7, name="add")))
    assert not any(isinstance(e, _wire.Failure) for e in disk.run(core, effects))


def _relay(core_node: str, call_id: int = 5, caller: bytes = b"12345678") -> bytes:
    call = _wire.Call(call_id, "add", 0, 1, "", 2.0, msgspec.Raw(b"\x81\xa1a\x01"), caller, 0.0)
    frame = _wire.encoder.encode(call)
    return request(_wire.Relay(9, core_node, "add", 0, "", frame, 2.0))


def test_a_relayed_call_leases_a_worker_and_goes_to_it_as_the_client_encoded_it() -> None:
    disk = Disk()
    core = disk.core()
    disk.run(core, core.start(0.0))
    disk.run(core, receive(core, _publish_from("")))
    relay = _wire.control_request_decoder.decode(_relay(core.facts.node_id))
    effects = receive(core, request(relay))
    starts = [e for e in effects if isinstance(e, StartWorker)]
    if starts:  # no idle worker yet: the lease waits for one to start
        effects = core.worker_started(starts[0].slot, 4242, ("tcp://127.0.0.1:5555", "ipc:///w"), 2.0)
    (call,) = [e for e in effects if isinstance(e, RelayCall)]
    assert call.call == relay.call  # the frame, unchanged
    assert (call.peer, call.request_id, call.call_id) == (PEER, 9, 5)
    assert call.endpoint.startswith("tcp://") and call.own  # TCP: the client's role holds


def test_a_call_id_relayed_before_is_refused_and_never_leased_again() -> None:
    disk = Disk()
    core = disk.core()
    disk.run(core, core.start(0.0))
    disk.run(core, receive(core, _publish_from("")))
    receive(core, _relay(core.facts.node_id))
    again = disk.run(core, receive(core, _relay(core.facts.node_id)))
    assert [type(r) for r in again] == [_wire.Relayed]
    refused = _wire.worker_reply_decoder.decode(again[0].reply)
    assert isinstance(refused, _wire.Failure) and refused.kind == "duplicate" and refused.id == 5
    # Another caller's call 5 is another call.
    other = receive(core, _relay(core.facts.node_id, caller=b"87654321"))
    assert not any(isinstance(e, Send) and b"duplicate" in e.payload for e in other)


def test_a_relay_to_a_member_this_node_does_not_know_alive_did_not_run() -> None:
    disk = Disk()
    core = disk.core()
    disk.run(core, core.start(0.0))
    disk.run(core, receive(core, _publish_from("")))
    replies = disk.run(core, receive(core, _relay("nobody-knows")))
    assert [type(r) for r in replies] == [_wire.Failure]
    assert replies[0].id == 9 and "did not run" in replies[0].message


class _LeaseBeforeTheClock(msgspec.Struct, array_like=True, tag=17, frozen=True):
    """``Lease`` as a peer of protocol 5 before ``Lease.clock`` declares it."""

    id: int
    name: str = ""
    version: int = 0
    content_id: str = ""
    avoid: list[str] = []


def test_a_route_lease_with_a_clock_still_decodes_on_an_older_peer_and_back() -> None:
    from scatter._core._vclock import VectorClock

    clock = VectorClock({"na.1.x": 2})
    new = _wire.encoder.encode(_wire.Lease(7, "add", 0, "cid", ["na"], clock))
    old = msgspec.msgpack.decode(new, type=_LeaseBeforeTheClock)  # the trailing field skipped
    assert (old.id, old.name, old.content_id, old.avoid) == (7, "add", "cid", ["na"])
    again = _wire.control_request_decoder.decode(_wire.encoder.encode(old))
    assert isinstance(again, _wire.Lease) and again.clock is None  # as before
    assert _wire.control_request_decoder.decode(new) == _wire.Lease(7, "add", 0, "cid", ["na"], clock)
