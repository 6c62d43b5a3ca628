"""Forgetting members for good (rule 10 of _node.py): when a forget is allowed, what it
releases and when, and how a forgotten member is kept out. The state machine that sweeps
it with partitions, losses and restarts is `Forgetting` in test_replication.py."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from cluster.sim import ClusterSimulation
from scatter import _wire
from scatter._config import NodeConfig
from scatter._core._membership import Alive, MemberInfo, Membership, MembershipConfig, State
from scatter._core._node import _rank
from scatter._core._registry import Change, ForgetOp, Registry, Snapshot, snapshot_decoder
from scatter._exceptions import ConfigError, ProtocolError
from tests.core.test_registry import record


def _publish(request_id: int, name: str, body: bytes) -> _wire.Publish:
    return _wire.Publish(request_id, name, body, b"", "(a: int) -> int", "sig", f"{name}:{body!r}")


def _sim(nodes: int = 3, **kwargs: Any) -> ClusterSimulation:
    kwargs.setdefault("history_grace", 5.0)
    return ClusterSimulation(nodes, seed=7, compact_after=1, **kwargs)


def _status(sim: ClusterSimulation, address: str) -> _wire.NodeStatus:
    reply = sim.request(address, _wire.Status(99))
    assert isinstance(reply, _wire.NodeStatus)
    return reply


def _forget(sim: ClusterSimulation, address: str, *nodes: str) -> object:
    return sim.request(address, _wire.Forget(7, list(nodes)))


def _cut_off(sim: ClusterSimulation, alone: str) -> None:
    sim.partition([a for a in sim.addresses if a != alone], [alone])


def test_only_a_dead_member_is_forgotten_and_only_by_a_live_majority() -> None:
    sim = _sim(4)
    a, b, c, d = sim.addresses
    sim.run_for(1.0)
    refusals = {
        ("n0",): "cannot forget itself",
        ("n9",): "no member n9",
        ("n3",): "not dead or gone",
    }
    for nodes, why in refusals.items():
        reply = _forget(sim, a, *nodes)
        assert isinstance(reply, _wire.Failure) and why in reply.message, reply
        assert reply.kind == "invalid"
    sim.partition([a, b], [c], [d])
    sim.run_for(20.0)  # c and d dead to a and b
    reply = _forget(sim, a, "n2")
    assert isinstance(reply, _wire.Failure) and "n3 is not alive here" in reply.message
    reply = _forget(sim, a, "n2", "n3")  # both dead: but a and b are no majority of 4
    assert isinstance(reply, _wire.Failure) and "strict majority" in reply.message
    sim.partition([a, b, c], [d])
    sim.run_for(10.0)
    assert isinstance(_forget(sim, a, "n3"), _wire.Done)
    sim.run_for(1.0)
    reply = _forget(sim, b, "n3")  # heard of it by now
    assert isinstance(reply, _wire.Failure) and "already forgotten: n3" in reply.message


def test_what_is_kept_for_a_member_goes_only_once_its_forget_is_folded() -> None:
    sim = _sim()
    a, b, c = sim.addresses
    sim.run_for(1.0)
    _cut_off(sim, c)
    sim.request(a, _publish(1, "add", b"v1"))
    sim.run_for(20.0)  # c dead past the grace: a and b fold without it, and keep for it
    assert _status(sim, a).unconfirmed_changes == 1
    assert isinstance(_forget(sim, a, "n2"), _wire.Done)
    sim.run_for(5.0)
    for address in (a, b):
        status = _status(sim, address)
        assert status.forgotten == ["n2"], address
        assert status.unconfirmed_changes == 0, address
        assert "n2" in sim.cores[address].registry.snapshot.forgotten
        assert c not in [m["address"] for m in status.members]
    # Back as it was: refused, and told so; nothing it sends gets in.
    sim.heal()
    sim.request(c, _publish(2, "stray", b"v1"))
    sim.run_for(10.0)
    for address in (a, b):
        assert "stray" not in sim.cores[address].registry.names()
        assert c not in [m["address"] for m in _status(sim, address).members]
    assert sim.cores[c]._forgotten_by in ("n0", "n1")


def test_a_forget_applied_but_not_folded_releases_nothing() -> None:
    reg = Registry("w1")
    change = reg.publish([record("add")], now=1.0)
    assert change is not None
    forget = reg.forget(["gone"], now=2.0)
    members: dict[str, Any] = {"gone": None, "other": reg.clock}
    # Folding only the publish: the forget is not in the snapshot, so "gone" still counts.
    only_first = reg.prepare_compaction(change.clock, members=members)
    assert only_first is not None and [c.change_id for c in only_first.unconfirmed] == ["w1:1"]
    assert only_first.forgotten == ()
    both = reg.prepare_compaction(forget.clock, members=members)
    assert both is not None and both.unconfirmed == () and both.forgotten == ("gone",)
    # The forgotten set survives the store and a restart from the snapshot.
    again = snapshot_decoder.decode(msgspec.msgpack.encode(both))
    assert Registry.from_snapshot("w2", again).forgotten == frozenset({"gone"})
    with pytest.raises(ConfigError, match="not forgotten already"):
        reg.prepare_forget(["gone"], now=3.0)


def test_a_forget_travels_alone_and_names_each_member_once() -> None:
    reg = Registry("w1")
    forget = reg.prepare_forget(["b", "a"], now=0.0)
    assert forget.ops == (ForgetOp(members=("a", "b")),)
    bad = [
        msgspec.structs.replace(forget, ops=(ForgetOp(members=("a", "a")),)),
        msgspec.structs.replace(forget, ops=(ForgetOp(members=("",)),)),
        msgspec.structs.replace(forget, ops=(*forget.ops, *forget.ops)),
    ]
    for change in bad:
        with pytest.raises(ProtocolError):
            Registry("w2").apply(change)
    decoded = msgspec.msgpack.decode(msgspec.msgpack.encode(forget), type=Change)
    assert decoded == forget


def test_a_snapshot_that_folded_more_forgets_outranks_one_that_ends_later() -> None:
    late = Snapshot(last=(9, "z", "z:9"), changes=9)
    forgetful = Snapshot(last=(2, "a", "a:2"), changes=2, forgotten=("gone",))
    assert _rank(forgetful) > _rank(late)


def test_the_membership_ignores_news_of_a_forgotten_member() -> None:
    me = Membership("n0", "tcp://a:1", MembershipConfig.local(), seed=1)
    me.remember([MemberInfo(node="n1", address="tcp://b:1", incarnation=1, state=State.DEAD, since=0.0)], 0.0)
    me.forget(["n1"])
    assert "n1" not in me.known()
    me.receive("tcp://c:1", [Alive("n1", "tcp://b:1", 99)], 1.0)
    me.remember([MemberInfo(node="n1", address="tcp://b:1", incarnation=1, state=State.ALIVE, since=0.0)], 1.0)
    assert "n1" not in me.known()


def test_forget_after_is_at_least_the_grace() -> None:
    with pytest.raises(ConfigError, match="at least history_grace"):
        NodeConfig(history_grace=10.0, forget_after=5.0)
    assert NodeConfig().forget_after == 2 * NodeConfig().history_grace
