"""The node core alone: requests in, effects out; no sockets, no disk, no clock."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings, strategies as st

from cluster import fuzz_corpus
from cluster.fuzz_corpus import facts
from scatter import _wire
from scatter._config import NodeConfig
from scatter._core._node import (
    BumpGeneration,
    Log,
    NodeCore,
    PersistChanges,
    PersistViews,
    Send,
    StartWorker,
    Stop,
)
from scatter._core._registry import FunctionView, resolve_view
from scatter._exceptions import FunctionNotFound

PEER = b"client-1"


class Disk(fuzz_corpus.Disk):
    """The fuzz corpus's in-memory store (what a driver persists), answering with the
    decoded replies; ``fail``: the change writes fail."""

    def run(  # type: ignore[override]
        self, core: NodeCore, effects: list[Any], *, fail: bool = False
    ) -> list[Any]:
        self.fail_persist = fail
        try:
            sent = super().run(core, effects)
        finally:
            self.fail_persist = False
        return [_wire.control_reply_decoder.decode(payload) for payload in sent]


def publish(name: str, body: bytes = b"v1", *, request_id: int = 1, code: str = "") -> bytes:
    return _wire.encoder.encode(
        _wire.Publish(
            id=request_id,
            name=name,
            body=body,
            signature=b"",
            signature_text="(a: int) -> int",
            signature_id="sig",
            content_id=code or f"code-{name}-{body.decode()}",
        )
    )


def request(message: Any) -> bytes:
    return _wire.encoder.encode(message)


def receive(
    core: NodeCore, payload: bytes, peer: bytes = PEER, *, role: str = "deploy"
) -> list[Any]:
    return core.receive(peer, payload, role=role, now=1.0, wall=1000.0, readings=dict)


def test_a_publish_is_persisted_then_applied_then_answered() -> None:
    disk = Disk()
    core = disk.core()
    effects = receive(core, publish("add"))
    assert [type(e) for e in effects] == [PersistChanges]  # nothing answered, nothing applied
    assert core.registry.statistics().changes == 0
    (write,) = effects
    after_changes = core.changes_persisted(write.ticket)
    assert [type(e) for e in after_changes] == [PersistViews]
    assert set(after_changes[0].views) == {"add"}
    done = core.views_persisted(after_changes[0].ticket)
    assert [type(e) for e in done] == [BumpGeneration, Send]
    reply = _wire.control_reply_decoder.decode(done[1].payload)
    assert isinstance(reply, _wire.Published) and reply.version == 1
    assert reply.content_id == next(iter(write.bodies))  # the node's id, not the client's


def test_a_change_that_cannot_be_stored_is_never_applied_and_its_id_is_not_burnt() -> None:
    disk = Disk()
    core = disk.core()
    (failure,) = [r for r in disk.run(core, receive(core, publish("add")), fail=True)]
    assert isinstance(failure, _wire.Failure) and failure.kind == "internal"
    assert (
        "could not store the change" in failure.message and "nothing was changed" in failure.message
    )
    assert core.registry.statistics().changes == 0
    (not_found,) = disk.run(core, receive(core, request(_wire.Describe(2, "add"))))
    assert isinstance(not_found, _wire.Failure) and not_found.kind == "not_found"
    (published,) = disk.run(core, receive(core, publish("add")))
    assert published.version == 1
    assert list(disk.changes) == ["n1.1.aaaaaa:1"]


def test_views_that_cannot_be_stored_stop_the_node() -> None:
    core = Disk().core()
    (write,) = receive(core, publish("add"))
    (views,) = core.changes_persisted(write.ticket)
    effects = core.persist_failed(views.ticket, "OSError: disk full")
    assert any(isinstance(e, Stop) and e.failed for e in effects)


def test_requests_wait_while_the_views_of_a_change_are_written() -> None:
    disk = Disk()
    core = disk.core()
    (write,) = receive(core, publish("add"))
    (views,) = core.changes_persisted(write.ticket)
    # Applied in memory, not yet visible to workers: a describe must not see it yet...
    assert receive(core, request(_wire.Describe(7, "add")), peer=b"other", role="call") == []
    effects = core.views_persisted(views.ticket)
    replies = [
        (e.peer, _wire.control_reply_decoder.decode(e.payload))
        for e in effects
        if isinstance(e, Send)
    ]
    # ...and is answered right after the publisher, with the new version.
    assert [peer for peer, _ in replies] == [PEER, b"other"]
    assert isinstance(replies[1][1], _wire.Description) and replies[1][1].version == 1


def test_one_local_change_at_a_time() -> None:
    disk = Disk()
    core = disk.core()
    (first,) = receive(core, publish("add", request_id=1))
    assert receive(core, publish("mul", request_id=2)) == []  # waits for the first
    replies = disk.run(core, [first])
    assert [r.id for r in replies] == [1, 2]
    assert sorted(disk.changes) == ["n1.1.aaaaaa:1", "n1.1.aaaaaa:2"]


def test_the_node_computes_content_ids_and_a_claimed_one_cannot_hijack_a_body() -> None:
    disk = Disk()
    core = disk.core()
    (first,) = disk.run(core, receive(core, publish("add", b"honest", code="X")))
    # Another publisher claims the same code id for another body: at worst a no-op.
    (second,) = disk.run(core, receive(core, publish("add", b"evil", code="X", request_id=2)))
    assert second.unchanged and second.content_id == first.content_id
    assert disk.bodies == {first.content_id: b"honest"}
    # The same body under another code id is a new version with the SAME content id.
    (third,) = disk.run(core, receive(core, publish("add", b"honest", code="Y", request_id=3)))
    assert third.version == 2 and third.content_id == first.content_id


def test_bodies_are_stored_once_and_deleted_when_no_live_version_uses_them() -> None:
    disk = Disk()
    core = disk.core()
    disk.run(core, receive(core, publish("add", b"shared", code="a")))
    disk.run(core, receive(core, publish("sum", b"shared", code="s")))
    assert len(disk.bodies) == 1
    disk.run(core, receive(core, request(_wire.Vaporize(3, "add"))))
    assert len(disk.bodies) == 1  # still used by sum
    disk.run(core, receive(core, request(_wire.Vaporize(4, "sum"))))
    assert disk.bodies == {}


def test_a_change_writes_only_the_views_it_moved() -> None:
    disk = Disk()
    core = disk.core()
    members = [
        _wire.Publish(0, f"f{i}", b"b", b"", "()", "s", f"c{i}")
        for i in range(_wire.MAX_SET_MEMBERS)
    ]
    (published,) = disk.run(core, receive(core, request(_wire.PublishSet(1, "many", members))))
    assert isinstance(published, _wire.Published)
    (write,) = receive(core, publish("add", request_id=2))
    (views,) = core.changes_persisted(write.ticket)
    assert set(views.views) == {"add"}


def test_restart_then_vaporizing_a_set_leaves_no_member_callable() -> None:
    disk = Disk()
    core = disk.core()
    members = [
        _wire.Publish(0, name, b"b", b"", "()", "s", f"c-{name}") for name in ("charge", "refund")
    ]
    disk.run(core, receive(core, request(_wire.PublishSet(1, "billing", members))))
    restarted = disk.core(writer="n1.2.bbbbbb")
    disk.run(restarted, receive(restarted, request(_wire.Vaporize(2, "billing"))))
    for name in ("charge", "refund"):
        for version in (None, 1):
            try:
                resolve_view(name, disk.views.get(name), version)
            except FunctionNotFound as exc:
                assert "vaporized" in str(exc)
            else:
                raise AssertionError(f"{name} v{version} still resolves after vaporize")
    (listing,) = disk.run(restarted, receive(restarted, request(_wire.ListFunctions(3))))
    assert listing.rows == []


def test_start_reconciles_stale_views_and_drops_orphan_bodies() -> None:
    disk = Disk()
    core = disk.core()
    disk.run(core, receive(core, publish("add")))
    good = dict(disk.views)
    disk.views["ghost"] = disk.views["add"]  # a view no change explains
    disk.views["add"] = FunctionView(name="add", current=9, content_ids={9: "x"}, signature_ids={})
    disk.bodies["orphan"] = b"left by a crash"
    disk.core(writer="n1.2.bbbbbb")
    assert disk.views == good
    assert "orphan" not in disk.bodies


def test_describing_a_retired_member_by_pin_works() -> None:
    disk = Disk()
    core = disk.core()
    one = _wire.Publish(0, "charge", b"b", b"", "()", "s", "c1")
    two = _wire.Publish(0, "refund", b"b2", b"", "()", "s", "c2")
    disk.run(core, receive(core, request(_wire.PublishSet(1, "billing", [one, two]))))
    disk.run(core, receive(core, request(_wire.PublishSet(2, "billing", [two]))))
    (described,) = disk.run(core, receive(core, request(_wire.Describe(3, "charge", 1))))
    assert isinstance(described, _wire.Description)
    assert (described.version, described.current_version) == (1, 0)


def test_oversized_and_malformed_frames_get_protocol_failures() -> None:
    disk = Disk()
    core = disk.core()
    big = b"\x00" * (core.config.max_message_bytes + 1)
    (too_big,) = disk.run(core, receive(core, big))
    (junk,) = disk.run(core, receive(core, b"\xc1 not msgpack"))
    assert (too_big.kind, junk.kind) == ("protocol", "protocol")
    assert "limit" in too_big.message


def test_a_bug_answers_internal_and_logs_no_request_contents() -> None:
    core = Disk().core()

    def broken(request: Any) -> Any:
        raise RuntimeError(f"boom with {request.name}")

    core._handlers[_wire.ListVersions] = broken
    effects = receive(core, request(_wire.ListVersions(5, "secret-argument")))
    logs = [e.message for e in effects if isinstance(e, Log)]
    (send,) = [e for e in effects if isinstance(e, Send)]
    assert _wire.control_reply_decoder.decode(send.payload).kind == "internal"
    assert logs and all("secret-argument" not in line for line in logs)


def test_start_starts_the_pool() -> None:
    core = NodeCore(NodeConfig(min_workers=2), facts(), [], {}, [])
    assert [e for e in core.start(0.0) if isinstance(e, StartWorker)] == [
        StartWorker(0),
        StartWorker(1),
    ]


def test_a_closed_connections_leases_end_and_another_connections_stay() -> None:
    core = NodeCore(NodeConfig(min_workers=2, max_workers=4), facts(), [], {}, [])
    core.start(0.0)
    for slot in (0, 1):
        core.worker_started(slot, 100 + slot, (f"tcp://127.0.0.1:{slot}",), 0.0)
    for request_id, peer in enumerate((b"client-a", b"client-a", b"client-b"), start=1):
        receive(core, request(_wire.Lease(request_id)), peer)
    for slot in (2, 3):  # the starts the leases asked for
        core.worker_started(slot, 100 + slot, (f"tcp://127.0.0.1:{slot}",), 0.0)

    def leases() -> int:
        (status,) = [e for e in receive(core, request(_wire.Status(9))) if isinstance(e, Send)]
        return int(_wire.control_reply_decoder.decode(status.payload).leases)

    assert leases() == 3
    assert core.connection_closed(b"client-a") == []
    assert leases() == 1


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=256))
def test_no_frame_raises_out_of_the_core(payload: bytes) -> None:
    core = Disk().core()
    for effect in receive(core, payload):
        # A frame may well be a valid request: a Lease starts a worker, a Shutdown stops.
        assert isinstance(effect, Send | PersistChanges | Log | StartWorker | Stop)


def test_a_call_only_client_may_call_describe_and_list_but_change_nothing() -> None:
    disk = Disk()
    core = disk.core()
    disk.run(core, receive(core, publish("add")))
    for change in (
        publish("add", b"v2", request_id=2),
        request(_wire.Rollback(3, "add")),
        request(_wire.Vaporize(4, "add")),
        request(_wire.Shutdown(5)),
    ):
        (refused,) = disk.run(core, receive(core, change, role="call"))
        assert isinstance(refused, _wire.Failure) and refused.kind == "forbidden"
        assert "call-only secret" in refused.message
    (described,) = disk.run(core, receive(core, request(_wire.Describe(6, "add")), role="call"))
    assert isinstance(described, _wire.Description) and described.version == 1
    (listing,) = disk.run(core, receive(core, request(_wire.ListFunctions(7)), role="call"))
    assert [row["name"] for row in listing.rows] == ["add"]
    (hello,) = disk.run(core, receive(core, request(_wire.ListFunctions(8)), role=""))
    assert hello.kind == "forbidden"


def test_a_set_publish_stores_no_body_for_a_member_whose_code_is_unchanged() -> None:
    """Found by the fuzzer: a member republished with the same code id keeps its version,
    but the node stored the body it came with, which no version used (until a restart)."""
    disk = Disk()
    core = disk.core()
    member = _wire.Publish(0, "m1", b"body", b"", "()", "s", "code-m1")
    other = _wire.Publish(0, "m2", b"body2", b"", "()", "s", "code-m2")
    disk.run(core, receive(core, request(_wire.PublishSet(1, "kit", [member, other]))))
    # Same code id, another signature pickle: another content id, not a new version.
    again = _wire.Publish(0, "m1", b"body", b"other pickle", "()", "s", "code-m1")
    (published,) = disk.run(core, receive(core, request(_wire.PublishSet(2, "kit", [again]))))
    assert isinstance(published, _wire.Published) and not published.unchanged  # m2 left
    assert disk.bodies.keys() == core.registry.content_ids()


def test_a_read_waits_for_the_change_being_written_but_not_for_members_batches_behind_it() -> None:
    writer_disk = Disk()
    writer = writer_disk.core(writer="na.1.aaaaaa")
    batches = []
    for request_id, name in enumerate(("add", "mul", "sub"), 1):
        (published,) = writer_disk.run(
            writer, receive(writer, publish(name, request_id=request_id))
        )
        change = writer_disk.changes[f"na.1.aaaaaa:{request_id}"]
        content_id = published.content_id
        bodies = {content_id: writer_disk.bodies[content_id]}
        batches.append(_wire.encoder.encode(_wire.PeerChanges("na", "tcp://a:1", [change], bodies)))
    core = Disk().core()

    def from_peer(payload: bytes) -> list[Any]:
        return core.receive(b"", payload, role="peer", now=1.0, wall=1.0, readings=dict)

    (first,) = from_peer(batches[0])
    (views,) = [e for e in core.changes_persisted(first.ticket) if isinstance(e, PersistViews)]
    assert from_peer(batches[1]) == [] and from_peer(batches[2]) == []  # queued behind
    assert receive(core, request(_wire.ListFunctions(5)), role="call") == []  # views pending
    effects = core.views_persisted(views.ticket)
    replies = [
        _wire.control_reply_decoder.decode(e.payload) for e in effects if isinstance(e, Send)
    ]
    # Answered now, with the change whose views were being written, not after the others.
    (listing,) = replies
    assert listing.id == 5 and [row["name"] for row in listing.rows] == ["add"]
    assert [type(e) for e in effects if isinstance(e, PersistChanges)] == [PersistChanges]
