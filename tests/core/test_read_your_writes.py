"""Read your writes in the node core (rule 8 of `_core/_node.py`): held reads and pulls.

A read carrying a registry clock its node does not dominate is held, not answered; the
node pulls what it lacks from the members that made it, and answers once the change is
applied and its views written, or at its deadline with what it holds. Driven three ways:
one core by hand, whole cores in the simulator (`cluster.sim.ClusterSimulation`, with
gossip off so that only pulls move changes), and a hypothesis state machine over it.
"""

from __future__ import annotations

import os
from typing import Any

from hypothesis import event, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, rule

from cluster.fuzz_corpus import facts
from cluster.sim import ClusterSimulation
from scatter import _wire
from scatter._config import NodeConfig
from scatter._core._membership import MemberInfo, State
from scatter._core._node import BumpGeneration, NodeCore, NodeFacts, Send, SendPeer
from scatter._core._vclock import VectorClock
from tests.core.test_node_core import PEER, Disk, publish, receive

READ_WAIT = NodeConfig.read_wait
# Hundreds of histories in CI; `nox -s sim` (SCATTER_SIM_EXAMPLES) asks for thousands.
EXAMPLES = int(os.environ.get("SCATTER_SIM_EXAMPLES", "300"))


def _replies(effects: list[Any]) -> list[Any]:
    return [_wire.control_reply_decoder.decode(e.payload) for e in effects if isinstance(e, Send)]


def _pulls(effects: list[Any]) -> list[str]:
    """Where pulls go: digests that want no digest back (a tick also sends membership
    probes, and an anti-entropy digest that does)."""
    found = []
    for effect in effects:
        if isinstance(effect, SendPeer):
            message = _wire.control_request_decoder.decode(effect.payload)
            if isinstance(message, _wire.PeerDigest) and not message.reply:
                found.append(effect.address)
    return found


def test_a_node_that_holds_the_clock_answers_at_once_and_clocks_only_who_sent_one() -> None:
    disk = Disk()
    core = disk.core()
    (published,) = disk.run(core, receive(core, publish("add")))
    assert published.clock == core.registry.clock == VectorClock({"n1.1.aaaaaa": 1})
    (plain,) = disk.run(core, receive(core, _wire.encoder.encode(_wire.Describe(2, "add"))))
    assert plain.version == 1 and plain.clock is None  # no clock asked, none sent
    seen = _wire.Describe(3, "add", clock=published.clock)
    (answered,) = disk.run(core, receive(core, _wire.encoder.encode(seen)))
    assert answered.version == 1 and answered.clock == core.registry.clock
    (moved,) = disk.run(core, receive(core, _wire.encoder.encode(_wire.Rollback(4, "add"))))
    assert isinstance(moved, _wire.Failure)  # nothing to roll back to: no clock, no change
    (gone,) = disk.run(core, receive(core, _wire.encoder.encode(_wire.Vaporize(5, "add"))))
    assert gone.clock == VectorClock({"n1.1.aaaaaa": 2})


def test_changes_of_nodes_never_heard_of_are_not_waited_for_and_are_vouched_for() -> None:
    # A process that talked to another cluster carries that cluster's writers too: no
    # member here could ever bring those changes.
    disk = Disk()
    core = disk.core()
    (published,) = disk.run(core, receive(core, publish("add")))
    elsewhere = VectorClock({"stranger.1.abcdef": 3}).merge(published.clock)
    effects = receive(core, _wire.encoder.encode(_wire.Describe(1, "add", clock=elsewhere)))
    (described,) = disk.run(core, effects)
    assert described.version == 1 and described.clock == elsewhere
    (caught,) = disk.run(core, receive(core, _wire.encoder.encode(_wire.CatchUp(2, elsewhere))))
    assert caught.clock == elsewhere  # the client need not ask this node again


def test_a_node_alone_answers_at_once_what_it_lacks_of_its_own_changes() -> None:
    # Its own earlier changes, lost (a data directory restored from an old backup):
    # nobody could bring them.
    disk = Disk()
    core = disk.core()
    own = VectorClock({"n1.0.old": 2})
    effects = receive(core, _wire.encoder.encode(_wire.Describe(1, "add", clock=own)))
    (failure,) = disk.run(core, effects)
    assert failure.kind == "not_found"
    assert "had not yet received 2 registry change(s)" in failure.message
    assert "made on node(s) n1" in failure.message
    assert "no live member could bring them" in failure.message


def _core(node: str, address: str, disk: Disk) -> NodeCore:
    node_facts = NodeFacts(**{**facts().__dict__, "node_id": node, "writer_id": f"{node}.1.x"})
    node_facts = NodeFacts(**{**node_facts.__dict__, "address": address})
    core = NodeCore(NodeConfig(), node_facts, [], {}, {})
    disk.run(core, core.start(0.0))
    return core


def test_a_held_read_pulls_from_the_writer_and_is_answered_after_the_views_are_written() -> None:
    a_disk, c_disk = Disk(), Disk()
    a = _core("na", "tcp://a:1", a_disk)
    c = _core("nc", "tcp://c:1", c_disk)
    c.membership.remember(
        [MemberInfo(node="na", address="tcp://a:1", incarnation=1, state=State.ALIVE, since=0.0)],
        0.0,
    )
    (published,) = a_disk.run(a, receive(a, publish("add")))
    held = receive(c, _wire.encoder.encode(_wire.Describe(7, "add", clock=published.clock)))
    # Held: nothing answered; a digest of C's clock, no reply wanted, to the writer's node.
    (pull,) = held
    assert isinstance(pull, SendPeer) and pull.address == "tcp://a:1"
    digest = _wire.control_request_decoder.decode(pull.payload)
    assert isinstance(digest, _wire.PeerDigest) and not digest.reply
    assert digest.clock == VectorClock()
    # A second read for the same clock does not pull again (one in flight).
    assert receive(c, _wire.encoder.encode(_wire.ListFunctions(8, clock=published.clock))) == []
    # A answers the digest as any anti-entropy digest: with the change C lacks.
    (push,) = a.receive(b"", pull.payload, role="peer", now=1.0, wall=1.0, readings=dict)
    (change,) = push.changes
    bodies = {cid: a_disk.bodies[cid] for cid in a_disk.bodies}
    changes = _wire.PeerChanges("na", "tcp://a:1", [change], bodies)
    persist = c.receive(
        b"", _wire.encoder.encode(changes), role="peer", now=1.0, wall=1.0, readings=dict
    )
    after_changes = c.changes_persisted(persist[0].ticket)
    assert not [e for e in after_changes if isinstance(e, Send)]  # views not written yet
    done = c.views_persisted(after_changes[0].ticket)
    assert isinstance(done[0], BumpGeneration)  # workers see it before any answer leaves
    described, listed = _replies(done)
    assert (described.id, described.version) == (7, 1)
    assert described.clock.dominates(published.clock)
    assert listed.id == 8 and [row["name"] for row in listed.rows] == ["add"]


def test_a_held_read_is_answered_at_its_deadline_with_what_the_node_holds() -> None:
    disk = Disk()
    core = _core("nc", "tcp://c:1", disk)
    core.membership.remember(
        [MemberInfo(node="na", address="tcp://a:1", incarnation=1, state=State.ALIVE, since=0.0)],
        0.0,
    )
    seen = VectorClock({"na.1.x": 1})
    assert receive(core, _wire.encoder.encode(_wire.Describe(1, "add", clock=seen)))  # a pull
    asked = _wire.encoder.encode(_wire.CatchUp(2, seen, wait=0.5))
    assert not [e for e in receive(core, asked) if isinstance(e, Send)]
    assert core.next_wakeup() <= 1.0 + 0.5
    # Before the deadline the pull is asked again (its answer may have been lost).
    again = core.tick(1.0 + 0.3, {})
    assert _pulls(again) == ["tcp://a:1"]
    assert not [e for e in again if isinstance(e, Send)]
    (caught,) = _replies(core.tick(1.0 + 0.5, {}))  # the CatchUp asked for 0.5 s
    assert caught.id == 2 and not caught.clock.dominates(seen)
    (failure,) = _replies(core.tick(1.0 + READ_WAIT, {}))
    assert failure.id == 1 and failure.kind == "not_found"
    assert "no function named 'add'" in failure.message
    assert "waited 2.0 s" in failure.message and "node(s) na" in failure.message


def test_a_stopping_node_answers_its_held_reads() -> None:
    disk = Disk()
    core = _core("nc", "tcp://c:1", disk)
    core.membership.remember(
        [MemberInfo(node="na", address="tcp://a:1", incarnation=1, state=State.ALIVE, since=0.0)],
        0.0,
    )
    receive(core, _wire.encoder.encode(_wire.CatchUp(1, VectorClock({"na.1.x": 1}))))
    (failure,) = _replies(core.stop())
    assert failure.id == 1 and "stopping" in failure.message


# -- the simulator: whole cores, gossip off, changes move only through pulls ---------------


def _publish(request_id: int, name: str, body: bytes) -> _wire.Publish:
    return _wire.Publish(request_id, name, body, b"", "(a: int) -> int", "sig", f"{name}:{body!r}")


def test_in_the_simulator_only_the_pull_brings_the_change_and_a_cut_off_writer_costs_the_bound() -> None:
    sim = ClusterSimulation(3, seed=5, registry_gossip=False)
    a, b, c = sim.addresses
    published = sim.request(a, _publish(1, "add", b"v1"))
    assert isinstance(published, _wire.Published) and published.clock is not None
    sim.run_for(5.0)  # five anti-entropy intervals: nothing moves without a pull
    assert sim.cores[c].registry.clock == VectorClock()
    started = sim.now
    sim.submit(c, _wire.Describe(2, "add", clock=published.clock))
    assert sim.answer(c, 2) is None
    answered_at = sim.run_until(lambda: sim.answer(c, 2) is not None, limit=started + READ_WAIT)
    assert answered_at is not None and answered_at < started + 0.1
    described = sim.answer(c, 2)
    assert isinstance(described, _wire.Description) and described.version == 1
    assert sim.cores[b].registry.clock == VectorClock()  # nobody read through b

    # The writer cut off: the read waits its bound, then answers with what c holds.
    sim.partition([a], [b, c])
    moved = sim.request(a, _wire.Vaporize(3, "add"))
    assert isinstance(moved, _wire.Moved) and moved.clock is not None
    started = sim.now
    sim.submit(c, _wire.ListVersions(4, "add", clock=moved.clock))
    answered_at = sim.run_until(lambda: sim.answer(c, 4) is not None, limit=started + 2 * READ_WAIT)
    assert answered_at is not None and started + READ_WAIT <= answered_at < started + READ_WAIT + 0.1
    listing = sim.answer(c, 4)
    assert isinstance(listing, _wire.Listing) and [r["version"] for r in listing.rows] == [1]
    assert not listing.clock.dominates(moved.clock)  # the client can tell it fell short


NAMES = ("add", "mul")
BODIES = (b"v1", b"v2", b"v3")
NODES = 4


class ReadYourWrites(RuleBasedStateMachine):
    """Random changes at random nodes, the client's clock the merge of their replies';
    reads with that clock at random nodes. Every read is answered within the bound, and
    where nothing was cut off or lost, by a node that holds every change the client saw."""

    def __init__(self) -> None:
        super().__init__()
        self.sim: ClusterSimulation | None = None
        self.seen = VectorClock()
        self.ids = 0
        self.cut = False
        self.lossy = False

    @initialize(seed=st.integers(0, 2**32 - 1), gossip=st.booleans(), lossy=st.booleans())
    def boot(self, seed: int, gossip: bool, lossy: bool) -> None:
        self.lossy = lossy
        self.sim = ClusterSimulation(
            NODES, seed=seed, loss=0.1 if lossy else 0.0, registry_gossip=gossip
        )

    def _next_id(self) -> int:
        self.ids += 1
        return self.ids

    def _change(self, node: int, message: Any) -> None:
        assert self.sim is not None
        reply = self.sim.request(self.sim.addresses[node], message)
        if isinstance(reply, _wire.Published | _wire.Moved):
            assert reply.clock is not None
            self.seen = self.seen.merge(reply.clock)

    @rule(node=st.integers(0, NODES - 1), name=st.sampled_from(NAMES), body=st.sampled_from(BODIES))
    def publish(self, node: int, name: str, body: bytes) -> None:
        self._change(node, _publish(self._next_id(), name, body))

    @rule(node=st.integers(0, NODES - 1), name=st.sampled_from(NAMES))
    def rollback(self, node: int, name: str) -> None:
        self._change(node, _wire.Rollback(self._next_id(), name))

    @rule(node=st.integers(0, NODES - 1), name=st.sampled_from(NAMES))
    def vaporize(self, node: int, name: str) -> None:
        self._change(node, _wire.Vaporize(self._next_id(), name))

    @rule(seconds=st.floats(0.001, 1.0))
    def run(self, seconds: float) -> None:
        assert self.sim is not None
        self.sim.run_for(seconds)

    @rule(split=st.integers(1, NODES - 1))
    def partition(self, split: int) -> None:
        assert self.sim is not None
        self.sim.partition(self.sim.addresses[:split], self.sim.addresses[split:])
        self.cut = True

    @rule()
    def heal(self) -> None:
        assert self.sim is not None
        self.sim.cut = set()

    @rule(node=st.integers(0, NODES - 1), kind=st.integers(0, 3), name=st.sampled_from(NAMES))
    def read(self, node: int, kind: int, name: str) -> None:
        sim = self.sim
        assert sim is not None
        address = sim.addresses[node]
        request_id = self._next_id()
        clock = self.seen if self.seen.entries else None
        message: Any = [
            _wire.Describe(request_id, name, clock=clock),
            _wire.ListVersions(request_id, name, clock=clock),
            _wire.ListFunctions(request_id, clock=clock),
            _wire.CatchUp(request_id, self.seen),
        ][kind]
        started = sim.now
        sim.submit(address, message)
        answered_at = sim.run_until(
            lambda: sim.answer(address, request_id) is not None,
            limit=started + READ_WAIT + 0.1,
        )
        assert answered_at is not None, "a held read outlived its bound"
        reply = sim.answer(address, request_id)
        if isinstance(reply, _wire.Failure):
            assert reply.kind in ("not_found", "version_not_found"), reply
        lacking = isinstance(reply, _wire.Failure) and "had not yet received" in reply.message
        event("answered at once" if answered_at == started else "held, then answered")
        if lacking:
            event("answered without every change the client saw")
        if not self.cut and not self.lossy:
            # Every writer was reachable and no message was lost: the pull always works.
            assert sim.cores[address].registry.clock.dominates(self.seen)
            assert not lacking
            assert answered_at < started + READ_WAIT


TestReadYourWrites = ReadYourWrites.TestCase
TestReadYourWrites.settings = settings(
    max_examples=EXAMPLES, stateful_step_count=20, deadline=None
)


def test_a_client_of_protocol_4_is_answered_in_protocol_4() -> None:
    # Read your writes came with protocol 5; a client of 4 keeps working with this node.
    disk = Disk()
    core = disk.core()
    (old,) = disk.run(core, receive(core, _wire.encoder.encode(_wire.Hello(1, protocol=4))))
    (new,) = disk.run(core, receive(core, _wire.encoder.encode(_wire.Hello(2))))
    (odd,) = disk.run(core, receive(core, _wire.encoder.encode(_wire.Hello(3, protocol=99))))
    assert (old.protocol, new.protocol, odd.protocol) == (4, 5, _wire.PROTOCOL_VERSION)


# -- a route lease (read your writes through a route: step 6 of ARCHITECTURE.md) -------------


def _peer_replies(effects: list[Any], to: str) -> list[Any]:
    """The replies a member sends back to ``to`` for its clients (``PeerReply``)."""
    found = []
    for effect in effects:
        if isinstance(effect, SendPeer) and effect.address == to:
            message = _wire.control_request_decoder.decode(effect.payload)
            if isinstance(message, _wire.PeerReply):
                found.append(_wire.control_reply_decoder.decode(message.payload))
    return found


def _route_from(source: str, address: str, lease: _wire.Lease, ticket: int = 1) -> bytes:
    return _wire.encoder.encode(
        _wire.PeerRequest(source, address, ticket, "deploy", _wire.encoder.encode(lease))
    )


def _pair() -> tuple[NodeCore, Disk, NodeCore, Disk]:
    """Nodes A and B, each knowing the other alive, gossip as in a cluster."""
    a_disk, b_disk = Disk(), Disk()
    a = _core("na", "tcp://a:1", a_disk)
    b = _core("nb", "tcp://b:1", b_disk)
    a.membership.remember(
        [MemberInfo(node="nb", address="tcp://b:1", incarnation=1, state=State.ALIVE, since=0.0)],
        0.0,
    )
    b.membership.remember(
        [MemberInfo(node="na", address="tcp://a:1", incarnation=1, state=State.ALIVE, since=0.0)],
        0.0,
    )
    return a, a_disk, b, b_disk


def test_a_node_forwards_a_route_lease_of_the_current_version_with_its_registry_clock() -> None:
    a, a_disk, _b, _b_disk = _pair()
    (published,) = a_disk.run(a, receive(a, publish("add")))
    a.cannot_load.learn(published.content_id, "missing module `x`")  # its worker said so

    def forwarded(lease: _wire.Lease) -> _wire.Lease:
        (send,) = [e for e in receive(a, _wire.encoder.encode(lease)) if isinstance(e, SendPeer)]
        message = _wire.control_request_decoder.decode(send.payload)
        assert isinstance(message, _wire.PeerRequest) and send.address == "tcp://b:1"
        inner = _wire.control_request_decoder.decode(message.payload)
        assert isinstance(inner, _wire.Lease)
        return inner

    assert forwarded(_wire.Lease(7, "add")).clock == a.registry.clock
    # A client's clock (another cluster's entries too) is merged in; a pinned version
    # is the same everywhere and carries none.
    theirs = VectorClock({"stranger.1.abcdef": 3})
    assert forwarded(_wire.Lease(8, "add", clock=theirs)).clock == a.registry.clock.merge(theirs)
    assert forwarded(_wire.Lease(9, "add", version=1)).clock is None


def test_a_held_route_lease_is_granted_once_the_change_it_waited_for_has_its_views() -> None:
    a, a_disk, b, _b_disk = _pair()
    (published,) = a_disk.run(a, receive(a, publish("add")))
    # Without a clock (an older member), B decides at once with what it holds.
    plain = receive(b, _route_from("na", "tcp://a:1", _wire.Lease(6, "add")), role="peer")
    (refused,) = _peer_replies(plain, "tcp://a:1")
    assert isinstance(refused, _wire.Failure) and refused.kind == "not_found"
    # With A's clock: held, nothing answered; B pulls from the writer's node.
    lease = _wire.Lease(7, "add", clock=a.registry.clock)
    held = receive(b, _route_from("na", "tcp://a:1", lease, ticket=2), role="peer")
    assert _peer_replies(held, "tcp://a:1") == []
    assert _pulls(held) == ["tcp://a:1"]
    assert not _peer_replies(b.tick(1.0 + READ_WAIT / 2, {}), "tcp://a:1")  # still held
    # A answers the pull as any digest; B persists and applies the change: not yet.
    (push,) = a.receive(b"", held[0].payload, role="peer", now=1.1, wall=1.1, readings=dict)
    changes = _wire.PeerChanges("na", "tcp://a:1", list(push.changes), dict(a_disk.bodies))
    persist = b.receive(
        b"", _wire.encoder.encode(changes), role="peer", now=1.2, wall=1.2, readings=dict
    )
    after_changes = b.changes_persisted(persist[0].ticket)
    assert not _peer_replies(after_changes, "tcp://a:1")  # the views are not written yet
    done = b.views_persisted(after_changes[0].ticket)
    assert isinstance(done[0], BumpGeneration)  # its workers see the change first
    (granted,) = _peer_replies(done, "tcp://a:1")
    assert isinstance(granted, _wire.Leased) and granted.id == 7 and granted.node == "nb"
    assert published.version == 1 and b.registry.clock.dominates(lease.clock or VectorClock())


def test_a_held_route_lease_is_decided_at_its_deadline_with_what_the_node_holds() -> None:
    a, a_disk, b, _b_disk = _pair()
    a_disk.run(a, receive(a, publish("add")))
    lease = _wire.Lease(7, "add", clock=a.registry.clock)
    held = receive(b, _route_from("na", "tcp://a:1", lease), role="peer")
    assert _pulls(held) == ["tcp://a:1"]  # and its answer never comes
    assert b.next_wakeup() <= 1.0 + READ_WAIT
    assert not _peer_replies(b.tick(1.0 + READ_WAIT - 0.1, {}), "tcp://a:1")
    (failure,) = _peer_replies(b.tick(1.0 + READ_WAIT, {}), "tcp://a:1")
    assert isinstance(failure, _wire.Failure) and failure.id == 7
    assert failure.kind == "not_found"  # A moves on to the next member
    assert "had not yet received 1 registry change(s)" in failure.message
    assert "waited 2.0 s" in failure.message and "node(s) na" in failure.message


def test_a_route_lease_whose_clock_the_node_holds_is_decided_at_once() -> None:
    _a, _a_disk, b, b_disk = _pair()
    b_disk.run(b, receive(b, publish("add")))
    lease = _wire.Lease(7, "add", clock=b.registry.clock)
    effects = receive(b, _route_from("na", "tcp://a:1", lease), role="peer")
    assert _pulls(effects) == []
    (granted,) = _peer_replies(effects, "tcp://a:1")
    assert isinstance(granted, _wire.Leased) and granted.id == 7


def test_a_route_lease_held_for_a_client_whose_connection_closed_is_dropped() -> None:
    a, a_disk, b, _b_disk = _pair()
    a_disk.run(a, receive(a, publish("add")))
    lease = _wire.Lease(7, "add", clock=a.registry.clock)  # a client that sends its clock
    assert _pulls(receive(b, _wire.encoder.encode(lease))) == ["tcp://a:1"]
    assert b.connection_closed(PEER) == []
    assert not [e for e in b.tick(1.0 + READ_WAIT, {}) if isinstance(e, Send)]
