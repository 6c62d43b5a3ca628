"""Replication, as a whole: node cores on a lossy, partitioned, restarting network.

A hypothesis state machine drives `cluster.sim.ClusterSimulation` (the real NodeCore,
registry and membership of every node): random publishes, set publishes, rollbacks and
vaporizes at random nodes, messages lost (10%), delayed and reordered, partitions
healed, nodes restarted from what they persisted. Once everything heals and anti-entropy
settles, every replica must hold the state the set of all changes defines (the same
everywhere: numbers agree, nothing vaporized comes back), and every acknowledged change
must be held everywhere.
"""

from __future__ import annotations

import os

from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from cluster.sim import ClusterSimulation
from scatter import _wire
from scatter._core._registry import Registry

NAMES = ("add", "mul", "neg")
BODIES = (b"v1", b"v2", b"v3")
NODES = 4

# Hundreds of histories in CI; `nox -s sim` (SCATTER_SIM_EXAMPLES) asks for thousands.
EXAMPLES = int(os.environ.get("SCATTER_SIM_EXAMPLES", "300"))


def _publish(request_id: int, name: str, body: bytes) -> _wire.Publish:
    return _wire.Publish(request_id, name, body, b"", "(a: int) -> int", "sig", f"{name}:{body!r}")


class Replication(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.sim: ClusterSimulation | None = None
        self.ids = 0
        self.acknowledged: list[str] = []  # change ids a client was told succeeded

    @initialize(seed=st.integers(0, 2**32 - 1))
    def boot(self, seed: int) -> None:
        self.sim = ClusterSimulation(NODES, seed=seed, loss=0.10)

    def _node(self, index: int) -> str:
        assert self.sim is not None
        return self.sim.addresses[index % NODES]

    def _ask(self, index: int, message: object) -> object:
        assert self.sim is not None
        address = self._node(index)
        if address in self.sim.down:
            return None
        reply = self.sim.request(address, message)
        if not isinstance(reply, _wire.Failure):
            # The change this reply acknowledges is the newest one of that node's writer.
            core = self.sim.cores[address]
            writer = core.facts.writer_id
            count = core.registry.clock.get(writer)
            if count and isinstance(reply, _wire.Published | _wire.Moved):
                self.acknowledged.append(f"{writer}:{count}")
        return reply

    def _next_id(self) -> int:
        self.ids += 1
        return self.ids

    @rule(node=st.integers(0, NODES - 1), name=st.sampled_from(NAMES), body=st.sampled_from(BODIES))
    def publish(self, node: int, name: str, body: bytes) -> None:
        self._ask(node, _publish(self._next_id(), name, body))

    @rule(node=st.integers(0, NODES - 1), body=st.sampled_from(BODIES), size=st.integers(1, 2))
    def publish_set(self, node: int, body: bytes, size: int) -> None:
        members = [_publish(0, f"s{i}", body) for i in range(size)]
        self._ask(node, _wire.PublishSet(self._next_id(), "billing", members))

    @rule(node=st.integers(0, NODES - 1), name=st.sampled_from((*NAMES, "billing")))
    def rollback(self, node: int, name: str) -> None:
        self._ask(node, _wire.Rollback(self._next_id(), name))

    @rule(node=st.integers(0, NODES - 1), name=st.sampled_from((*NAMES, "billing")))
    def vaporize(self, node: int, name: str) -> None:
        self._ask(node, _wire.Vaporize(self._next_id(), name))

    @rule(seconds=st.floats(0.001, 2.0))
    def run(self, seconds: float) -> None:
        assert self.sim is not None
        self.sim.run_for(seconds)

    @rule(split=st.integers(1, NODES - 1))
    def partition(self, split: int) -> None:
        assert self.sim is not None
        self.sim.partition(self.sim.addresses[:split], self.sim.addresses[split:])

    @rule()
    def heal(self) -> None:
        assert self.sim is not None
        self.sim.cut = set()

    @rule(node=st.integers(0, NODES - 1))
    def restart(self, node: int) -> None:
        assert self.sim is not None
        self.sim.restart(self._node(node))

    @invariant()
    def every_replica_is_a_function_of_its_changes(self) -> None:
        # Rule 3 of the registry, under every delivery order the run produced.
        if self.sim is None:
            return
        for core in self.sim.cores.values():
            held = [core.registry._changes[c] for c in core.registry._changes]
            again = Registry.from_changes("check", held)
            assert again.functions() == core.registry.functions()

    def teardown(self) -> None:
        if self.sim is None:
            return
        sim = self.sim
        sim.heal()
        settled = sim.run_until(sim.converged, limit=sim.now + 120.0)
        assert settled is not None, "replicas did not converge within 120 s of the heal"
        every_change = {}
        for disk in sim.disks.values():
            every_change.update(disk.changes)
        reference = Registry.from_changes("reference", every_change.values())
        for address, core in sim.cores.items():
            for change_id in self.acknowledged:
                assert core.registry.has_change(change_id), f"{address} lost {change_id}"
            assert core.registry.functions() == reference.functions(), address
            for name in reference.names():
                try:
                    expected = reference.versions(name)
                except LookupError:
                    expected = None
                try:
                    found = core.registry.versions(name)
                except LookupError:
                    found = None
                assert found == expected, (address, name)


TestReplication = Replication.TestCase
TestReplication.settings = settings(
    max_examples=EXAMPLES, stateful_step_count=25, deadline=None
)
