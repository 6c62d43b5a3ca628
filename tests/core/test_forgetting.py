"""Forgetting members for good (rule 10 of _node.py): when a forget is allowed, what it
releases and when, and how a forgotten member is kept out. The state machine that sweeps
it with partitions, losses and restarts is `Forgetting` in test_replication.py."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from cluster.sim import ClusterSimulation
from scatter import _wire
from scatter._core._membership import Alive, MemberInfo, Membership, MembershipConfig, State
from scatter._core._node import LEAVE_GOODBYE_WAIT, ClosePeer, PersistChanges
from scatter._core._registry import Change, ForgetOp, Registry, snapshot_decoder
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


def test_only_a_dead_member_is_forgotten_and_only_while_the_others_are_alive() -> None:
    sim = _sim(4)
    a, b, c, d = sim.addresses
    sim.run_for(3.0)  # every member has sent its digest: all apply forgets
    refusals = {
        ("n0",): "cannot forget itself",
        ("n9",): "no member n9",
        ("n3",): "not dead or gone",
    }
    for nodes, why in refusals.items():
        reply = _forget(sim, a, *nodes)
        assert isinstance(reply, _wire.Failure) and why in reply.message, reply
        assert reply.kind == "invalid"
    sim.down |= {c, d}  # both crash
    sim.run_for(20.0)
    reply = _forget(sim, a, "n2")
    assert isinstance(reply, _wire.Failure) and "n3 is not alive here" in reply.message
    sim.cores[a]._forget_aware.discard("n1")  # as if b ran an older release
    reply = _forget(sim, a, "n2", "n3")
    assert isinstance(reply, _wire.Failure) and "n1 has not said" in reply.message
    sim.run_for(3.0)  # b's next digest says it does
    assert isinstance(_forget(sim, a, "n2", "n3"), _wire.Done)
    sim.run_for(1.0)
    reply = _forget(sim, b, "n3")  # heard of it by now
    assert isinstance(reply, _wire.Failure) and "already forgotten: n3" in reply.message


def test_what_is_kept_for_a_crashed_member_goes_once_it_is_forgotten() -> None:
    sim = _sim()
    a, b, c = sim.addresses
    sim.run_for(3.0)
    sim.down.add(c)  # crashed, its disk lost
    sim.request(a, _publish(1, "add", b"v1"))
    sim.run_for(20.0)  # dead past the grace: a and b fold without it, and keep for it
    assert _status(sim, a).unconfirmed_changes == 1
    assert isinstance(_forget(sim, a, "n2"), _wire.Done)
    sim.run_for(5.0)
    for address in (a, b):
        status = _status(sim, address)
        assert status.forgotten == ["n2"], address
        assert status.unconfirmed_changes == 0, address
        assert "n2" in sim.cores[address].registry.snapshot.forgotten
        assert c not in [m["address"] for m in status.members]
    # Back with its data after all (its operator was wrong): refused, and told so; it
    # refuses changes from then on.
    sim.down.discard(c)
    sim.heal()
    sim.run_for(10.0)
    reply = sim.request(c, _publish(2, "stray", b"v1"))
    assert isinstance(reply, _wire.Failure) and "forgot this node" in reply.message
    assert _status(sim, c).forgotten_by in ("n0", "n1")
    for address in (a, b):
        assert c not in [m["address"] for m in _status(sim, address).members]


def test_a_change_waiting_for_a_past_gone_with_a_forgotten_member_is_refused() -> None:
    """Found by the Forgetting state machine: n0 wrote twice alone, then a third time
    after the heal; only the third reached the others, and waited for the first two
    (held by n0 alone) forever once n0 was gone for good and forgotten."""
    sim = _sim(4)
    a, b, c, d = sim.addresses
    sim.run_for(3.0)
    sim.partition([a], [b, c, d])
    sim.request(a, _publish(1, "add", b"v1"))
    sim.request(a, _publish(2, "add", b"v2"))
    reply = sim.request(a, _wire.Rollback(3, "add"))
    assert isinstance(reply, _wire.Moved)
    change = sim.cores[a].registry.log()[-1]
    sim.down.add(a)  # a crashes for good; only its last change got out, alone:
    for address in (b, c, d):
        sim.cores[address].registry.apply(change)  # held: its past is not here
    assert sim.cores[b].registry.pending()
    sim.run_for(20.0)
    assert isinstance(_forget(sim, b, "n0"), _wire.Done)
    sim.run_for(10.0)
    for address in (b, c, d):
        assert not sim.cores[address].registry.pending(), address
    assert sim.converged({a})


def test_a_leaving_node_hands_its_changes_over_then_forgets_itself() -> None:
    sim = _sim()
    a, b, c = sim.addresses
    sim.run_for(3.0)
    sim.request(c, _publish(1, "mine", b"v1"))
    sim.submit(c, _wire.Leave(2))
    refused = sim.request(c, _publish(3, "late", b"v1"))  # while it leaves
    assert isinstance(refused, _wire.Failure) and "leaving" in refused.message
    sim.run_until(lambda: sim.answer(c, 2) is not None, limit=sim.now + 15.0)
    assert isinstance(sim.answer(c, 2), _wire.Done)
    sim.down.add(c)  # it stopped
    sim.run_for(10.0)
    for address in (a, b):
        registry = sim.cores[address].registry
        assert "mine" in registry.names()  # handed over
        assert registry.forgotten == frozenset({"n2"})
        assert c not in [m["address"] for m in _status(sim, address).members]
    sim.request(a, _publish(4, "after", b"v1"))
    sim.run_for(10.0)
    for address in (a, b):  # folded without it, and nothing kept for it
        status = _status(sim, address)
        assert status.unconfirmed_changes == 0 and status.compacted_changes > 0


def test_a_leave_nobody_can_take_fails_and_the_node_serves_on() -> None:
    sim = _sim()
    a, b, c = sim.addresses
    sim.run_for(3.0)
    sim.request(c, _publish(1, "mine", b"v1"))
    sim.partition([a, b], [c])  # c still thinks them alive: its digests go nowhere
    sim.submit(c, _wire.Leave(2))
    sim.run_until(lambda: sim.answer(c, 2) is not None, limit=sim.now + 30.0)
    failed = sim.answer(c, 2)
    assert isinstance(failed, _wire.Failure) and "did not leave" in failed.message
    assert isinstance(sim.request(c, _publish(3, "still", b"v1")), _wire.Published)
    lone = _sim(1)
    alone = lone.request(lone.addresses[0], _wire.Leave(1))
    assert isinstance(alone, _wire.Failure) and "no live member" in alone.message


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


def test_the_membership_ignores_news_of_a_forgotten_member() -> None:
    me = Membership("n0", "tcp://a:1", MembershipConfig.local(), seed=1)
    me.remember([MemberInfo(node="n1", address="tcp://b:1", incarnation=1, state=State.DEAD, since=0.0)], 0.0)
    me.forget(["n1"])
    assert "n1" not in me.known()
    me.receive("tcp://c:1", [Alive("n1", "tcp://b:1", 99)], 1.0)
    me.remember([MemberInfo(node="n1", address="tcp://b:1", incarnation=1, state=State.ALIVE, since=0.0)], 1.0)
    assert "n1" not in me.known()


def test_what_members_back_from_an_absence_confirm_is_let_go_of_at_the_next_round() -> None:
    """Found by the Forgetting state machine: a node that folded its own change alone (the
    others dead to it past the grace) kept it after they came back and had it, until its
    next compaction, because a member that had left (forgotten, its clock unknown)
    still counted as unknown."""
    sim = _sim(4)
    a, b, c, d = sim.addresses
    sim.run_for(3.0)
    sim.submit(b, _wire.Leave(1))
    sim.run_until(lambda: sim.answer(b, 1) is not None, limit=sim.now + 15.0)
    assert isinstance(sim.answer(b, 1), _wire.Done)
    sim.down.add(b)
    sim.run_for(5.0)
    sim.partition([a], [c, d])
    sim.run_for(15.0)  # c and d dead to a past the grace, and a to them
    sim.request(a, _publish(2, "alone", b"v1"))
    sim.run_for(3.0)
    assert _status(sim, a).unconfirmed_changes == 1  # folded without c and d: kept
    sim.cut = set()
    sim.run_for(15.0)  # no new change: only what c and d confirmed lets it go
    assert sim.converged({b})
    assert _status(sim, a).unconfirmed_changes == 0


class _BodiesStayBehind(ClusterSimulation):
    """What the last node sends carries no body (as when bodies do not fit a message),
    and the bodies asked of it are slow to come (never, here)."""

    def _send(self, source: str, target: str, payload: bytes) -> None:
        if source == self.addresses[-1]:
            message = _wire.control_request_decoder.decode(payload)
            if isinstance(message, _wire.PeerChanges):
                if not message.changes and message.snapshot is None:
                    return  # bodies asked for
                payload = _wire.encoder.encode(msgspec.structs.replace(message, bodies={}))
        super()._send(source, target, payload)


def test_a_leave_hands_over_the_bodies_too_or_does_not_happen() -> None:
    """Found in review: the handover looked at clocks only, and a member may hold a
    version whose body has not come yet; the leaving node took it with it."""
    sim = _BodiesStayBehind(3, seed=7, compact_after=1, history_grace=5.0)
    a, _b, c = sim.addresses
    sim.run_for(3.0)
    sim.request(c, _publish(1, "big", b"v1"))
    sim.submit(c, _wire.Leave(2))
    sim.run_until(lambda: sim.answer(c, 2) is not None, limit=sim.now + 15.0)
    failed = sim.answer(c, 2)
    assert isinstance(failed, _wire.Failure) and "did not leave" in failed.message
    assert _status(sim, a).missing_bodies == 1  # still to come: from c, which stays


def test_a_leave_says_goodbye_as_soon_as_a_member_holds_its_forget() -> None:
    sim = _sim()
    c = sim.addresses[2]
    sim.run_for(3.0)
    started = sim.now
    sim.submit(c, _wire.Leave(1))
    sim.run_until(lambda: sim.answer(c, 1) is not None, limit=sim.now + 15.0)
    assert isinstance(sim.answer(c, 1), _wire.Done)
    assert sim.now - started < LEAVE_GOODBYE_WAIT  # told by a member that applied it


def test_a_notice_for_a_former_node_at_this_address_is_ignored() -> None:
    sim = _sim()
    a, b, _c = sim.addresses
    sim.run_for(1.0)
    notice = _wire.PeerForgotten("n1", b, "some-former-node")
    sim.cores[a].receive(
        b"", _wire.encoder.encode(notice), role="peer", now=sim.now, wall=sim.now, readings=dict
    )
    assert _status(sim, a).forgotten_by == ""
    assert isinstance(sim.request(a, _publish(1, "add", b"v1")), _wire.Published)


def test_a_node_started_afresh_forgets_its_former_id_once_it_has_caught_up() -> None:
    """Its own forget may never have left it (a crash between storing it and pushing
    it): the new node of the same directory makes it, since the old one cannot act."""
    sim = _sim()
    _a, _b, c = sim.addresses
    sim.cores[c]._former = frozenset({"n7"})  # as the driver passes NodeIdentity.former
    sim.run_for(10.0)
    for address in sim.addresses:
        assert sim.cores[address].registry.forgotten == frozenset({"n7"}), address


def test_the_connection_to_a_forgotten_member_is_closed() -> None:
    sim = _sim()
    a, _b, c = sim.addresses
    sim.run_for(3.0)
    sim.down.add(c)
    sim.run_for(10.0)
    core = sim.cores[a]
    effects = core.receive(
        b"client",
        _wire.encoder.encode(_wire.Forget(1, ["n2"])),
        role="deploy",
        now=sim.now,
        wall=sim.now,
        readings=dict,
    )
    persist = next(e for e in effects if isinstance(e, PersistChanges))
    after = core.changes_persisted(persist.ticket)
    assert ClosePeer(c) in after
