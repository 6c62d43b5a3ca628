"""A deterministic simulator of Scatter's membership core: many members, one process.

    python -m cluster.sim --nodes 1000 --seeds 20 --loss 0.1
    python -m cluster.sim --nodes 50 --seed 7 --kill 1     # replays seed 7 exactly

Each member is the real ``scatter._core._membership.Membership``; the network is an
in-memory queue with a seeded RNG that drops (``--loss``), delays (uniform in
``--delay`` seconds) and so reorders packets; time is virtual, so a run of minutes of
cluster time takes seconds and a seed replays bit for bit (FoundationDB's simulation
and TigerBeetle's VOPR are the models). The tests drive the same class.

Reports, per seed and as median / p99 over seeds: seconds until every member knows every
other (join), until every live member declares a killed one dead, and false dead verdicts
(a live member declared dead by anyone) under loss.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import heapq
import itertools
import math
import random
import statistics
import sys
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass, field

import msgspec

from scatter import _wire as wire
from scatter._config import NodeConfig
from scatter._core._membership import (
    MemberInfo,
    Membership,
    MembershipConfig,
    Message,
    Packet,
    State,
)
from scatter._core._node import (
    NodeCore,
    NodeFacts,
    PersistChanges,
    PersistMembers,
    PersistViews,
    PushBodies,
    PushChanges,
    Send,
    SendPeer,
)
from scatter._core._registry import Change, FunctionView, Snapshot
from scatter._exceptions import FunctionNotFound


@dataclass(order=True)
class _Delivery:
    at: float
    order: int
    address: str = field(compare=False)
    source: str = field(compare=False)
    messages: tuple[Message, ...] = field(compare=False)


class _VirtualTime:
    """Running a simulation: one event at a time (``step``), on its own clock."""

    now: float

    def step(self) -> None:
        raise NotImplementedError

    def run_until(self, condition: Callable[[], bool], *, limit: float) -> float | None:
        """Advance time until ``condition()`` holds; its time, or None past ``limit``."""
        while True:
            if condition():
                return self.now
            if self.now > limit:
                return None
            self.step()

    def run_for(self, seconds: float) -> None:
        end = self.now + seconds
        while self.now < end:
            self.step()


class Simulation(_VirtualTime):
    """Members on a lossy, reordering in-memory network, on a virtual clock.

    Args:
        nodes: how many members.
        config: their membership profile.
        seed: the one source of randomness: same seed, same run.
        loss: probability that a packet is dropped.
        delay: (min, max) seconds a delivered packet takes.
    """

    def __init__(
        self,
        nodes: int,
        config: MembershipConfig,
        *,
        seed: int = 0,
        loss: float = 0.0,
        delay: tuple[float, float] = (0.0005, 0.002),
    ) -> None:
        self.rng = random.Random(seed)
        self.loss = loss
        self.delay = delay
        self.now = 0.0
        self.members = {
            f"sim://{i}": Membership(
                f"n{i}", f"sim://{i}", config, seed=self.rng.randrange(2**32), now=0.0
            )
            for i in range(nodes)
        }
        self.down: set[str] = set()  # addresses whose process is stopped (killed or paused)
        self.sent = 0
        self._queue: list[_Delivery] = []
        self._order = itertools.count()
        self._wakeups: dict[str, float] = {a: m.next_wakeup() for a, m in self.members.items()}

    # -- faults -------------------------------------------------------------------

    def kill(self, address: str) -> None:
        self.down.add(address)

    def resume(self, address: str) -> None:
        self.down.discard(address)
        self._wakeups[address] = self.now

    # -- running ------------------------------------------------------------------

    def join_all(self, *, via: str = "sim://0") -> None:
        """Every member joins through ``via`` (as `scatter node join ADDR` does)."""
        for address, member in self.members.items():
            if address != via:
                self._send(address, member.join([via], self.now))

    def step(self) -> None:
        """Deliver the next packet or fire the next timer, whichever comes first."""
        live = [(t, a) for a, t in self._wakeups.items() if a not in self.down]
        next_timer = min(live, default=(float("inf"), ""))
        if self._queue and self._queue[0].at <= next_timer[0]:
            delivery = heapq.heappop(self._queue)
            self.now = max(self.now, delivery.at)
            if delivery.address in self.down or delivery.address not in self.members:
                return
            member = self.members[delivery.address]
            self._send(
                delivery.address, member.receive(delivery.source, delivery.messages, self.now)
            )
            return
        at, address = next_timer
        if address == "":
            raise RuntimeError("nothing left to do: every member is down")
        self.now = max(self.now, at)
        member = self.members[address]
        self._send(address, member.tick(self.now))

    def _send(self, source: str, packets: Iterable[Packet]) -> None:
        member = self.members[source]
        for packet in packets:
            self.sent += 1
            if self.rng.random() < self.loss:
                continue
            at = self.now + self.rng.uniform(*self.delay)
            heapq.heappush(
                self._queue,
                _Delivery(at, next(self._order), packet.address, source, packet.messages),
            )
        # The member's next timer may have moved with what it just did.
        self._wakeups[source] = max(member.next_wakeup(), self.now + 1e-6)

    # -- questions ----------------------------------------------------------------

    def everyone_knows_everyone(self) -> bool:
        ids = {m.node for a, m in self.members.items() if a not in self.down}
        return all(
            ids <= set(m.live_members()) for a, m in self.members.items() if a not in self.down
        )

    def declared_dead_by_all(self, address: str) -> bool:
        node = self.members[address].node
        return all(
            m.state_of(node) in (State.DEAD, State.LEFT)
            for a, m in self.members.items()
            if a not in self.down
        )

    def false_dead_verdicts(self) -> int:
        """Live members that some live member holds dead."""
        live = {m.node for a, m in self.members.items() if a not in self.down}
        return sum(
            1
            for a, m in self.members.items()
            if a not in self.down
            for node in live
            if m.state_of(node) in (State.DEAD, State.LEFT)
        )


# -- whole nodes: the node core (registry, replication, membership) on the same network --


class SimDisk:
    """What one node persisted, in memory: a restart rebuilds its core from this."""

    def __init__(self) -> None:
        self.snapshot = Snapshot()  # what compaction folded (bounded history)
        self.void: dict[str, int] = {}  # what the registry refused as void
        self.changes: dict[str, Change] = {}
        self.views: dict[str, FunctionView] = {}
        self.bodies: dict[str, bytes] = {}
        self.members: tuple[MemberInfo, ...] = ()
        self.starts = 0


class ClusterSimulation(_VirtualTime):
    """Node cores (registry, replication, membership; no workers) on a simulated network.

    The same `NodeCore` the Trio node drives; effects are performed at once (disk writes
    succeed instantly), peer messages travel through the lossy, reordering queue. Used
    by the stateful property test of replication and by ``--registry`` below.
    """

    def __init__(
        self,
        nodes: int,
        *,
        seed: int = 0,
        loss: float = 0.0,
        delay: tuple[float, float] = (0.0005, 0.002),
        membership: MembershipConfig | None = None,
        registry_gossip: bool = True,
        read_wait: float = NodeConfig.read_wait,
        history_grace: float = NodeConfig.history_grace,
        compact_after: int = NodeConfig.compact_after,
    ) -> None:
        self.rng = random.Random(seed)
        self.loss = loss
        self.delay = delay
        self.now = 0.0
        self.config = NodeConfig(
            min_workers=0,
            membership=membership or MembershipConfig.local(),
            # False: no node pushes, gossips or starts anti-entropy; changes move only
            # through pulls for held reads (read your writes), as the real test hook.
            registry_gossip=registry_gossip,
            read_wait=read_wait,
            history_grace=history_grace,
            compact_after=compact_after,
        )
        self.addresses = [f"tcp://sim-{i}:1" for i in range(nodes)]
        self.disks = {address: SimDisk() for address in self.addresses}
        self.cores: dict[str, NodeCore] = {}
        self.down: set[str] = set()
        self.cut: set[frozenset[str]] = set()  # pairs that cannot talk (a partition)
        self.replies: dict[str, list[object]] = {a: [] for a in self.addresses}
        self.messages = 0
        # Every change any node ever persisted, compacted away since or not (checkers).
        self.written: dict[str, Change] = {}
        self._queue: list[_Delivery] = []
        self._order = itertools.count()
        self._timers: list[tuple[float, int, str]] = []  # (when, order, address), lazy
        self._wake: dict[str, float] = {}  # {address: its current timer}
        for address in self.addresses:
            self._boot(address)
        # Everyone knows everyone from the start, quietly (a cluster in its steady state):
        # dissemination is what is measured, not a thousand joins.
        table = [
            MemberInfo(
                node=c.facts.node_id,
                address=a,
                incarnation=c.membership.incarnation,
                state=State.ALIVE,
                since=0.0,
            )
            for a, c in self.cores.items()
        ]
        for address, core in self.cores.items():
            core.membership.remember(table, self.now)
            self._perform(address, core.tick(self.now, {}))  # stores the table, as a node would

    def _boot(self, address: str) -> None:
        disk = self.disks[address]
        disk.starts += 1
        index = self.addresses.index(address)
        facts = NodeFacts(
            node_id=f"n{index}",
            writer_id=f"n{index}.{disk.starts}",
            incarnation=disk.starts,
            address=address,
            pid=0,
            data_dir="",
            started_at=0.0,
            python="3.11",
            scatter_version="sim",
            seed=self.rng.randrange(2**32),
        )
        core = NodeCore(
            self.config,
            facts,
            disk.changes.values(),
            disk.views,
            disk.bodies,
            snapshot=disk.snapshot,
            void=disk.void,
        )
        self.cores[address] = core
        # As the node's driver does: rejoin through the members remembered on disk.
        remembered = [
            m.address for m in disk.members if m.address != address and m.state <= State.SUSPECT
        ]
        self._perform(address, core.start(self.now, remembered, disk.members))

    # -- faults ---------------------------------------------------------------------

    def restart(self, address: str) -> None:
        """Kill and restart a node from what it persisted (a new start, a new writer)."""
        self.down.discard(address)
        self._boot(address)

    def partition(self, *groups: Iterable[str]) -> None:
        """Cut every pair of nodes that are not in one group."""
        sets = [set(group) for group in groups]
        self.cut = {
            frozenset((a, b))
            for a in self.addresses
            for b in self.addresses
            if a != b and not any(a in g and b in g for g in sets)
        }

    def heal(self) -> None:
        self.cut = set()
        self.down = set()
        for address in self.cores:
            self._wake.pop(address, None)
            self._schedule(address)

    # -- clients ----------------------------------------------------------------------

    def request(self, address: str, message: object) -> object:
        """A client request to one node, answered at once (its writes are instant)."""
        before = len(self.replies[address])
        self.submit(address, message)
        answers = self.replies[address][before:]
        assert answers, f"{address} did not answer {type(message).__name__} at once"
        return answers[-1]

    def submit(self, address: str, message: object) -> None:
        """A client request to one node, perhaps answered later (a read held for changes
        its clock counts, read your writes): see :meth:`answer`."""
        core = self.cores[address]
        payload = wire.encoder.encode(message)
        effects = core.receive(
            b"client", payload, role="deploy", now=self.now, wall=self.now, readings=dict
        )
        self._perform(address, effects)

    def answer(self, address: str, request_id: int) -> object | None:
        """The reply ``address`` sent to request ``request_id``, if any yet."""
        for reply in self.replies[address]:
            if getattr(reply, "id", None) == request_id:
                return reply
        return None

    # -- running ----------------------------------------------------------------------

    def step(self) -> None:
        timer = self._next_timer()
        if self._queue and (timer is None or self._queue[0].at <= timer[0]):
            delivery = heapq.heappop(self._queue)
            self.now = max(self.now, delivery.at)
            if delivery.address in self.down or delivery.address not in self.cores:
                return
            core = self.cores[delivery.address]
            (payload,) = delivery.messages
            effects = core.receive(
                b"", payload, role="peer", now=self.now, wall=self.now, readings=dict
            )
            self._perform(delivery.address, effects)
            return
        if timer is None:
            raise RuntimeError("nothing left to do: every node is down")
        at, address = timer
        heapq.heappop(self._timers)
        self.now = max(self.now, at, self.now + 1e-6)
        self._perform(address, self.cores[address].tick(self.now, {}))

    def _next_timer(self) -> tuple[float, str] | None:
        """The earliest live node timer (a heap; stale entries are skipped)."""
        while self._timers:
            at, _order, address = self._timers[0]
            if address in self.down or self._wake.get(address) != at:
                heapq.heappop(self._timers)
                continue
            return at, address
        return None

    def _schedule(self, address: str) -> None:
        at = self.cores[address].next_wakeup()
        if self._wake.get(address) != at:
            self._wake[address] = at
            heapq.heappush(self._timers, (at, next(self._order), address))

    def _perform(self, address: str, effects: Iterable[object]) -> None:
        self._perform_effects(address, effects)
        self._schedule(address)  # what it just did may have moved its next timer

    def _perform_effects(self, address: str, effects: Iterable[object]) -> None:
        pending = list(effects)
        core = self.cores[address]
        disk = self.disks[address]
        while pending:
            effect = pending.pop(0)
            if isinstance(effect, Send):
                self.replies[address].append(wire.control_reply_decoder.decode(effect.payload))
            elif isinstance(effect, SendPeer):
                self._send(address, effect.address, effect.payload)
            elif isinstance(effect, PushChanges):
                wanted = effect.content_ids()
                bodies = {cid: disk.bodies[cid] for cid in wanted if cid in disk.bodies}
                message = wire.PeerChanges(
                    core.facts.node_id, address, list(effect.changes), bodies, effect.snapshot
                )
                self._send(address, effect.address, wire.encoder.encode(message))
            elif isinstance(effect, PushBodies):
                found = {cid: disk.bodies[cid] for cid in effect.content_ids if cid in disk.bodies}
                if found:
                    message = wire.PeerChanges(core.facts.node_id, address, [], found)
                    self._send(address, effect.address, wire.encoder.encode(message))
            elif isinstance(effect, PersistChanges):
                if effect.snapshot is not None:
                    disk.snapshot = effect.snapshot
                    if effect.replace:
                        disk.changes.clear()
                if effect.void is not None:
                    disk.void = dict(effect.void)
                for change_id in effect.dropped:
                    disk.changes.pop(change_id, None)
                for change in effect.changes:
                    disk.changes[change.change_id] = change
                    self.written[change.change_id] = change
                disk.bodies.update({cid: body for cid, (_, body) in effect.bodies.items()})
                pending += core.changes_persisted(effect.ticket)
            elif isinstance(effect, PersistMembers):
                disk.members = effect.members
            elif isinstance(effect, PersistViews):
                for name, view in effect.views.items():
                    if view is None:
                        disk.views.pop(name, None)
                    else:
                        disk.views[name] = view
                for cid in effect.dropped_bodies:
                    disk.bodies.pop(cid, None)
                pending += core.views_persisted(effect.ticket)

    def _send(self, source: str, target: str, payload: bytes) -> None:
        self.messages += 1
        if frozenset((source, target)) in self.cut or self.rng.random() < self.loss:
            return
        at = self.now + self.rng.uniform(*self.delay)
        heapq.heappush(self._queue, _Delivery(at, next(self._order), target, source, (payload,)))  # type: ignore[arg-type]

    # -- questions ----------------------------------------------------------------------

    def replicas(self, without: Collection[str] = ()) -> dict[str, tuple[object, ...]]:
        """Each live node's registry as a comparable value: clock, functions, histories
        (the nodes at ``without``, forgotten by the others, left out)."""
        out: dict[str, tuple[object, ...]] = {}
        for address, core in self.cores.items():
            if address in self.down or address in without:
                continue
            registry = core.registry
            names = sorted(registry.names())
            histories = []
            for name in names:
                try:
                    histories.append(
                        (name, [msgspec.to_builtins(v) for v in registry.versions(name)])
                    )
                except FunctionNotFound:
                    histories.append((name, None))
            out[address] = (registry.clock, msgspec.to_builtins(registry.functions()), histories)
        return out

    def converged(self, without: Collection[str] = ()) -> bool:
        live = [c for a, c in self.cores.items() if a not in self.down and a not in without]
        clocks = [c.registry.clock for c in live]
        if any(clock != clocks[0] for clock in clocks[1:]) or any(
            c.registry.statistics().pending for c in live
        ):
            return False  # cheap: most calls end here
        values = list(self.replicas(without).values())
        return all(v == values[0] for v in values[1:])


@contextlib.contextmanager
def _collected_between_runs() -> Iterator[None]:
    """The cyclic collector off during a run, run between runs.

    A 1,000-node run holds a million member entries, all live until the run ends; with
    the collector on, its full passes over them took two thirds of the setup's time.
    """
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gc.collect()


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _registry_rounds(nodes: int, seeds: list[int], loss: float, config: MembershipConfig) -> int:
    """Rounds (gossip intervals) until every node holds a version published at one."""
    rounds: list[int] = []
    started = time.monotonic()
    for seed in seeds:
        with _collected_between_runs():
            reached, missing = _one_registry_run(nodes, seed, loss, config)
        if reached is None:
            print(f"seed {seed}: {missing} nodes never got the version (--seed {seed})")
            return 1
        rounds.append(reached)
    print(
        f"{nodes} nodes, {len(seeds)} seeds, loss {loss:.0%}: a new version reached every "
        f"node in median {statistics.median(rounds):g} rounds, p99 {_percentile(rounds, 0.99):g} "
        f"(rounds of {config.gossip_interval:g} s); {time.monotonic() - started:.1f} s of wall time"
    )
    return 0


def _one_registry_run(
    nodes: int, seed: int, loss: float, config: MembershipConfig
) -> tuple[int | None, int]:
    """(rounds until every node holds a new version, or None; how many never got it)."""
    sim = ClusterSimulation(nodes, seed=seed, loss=loss, membership=config)
    origin = sim.addresses[0]
    sim.request(origin, wire.Publish(1, "add", b"body", b"", "(a: int) -> int", "s", "c"))
    (change_id,) = list(sim.cores[origin].registry._changes)
    published = sim.now
    missing = set(sim.cores)

    def everyone() -> bool:  # checked after every step: stop at the first node without it
        while missing:
            address = next(iter(missing))
            if not sim.cores[address].registry.has_change(change_id):
                return False
            missing.discard(address)
        return True

    reached = sim.run_until(everyone, limit=published + 120.0)
    if reached is None:
        return None, len(missing)
    return max(1, math.ceil((reached - published) / config.gossip_interval)), 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.sim")
    parser.add_argument("--nodes", type=int, default=100)
    parser.add_argument("--seeds", type=int, default=10, help="runs, seeds 0..N-1")
    parser.add_argument("--seed", type=int, default=None, help="run this one seed only")
    parser.add_argument("--loss", type=float, default=0.0)
    parser.add_argument("--profile", choices=("lan", "local"), default="lan")
    parser.add_argument("--kill", type=int, default=1, help="members killed after joining")
    parser.add_argument("--observe", type=float, default=60.0, help="seconds watched after")
    parser.add_argument(
        "--registry",
        action="store_true",
        help="measure how a new version reaches every node (node cores, not membership alone)",
    )
    args = parser.parse_args(argv)
    config = MembershipConfig.lan() if args.profile == "lan" else MembershipConfig.local()
    seeds = [args.seed] if args.seed is not None else list(range(args.seeds))
    if args.registry:
        return _registry_rounds(args.nodes, seeds, args.loss, config)
    joins: list[float] = []
    detections: list[float] = []
    false_dead = 0
    started = time.monotonic()
    for seed in seeds:
        with _collected_between_runs():
            outcome = _one_membership_run(args, config, seed)
        if isinstance(outcome, str):
            print(outcome)
            return 1
        joined, detected, false = outcome
        joins.append(joined)
        detections.append(detected)
        false_dead += false
    print(
        f"{args.nodes} members, {len(seeds)} seeds, loss {args.loss:.0%}, profile {args.profile}: "
        f"join median {statistics.median(joins):.2f} s p99 {_percentile(joins, 0.99):.2f} s; "
        f"killed member dead everywhere after median {statistics.median(detections):.2f} s "
        f"p99 {_percentile(detections, 0.99):.2f} s; false dead verdicts {false_dead}; "
        f"{time.monotonic() - started:.1f} s of wall time"
    )
    return 0


def _one_membership_run(
    args: argparse.Namespace, config: MembershipConfig, seed: int
) -> tuple[float, float, int] | str:
    """(join time, detection time, false dead verdicts), or why the run failed."""
    sim = Simulation(args.nodes, config, seed=seed, loss=args.loss)
    sim.join_all()
    joined = sim.run_until(sim.everyone_knows_everyone, limit=600.0)
    if joined is None:
        return f"seed {seed}: the cluster never converged (replay with --seed {seed})"
    victims = sim.rng.sample(sorted(sim.members)[1:], args.kill)
    killed_at = sim.now
    for victim in victims:
        sim.kill(victim)
    done = sim.run_until(
        lambda: all(sim.declared_dead_by_all(v) for v in victims), limit=killed_at + 600.0
    )
    if done is None:
        return f"seed {seed}: a killed member was never declared dead (replay with --seed {seed})"
    sim.run_for(args.observe)
    return joined, done - killed_at, sim.false_dead_verdicts()


if __name__ == "__main__":
    sys.exit(main())
