"""Bodies that did not fit the message that brought their versions: the node asks a
member for them (``PeerBodiesWanted``) until they come, and stores each checked.

A full state transfer of a large registry, or a push of many big versions, carries at
most ``max_push_bytes`` of bodies (one at least); before this, it carried all of them in
one frame, and a registry past 64 MiB or 4,096 bodies could never be transferred.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from cluster.fuzz_corpus import facts
from scatter import _wire
from scatter._config import NodeConfig
from scatter._core._membership import MemberInfo, State
from scatter._core._node import NodeCore, PersistChanges, PushBodies, SendPeer
from tests.core.test_node_core import Disk, publish, receive

A = "tcp://a:1"


def _core(node: str, address: str, disk: Disk) -> NodeCore:
    core = NodeCore(
        NodeConfig(),
        replace(facts(f"{node}.1.x"), node_id=node, address=address),
        disk.changes.values(),
        disk.views,
        disk.bodies,
    )
    disk.run(core, core.start(0.0))
    return core


def _from_peer(core: NodeCore, message: Any, now: float = 1.0) -> list[Any]:
    return core.receive(
        b"", _wire.encoder.encode(message), role="peer", now=now, wall=now, readings=dict
    )


def _published(disk: Disk, core: NodeCore, names: list[str]) -> tuple[list[Any], dict[str, bytes]]:
    for request_id, name in enumerate(names, 1):
        disk.run(
            core,
            receive(core, publish(name, body=f"body of {name}".encode(), request_id=request_id)),
        )
    return list(disk.changes.values()), dict(disk.bodies)


def _asked_for_bodies(effects: list[Any]) -> list[SendPeer]:
    return [
        e
        for e in effects
        if isinstance(e, SendPeer)
        and isinstance(_wire.control_request_decoder.decode(e.payload), _wire.PeerBodiesWanted)
    ]


def test_versions_that_came_without_their_bodies_are_asked_for_and_stored() -> None:
    a_disk, b_disk = Disk(), Disk()
    a = _core("na", A, a_disk)
    b = _core("nb", "tcp://b:1", b_disk)
    b.membership.remember(
        [MemberInfo(node="na", address=A, incarnation=1, state=State.ALIVE, since=0.0)], 0.0
    )
    changes, bodies = _published(a_disk, a, ["add", "mul", "sub"])
    first = next(iter(bodies))
    # A push that carried one body of three (the others did not fit).
    b_disk.run(b, _from_peer(b, _wire.PeerChanges("na", A, changes, {first: bodies[first]})))
    assert set(b.missing_bodies) == set(bodies) - {first}
    assert set(b_disk.bodies) == {first}
    # The next anti-entropy round asks a member for them.
    (asked,) = _asked_for_bodies(b.tick(b.config.anti_entropy_interval + 1.0, {}))
    request = _wire.control_request_decoder.decode(asked.payload)
    assert asked.address == A and set(request.content_ids) == set(bodies) - {first}
    # The member answers with the bodies its store holds: the driver reads them.
    (push,) = a.receive(b"", asked.payload, role="peer", now=2.0, wall=2.0, readings=dict)
    assert isinstance(push, PushBodies) and set(push.content_ids) == set(request.content_ids)
    # One comes with a body that is not its own (a bug, or a hostile member): refused.
    second, third = push.content_ids
    forged = {second: bodies[second], third: b"not the body of " + third.encode()}
    effects = _from_peer(b, _wire.PeerChanges("na", A, [], forged), now=2.0)
    assert any("does not match" in getattr(e, "message", "") for e in effects)
    (write,) = [e for e in effects if isinstance(e, PersistChanges)]
    assert set(write.bodies) == {second} and write.changes == ()
    b_disk.run(b, effects)
    assert set(b.missing_bodies) == {third}
    b_disk.run(b, _from_peer(b, _wire.PeerChanges("na", A, [], {third: bodies[third]}), now=3.0))
    assert not b.missing_bodies
    assert b_disk.bodies == bodies  # every live version's body, each checked
    assert not _asked_for_bodies(b.tick(10.0, {}))


def test_a_body_no_longer_missing_or_never_asked_for_is_not_stored() -> None:
    a_disk, b_disk = Disk(), Disk()
    a = _core("na", A, a_disk)
    b = _core("nb", "tcp://b:1", b_disk)
    changes, bodies = _published(a_disk, a, ["add"])
    (content_id,) = bodies
    b_disk.run(b, _from_peer(b, _wire.PeerChanges("na", A, changes, {})))
    assert set(b.missing_bodies) == {content_id}
    # Vaporized before its body came: nothing missing, and a late body is not stored.
    vaporize = _wire.encoder.encode(_wire.Vaporize(9, "add"))
    b_disk.run(b, receive(b, vaporize))
    assert not b.missing_bodies
    assert _from_peer(b, _wire.PeerChanges("na", A, [], bodies), now=2.0) == []
    assert content_id not in b_disk.bodies


def test_a_restart_asks_for_the_bodies_its_store_lacks() -> None:
    a_disk, b_disk = Disk(), Disk()
    a = _core("na", A, a_disk)
    b = _core("nb", "tcp://b:1", b_disk)
    changes, bodies = _published(a_disk, a, ["add", "mul"])
    b_disk.run(b, _from_peer(b, _wire.PeerChanges("na", A, changes, dict(bodies))))
    assert not b.missing_bodies
    lost = next(iter(bodies))
    del b_disk.bodies[lost]  # gone from the store (a crash between writes, a bad disk)
    again = _core("nb", "tcp://b:1", b_disk)
    assert set(again.missing_bodies) == {lost}
