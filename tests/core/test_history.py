"""Bounded history in the registry: a snapshot of a prefix of the order, then the rest.

The snapshot must answer every lookup exactly as replaying the full log does (version
numbers, current pointers, sets, high-water marks), whatever prefix was folded, and a
registry restarted from (snapshot, remaining changes) must be the same registry.
"""

from __future__ import annotations

import random
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from scatter._config import NodeConfig
from scatter._core._node import NodeCore, PersistChanges, PushChanges
from scatter._core._registry import (
    Registry,
    Snapshot,
    order_key,
    snapshot_decoder,
)
from scatter._core._vclock import VectorClock
from scatter._exceptions import FunctionNotFound

from .test_registry import MODES, Simulation, lookups, moves, record


def state(reg: Registry, names: list[str]) -> object:
    """Every answer a lookup gives, and the counts that do not depend on compaction."""
    statistics = msgspec.structs.replace(
        reg.statistics(), rebuilds=0, changes=0, compacted=0, void=0
    )
    return (
        reg.functions(),
        lookups(reg, names),
        reg.clock,
        statistics,
        sorted(reg.names()),
        reg.content_ids(),
        reg.replica_hash(),
    )


def _encoded_round_trip(snapshot: Snapshot) -> Snapshot:
    return snapshot_decoder.decode(msgspec.msgpack.encode(snapshot))


@pytest.mark.parametrize("mode", list(MODES))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    plan=st.lists(moves, min_size=5, max_size=40),
    cut=st.integers(0, 60),
    rnd=st.randoms(use_true_random=False),
)
def test_a_snapshot_of_any_prefix_then_the_rest_is_the_full_replay(
    mode: str, plan: list[tuple[Any, ...]], cut: int, rnd: random.Random
) -> None:
    sim = Simulation(mode)
    for move in plan:
        sim.run(move)
    changes = sim.converge(rnd)
    first = next(iter(sim.nodes.values()))
    expected = state(first, sim.names)
    ordered = sorted(changes, key=order_key)
    if not ordered:
        return
    # Fold the prefix up to a causally closed point: the clock of one change.
    stable = ordered[cut % len(ordered)].clock
    folded = first.compact(stable)
    assert folded == first.statistics().compacted
    assert folded + len(first.log()) == len(ordered)
    assert state(first, sim.names) == expected
    # Restart from what a node persists: the snapshot (through msgpack) and the rest.
    rest = first.log()
    rnd.shuffle(rest)
    restarted = Registry.from_snapshot("fresh", _encoded_round_trip(first.snapshot), rest)
    assert state(restarted, sim.names) == expected
    # Changes it holds already, compacted or not, change nothing.
    assert restarted.apply_many(changes) == set()
    assert state(restarted, sim.names) == expected
    # Compacting again (further) still changes nothing; so does compacting everything.
    restarted.compact(restarted.clock)
    assert restarted.log() == []
    assert state(restarted, sim.names) == expected


@pytest.mark.parametrize("mode", list(MODES))
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    before=st.lists(moves, min_size=5, max_size=25),
    after=st.lists(moves, min_size=1, max_size=25),
    rnd=st.randoms(use_true_random=False),
)
def test_compacting_what_everyone_holds_mid_history_changes_no_outcome(
    mode: str, before: list[tuple[Any, ...]], after: list[tuple[Any, ...]], rnd: random.Random
) -> None:
    """Each replica folds what every replica has seen (the pointwise minimum of the
    clocks) once it holds what any holds; then history goes on, out of order."""
    sim = Simulation(mode)
    for move in before:
        sim.run(move)
    plain = _Uncompacted(mode)  # the same history, never compacted
    for move in before:
        plain.run(move)
    every = {
        c.change_id: c for reg in sim.nodes.values() for c in reg.changes_since(VectorClock())
    }
    for reg in sim.nodes.values():
        reg.apply_many(every.values())
    stable = VectorClock()
    for i, reg in enumerate(sim.nodes.values()):
        stable = reg.clock if i == 0 else _minimum(stable, reg.clock)
    for reg in sim.nodes.values():
        reg.compact(stable)
    plain.hidden = stable  # its deliveries pick among the same changes
    for reg in plain.nodes.values():
        reg.apply_many(every.values())
    for move in after:
        sim.run(move)
        plain.run(move)
    seed = rnd.randrange(2**32)
    sim.converge(random.Random(seed))
    plain.converge(random.Random(seed))
    expected = state(next(iter(plain.nodes.values())), plain.names)
    for reg in sim.nodes.values():
        assert state(reg, sim.names) == expected
        assert reg.statistics().void == 0


class _Uncompacted(Simulation):
    hidden = VectorClock()

    def deliver(self, source: str, target: str, picks: list[int], batch: bool) -> None:
        held = [
            c
            for c in self.nodes[source].changes_since(VectorClock())
            if not self.hidden.dominates(c.clock)
        ]
        if source == target or not held:
            return
        chosen = {c.change_id: c for c in (held[i % len(held)] for i in picks)}
        self.apply(self.nodes[target], list(chosen.values()), batch=batch)


def _minimum(a: VectorClock, b: VectorClock) -> VectorClock:
    return VectorClock({w: min(n, b.get(w)) for w, n in a.entries.items() if b.get(w)})


def test_a_change_concurrent_with_the_snapshot_and_sorting_before_its_end_is_void() -> None:
    a = Registry("a")
    for body in ("v1", "v2", "v3"):
        a.publish([record("f", body)], now=1.0)
    away = Registry("0away")  # sorts first among equal totals
    late = away.publish([record("g")], now=1.0)
    assert late is not None and order_key(late) < order_key(a.log()[-1])
    a.compact(a.clock)
    assert a.apply(late) == set()
    assert not a.has_change(late.change_id)
    assert a.statistics().void == 1
    assert a.holds_void(away.clock)
    assert not a.holds_void(VectorClock())
    with pytest.raises(FunctionNotFound):
        a.resolve("g")
    assert not a.can_serve(away.clock)
    assert a.can_serve(a.clock)


def test_an_old_replica_without_a_snapshot_loads_as_before() -> None:
    a = Registry("a")
    changes = [a.publish([record("f", body)], now=1.0) for body in ("v1", "v2")]
    old = Registry.from_snapshot("b", Snapshot(), [c for c in changes if c is not None])
    assert old.current_version("f") == 2 and old.statistics().compacted == 0


def test_a_registry_restarted_with_what_it_refused_as_void_keeps_refusing_it() -> None:
    a = Registry("a")
    for body in ("v1", "v2", "v3"):
        a.publish([record("f", body)], now=1.0)
    a.compact(a.clock)
    away = Registry("0away")  # sorts first among equal totals
    made = [away.publish([record("g", f"v{i}")], now=1.0) for i in range(1, 5)]
    assert made[0] is not None and made[3] is not None
    assert order_key(made[3]) > a.snapshot.last  # counts made[0]: void only through it
    a.apply(made[0])
    assert a.void == {"0away": 1}
    again = Registry.from_snapshot("a", a.snapshot, a.log(), void=a.void)
    assert again.holds_void(away.clock)
    assert again.apply(made[3]) == set() and not again.has_change(made[3].change_id)
    assert again.statistics().pending == 0
    # Without the record, the later change waits forever for a past that never comes.
    forgetful = Registry.from_snapshot("a", a.snapshot, a.log())
    forgetful.apply(made[3])
    assert forgetful.statistics().pending == 1


def _tied_snapshots() -> tuple[Snapshot, Snapshot]:
    """Two snapshots folded apart under one same last change: side one folded its
    concurrent change p, side two its concurrent q, both sorting before the change L
    both hold (equal totals: the origin decides, and "z" sorts last)."""
    m = Registry("m")
    c0 = m.publish([record("f")], now=1.0)
    made = []
    for origin, name in (("a", "p"), ("b", "q"), ("z", "l")):
        writer = Registry.from_changes(origin, [c0])
        made.append(writer.publish([record(name)], now=1.0))
    p, q, last = made
    sides = []
    for own in (p, q):
        side = Registry.from_changes("x", [c0, own, last])
        side.compact(side.clock)
        sides.append(side.snapshot)
    one, two = sides
    assert one.last == two.last == order_key(last) and one.changes == two.changes
    assert one.clock != two.clock
    return one, two


def test_of_two_snapshots_folded_apart_under_one_last_change_exactly_one_is_adopted() -> None:
    """Found by the AwayPastTheGrace state machine in the full suite (its histories
    there differ from a run of the file alone): both sides of a partition past the grace
    folded a concurrent change of their own before the same last change, so the two
    snapshots ranked equal and neither side adopted the other's: they sent each other a
    full state transfer at every digest, and the replicas never converged."""
    from cluster.fuzz_corpus import facts

    one, two = _tied_snapshots()
    cores = [
        NodeCore(NodeConfig(), facts(f"n1.{i}.aaaaaa"), [], {}, {}, snapshot=snapshot)
        for i, snapshot in enumerate((one, two), start=1)
    ]
    adopted = []
    for core, theirs in zip(cores, (two, one), strict=True):
        transfer = _wire.PeerChanges("n9", "tcp://127.0.0.1:9", [], {}, theirs)
        effects = core.receive(
            b"", _wire.encoder.encode(transfer), role="peer", now=1.0, wall=1.0, readings=dict
        )
        writes = [e for e in effects if isinstance(e, PersistChanges)]
        adopted.append(any(w.replace for w in writes))
    assert adopted.count(True) == 1, adopted


def test_a_full_state_transfer_not_taken_is_sent_again_only_after_a_back_off() -> None:
    """A peer below our snapshot that does not take our transfer (its own snapshot
    outranks ours, or the transfer was lost) reports the same clock digest after
    digest: it got the whole replica again at every one of them."""
    from cluster.fuzz_corpus import facts

    one, two = _tied_snapshots()
    config = NodeConfig()
    core = NodeCore(config, facts(), [], {}, {}, snapshot=one)

    def transfers(clock: VectorClock, now: float) -> int:
        digest = _wire.PeerDigest("n9", "tcp://127.0.0.1:9", clock, False)
        effects = core.receive(
            b"", _wire.encoder.encode(digest), role="peer", now=now, wall=now, readings=dict
        )
        return sum(1 for e in effects if isinstance(e, PushChanges) and e.snapshot is not None)

    interval = config.anti_entropy_interval
    sent = [transfers(two.clock, i * interval / 2) for i in range(400)]  # 200 intervals
    assert sent[0] == 1  # the first digest below our snapshot gets it at once
    # then after 1, 2, 4, ... intervals, at most TRANSFER_BACKOFF_INTERVALS apart
    assert sum(sent) <= 12, sum(sent)
    assert all(sum(sent[i : i + 2 * 32 + 1]) >= 1 for i in range(0, 400 - 65, 16))
    # A peer whose clock moved (it wrote, or took something) gets one at once.
    moved = two.clock.merge(VectorClock({"q9": 1}))
    assert transfers(moved, 400 * interval / 2) == 1
    # One that caught up needs none; below our snapshot again later: at once.
    assert transfers(one.clock, 401 * interval / 2) == 0
    assert transfers(moved, 402 * interval / 2) == 1


# -- in the node core, on the simulator (rule 9 of _node.py) --------------------------

from cluster.sim import ClusterSimulation  # noqa: E402
from scatter import _wire  # noqa: E402


def _publish(request_id: int, name: str, body: bytes) -> _wire.Publish:
    return _wire.Publish(request_id, name, body, b"", "(a: int) -> int", "sig", f"{name}:{body!r}")


def _sim(**kwargs: Any) -> ClusterSimulation:
    kwargs.setdefault("history_grace", 30.0)
    return ClusterSimulation(3, seed=7, compact_after=1, **kwargs)


def _status(sim: ClusterSimulation, address: str) -> _wire.NodeStatus:
    reply = sim.request(address, _wire.Status(99))
    assert isinstance(reply, _wire.NodeStatus)
    return reply


def test_nodes_compact_what_every_member_has_seen_and_restart_from_the_snapshot() -> None:
    sim = _sim()
    a, b, c = sim.addresses
    for i, body in enumerate((b"v1", b"v2", b"v3")):
        sim.request(a, _publish(i + 1, "add", body))
    sim.run_for(0.5)
    assert isinstance(sim.request(b, _wire.Vaporize(10, "add")), _wire.Moved)
    sim.request(c, _publish(11, "mul", b"v1"))
    sim.run_for(5.0)
    assert sim.converged()
    for address in sim.addresses:
        status = _status(sim, address)
        assert status.compacted_changes == 5, address
        assert status.changes == 0 and status.stable_changes == 0
        assert not sim.disks[address].changes  # folded away on disk too
        assert sim.disks[address].snapshot.clock == sim.cores[address].registry.clock
    before = sim.replicas()[a]
    sim.restart(a)
    assert sim.replicas()[a] == before
    reply = sim.request(a, _wire.Describe(12, "add"))
    assert isinstance(reply, _wire.Failure) and "vaporized" in reply.message
    # numbering continues after the high-water mark the snapshot kept
    published = sim.request(a, _publish(13, "add", b"v4"))
    assert isinstance(published, _wire.Published) and published.version == 4


def test_a_member_that_stopped_answering_holds_compaction_back_until_the_grace_ends() -> None:
    sim = _sim()
    a, b, c = sim.addresses
    sim.down.add(c)  # stopped: never digests again
    sim.request(a, _publish(1, "add", b"v1"))
    sim.run_for(10.0)  # declared dead, but well within the grace
    assert _status(sim, a).compacted_changes == 0
    sim.run_for(40.0)
    assert _status(sim, a).compacted_changes == 1
    assert _status(sim, b).compacted_changes == 1
    # Folded without c: kept for it, should a transfer ever replace this snapshot.
    assert _status(sim, a).unconfirmed_changes == 1


def test_a_node_back_after_the_grace_takes_a_state_transfer_and_keeps_its_changes() -> None:
    sim = _sim()
    a, b, c = sim.addresses
    sim.request(a, _publish(1, "add", b"v1"))
    sim.request(a, _publish(2, "neg", b"v1"))
    registry = sim.cores[a].registry
    assert sim.run_until(lambda: registry.statistics().compacted == 2, limit=20.0)
    sim.partition([a, b], [c])
    # Away: c publishes and rolls back; the others move on, vaporize what c still has.
    sim.request(c, _publish(3, "mul", b"v1"))
    sim.request(c, _publish(4, "neg", b"v2"))
    sim.request(a, _publish(5, "add", b"v2"))
    sim.request(b, _wire.Vaporize(6, "add"))
    sim.request(b, _publish(7, "neg", b"v3"))
    sim.run_for(60.0)  # past the grace: a and b compact without c
    assert _status(sim, a).compacted_changes >= 5
    sim.heal()
    settled = sim.run_until(sim.converged, limit=sim.now + 30.0)
    assert settled is not None
    for address in sim.addresses:
        registry = sim.cores[address].registry
        with pytest.raises(FunctionNotFound):
            registry.resolve("add")  # vaporized by the cluster: not back through c
        assert registry.resolve("mul")[1].content_id  # c's change, re-issued on top
        neg = registry.versions("neg")
        # c proposed neg 2 while a and b gave 2 to v3: c's one is 3, a conflict
        assert [(v.version, v.proposed_version, v.conflict) for v in neg] == [
            (1, 1, False),
            (2, 2, False),
            (3, 2, True),
        ]
        assert neg[-1].current
    # Both sides compacted apart; one snapshot won (the one ending later in the one
    # order), and the nodes of the other side re-issued their changes under new writers.
    assert any("~" in core.facts.writer_id for core in sim.cores.values())


def test_a_change_every_member_had_seen_survives_members_adopting_the_other_side() -> None:
    """Found by the AwayPastTheGrace state machine (1,500 random histories): n1's change
    was seen by every member, so n1 no longer kept it; a member then adopted the other
    side's snapshot, which lacked it, and dropped it as void without re-issuing it (only a
    node's own changes were re-issued then). Now every void change dropped is re-issued,
    and the first re-issue in the one order applies."""
    from tests.core.test_replication import AwayPastTheGrace

    m = AwayPastTheGrace()
    m.boot(seed=159753)
    m.run(seconds=1.026350391937417)
    m.vaporize(name="add", node=0)
    m.vaporize(name="neg", node=2)
    m.vaporize(name="billing", node=2)
    m.partition(split=2)
    m.publish(body=b"v1", name="neg", node=2)
    m.away_past_the_grace(extra=3.0280428817213347, node=3)
    m.away_past_the_grace(extra=1.345961053840791, node=2)
    m.away_past_the_grace(extra=1.0715302816952268, node=2)
    m.publish_set(body=b"v2", node=1, size=2)
    m.vaporize(name="billing", node=1)
    m.rollback(name="neg", node=1)
    m.publish(body=b"v1", name="neg", node=0)
    m.publish(body=b"v2", name="neg", node=2)
    m.rollback(name="neg", node=2)
    m.rollback(name="mul", node=0)
    m.run(seconds=0.24165067862642917)
    m.publish_set(body=b"v2", node=2, size=2)
    m.run(seconds=1.0325075442057559)
    m.away_past_the_grace(extra=1.0715302816952268, node=0)
    m.run(seconds=1.0325075442057559)
    m.vaporize(name="mul", node=1)
    m.rollback(name="add", node=0)
    m.teardown()


def test_two_sides_that_folded_apart_under_one_last_change_converge() -> None:
    """On the simulator, the case the state machine found: n0 and n1 each make a change
    the other never sees, both concurrent with n2's change L, which both sides hold and
    which sorts last of the three; cut apart past the grace, n0's side folds its change
    and L, n1 folds its own and L. With the two snapshots ranked equal, neither side
    adopted the other's and the replicas did not converge after the heal."""
    sim = _sim(history_grace=3.0)
    a, b, c = sim.addresses
    sim.request(a, _publish(1, "base", b"v1"))
    sim.run_for(3.0)
    sim.partition([a], [b], [c])  # each alone: nothing they write travels
    sim.request(a, _publish(2, "p", b"v1"))
    sim.request(b, _publish(3, "q", b"v1"))
    sim.request(c, _publish(4, "last", b"v1"))
    (last,) = sim.cores[c].registry.log()
    message = _wire.PeerChanges("n2", c, [last], dict(sim.disks[c].bodies))
    effects = sim.cores[b].receive(
        b"", _wire.encoder.encode(message), role="peer", now=sim.now, wall=sim.now, readings=dict
    )
    sim._perform(b, effects)  # b holds L too, and will hear nothing more from a or c
    sim.partition([a, c], [b])
    sim.run_for(30.0)  # past the grace: both sides fold what they hold
    one, two = (sim.cores[x].registry.snapshot for x in (a, b))
    assert one.last == two.last == order_key(last) and one.changes == two.changes
    assert one.clock != two.clock
    sim.heal()
    assert sim.run_until(sim.converged, limit=sim.now + 60.0) is not None
    for address in sim.addresses:
        for name in ("base", "p", "q", "last"):
            assert sim.cores[address].registry.resolve(name)[1].content_id, (address, name)


def test_what_a_node_refused_as_void_stays_refused_after_a_restart() -> None:
    """A node refuses a void change, restarts, then hears a later change of the same
    writer (it counts the void one in its past, so it is void too). Forgetting the void
    record at the restart, the node held that change pending forever: its past will
    never come (every holder drops it when it adopts a transfer), and the replicas never
    settle; nor was a peer still holding the void change given a transfer."""
    sim = ClusterSimulation(1, seed=7, compact_after=1)
    (a,) = sim.addresses
    for i, body in enumerate((b"v1", b"v2", b"v3")):
        sim.request(a, _publish(i + 1, "add", body))
    sim.run_for(2.0)
    snapshot = sim.cores[a].registry.snapshot
    assert snapshot.changes == 3 and snapshot.last is not None
    away = Registry("0away")  # a writer that sorts first among equal totals
    made = [away.publish([record("g", f"v{i}")], now=1.0) for i in range(1, 5)]
    assert all(c is not None and order_key(c) < snapshot.last for c in made[:3])
    assert made[3] is not None and order_key(made[3]) > snapshot.last

    def hear(*changes: Any) -> None:
        message = _wire.PeerChanges("n9", "tcp://sim-9:1", list(changes), {})
        effects = sim.cores[a].receive(
            b"", _wire.encoder.encode(message), role="peer", now=sim.now, wall=sim.now,
            readings=dict,
        )
        sim._perform(a, effects)

    hear(made[0])
    assert sim.cores[a].registry.statistics().void == 1
    sim.restart(a)
    registry = sim.cores[a].registry
    assert registry.holds_void(away.clock)  # a peer holding it still gets a transfer
    hear(made[3])
    registry = sim.cores[a].registry
    assert registry.statistics().pending == 0
    assert not registry.has_change(made[3].change_id)
    sim.run_for(2.0)
    assert sim.converged()


def test_the_checker_counts_only_a_change_a_request_made_and_follows_a_re_issue_to_its_first() -> (
    None
):
    """The state machine's checker once reported a lost change where none was: an
    unchanged publish made no change, and it took the writer's newest change before it
    (a re-issue) as acknowledged; that re-issue was dropped by a later transfer and
    re-issued again, naming the first change, while the checker looked for one naming
    the re-issue."""
    from tests.core.test_replication import AwayPastTheGrace, kept

    m = AwayPastTheGrace()
    m.boot(seed=1)
    m.publish(body=b"v1", name="add", node=0)
    m.publish(body=b"v1", name="add", node=0)  # unchanged: no change made
    m.rollback(name="mul", node=0)  # nothing to roll back: no change made
    assert m.acknowledged == ["n0.1:1"]
    first = Registry("w").publish([record("g")], now=1.0)
    assert first is not None

    def reissue(writer: str) -> Any:
        change = Registry(writer).publish([record("g")], now=2.0)
        return msgspec.structs.replace(change, reissue_of=first.change_id)

    again, third = reissue("w~1"), reissue("w~2")
    written = {c.change_id: c for c in (first, again, third)}
    holder = Registry("x")
    assert not kept(holder, written, again.change_id)
    holder.apply(third)  # the re-issue of the re-issue, naming the first change
    assert kept(holder, written, again.change_id) and kept(holder, written, first.change_id)
