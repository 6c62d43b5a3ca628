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
import heapq
import itertools
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from scatter._core._membership import Membership, MembershipConfig, Message, Packet, State


@dataclass(order=True)
class _Delivery:
    at: float
    order: int
    address: str = field(compare=False)
    source: str = field(compare=False)
    messages: tuple[Message, ...] = field(compare=False)


class Simulation:
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


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.sim")
    parser.add_argument("--nodes", type=int, default=100)
    parser.add_argument("--seeds", type=int, default=10, help="runs, seeds 0..N-1")
    parser.add_argument("--seed", type=int, default=None, help="run this one seed only")
    parser.add_argument("--loss", type=float, default=0.0)
    parser.add_argument("--profile", choices=("lan", "local"), default="lan")
    parser.add_argument("--kill", type=int, default=1, help="members killed after joining")
    parser.add_argument("--observe", type=float, default=60.0, help="seconds watched after")
    args = parser.parse_args(argv)
    config = MembershipConfig.lan() if args.profile == "lan" else MembershipConfig.local()
    seeds = [args.seed] if args.seed is not None else list(range(args.seeds))
    joins: list[float] = []
    detections: list[float] = []
    false_dead = 0
    started = time.monotonic()
    for seed in seeds:
        sim = Simulation(args.nodes, config, seed=seed, loss=args.loss)
        sim.join_all()
        joined = sim.run_until(sim.everyone_knows_everyone, limit=600.0)
        if joined is None:
            print(f"seed {seed}: the cluster never converged (replay with --seed {seed})")
            return 1
        joins.append(joined)
        victims = sim.rng.sample(sorted(sim.members)[1:], args.kill)
        killed_at = sim.now
        for victim in victims:
            sim.kill(victim)
        done = sim.run_until(
            lambda sim=sim, victims=victims: all(sim.declared_dead_by_all(v) for v in victims),
            limit=killed_at + 600.0,
        )
        if done is None:
            print(
                f"seed {seed}: a killed member was never declared dead (replay with --seed {seed})"
            )
            return 1
        detections.append(done - killed_at)
        sim.run_for(args.observe)
        false_dead += sim.false_dead_verdicts()
    print(
        f"{args.nodes} members, {len(seeds)} seeds, loss {args.loss:.0%}, profile {args.profile}: "
        f"join median {statistics.median(joins):.2f} s p99 {_percentile(joins, 0.99):.2f} s; "
        f"killed member dead everywhere after median {statistics.median(detections):.2f} s "
        f"p99 {_percentile(detections, 0.99):.2f} s; false dead verdicts {false_dead}; "
        f"{time.monotonic() - started:.1f} s of wall time"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
