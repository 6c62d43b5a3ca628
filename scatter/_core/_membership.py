################################################################
# Membership: who is in the cluster, and who is alive
################################################################
#
# SWIM with Lifeguard, as hashicorp/memberlist does it (state.go, suspicion.go,
# awareness.go), as a sans-I/O state machine: messages and `now` in, packets out.
# The node drives it with sockets and trio.current_time(), the simulator with a
# thousand instances and virtual time, the property tests with random losses.
#
# Rule 1: a member's state moves only forward for one incarnation:
#   ALIVE -> SUSPECT -> DEAD, and LEFT (a graceful leave) is DEAD said by itself.
#   News with a higher incarnation replaces anything older; news with the same
#   incarnation may only move the state forward; lower incarnations are stale.
# Rule 2: only a member raises its own incarnation: when it hears it is suspected
#   or dead (it refutes with ALIVE at a higher incarnation) or when it restarts.
# Rule 3: every probe interval, probe one member (round robin over a shuffled
#   list). No ack within the probe timeout: ask `indirect_checks` others to probe
#   it (PingReq). No ack by the end of the interval: suspect it.
# Rule 4: a suspicion turns into DEAD after a timeout that starts at
#   suspicion_max_timeout_mult x min and shrinks toward min as independent
#   members confirm it (Lifeguard's "dogpile"); min = suspicion_mult x
#   max(1, log10 N) x probe_interval.
# Rule 5: local health (Lifeguard's "self-awareness"): missed nacks and refuted
#   suspicions of ourselves raise a score 0..awareness_max_multiplier-1 that
#   stretches our probe interval and timeout, so a slow node suspects others less;
#   successful probes lower it.
# Rule 6: news (ALIVE, SUSPECT, DEAD) is piggybacked on every packet and gossiped
#   to `gossip_nodes` members every gossip interval, each at most
#   retransmit_mult x ceil(log10(N+1)) times; every push_pull_interval, one member
#   gets our whole table and answers with its own (anti-entropy).
# Rule 7: a probe of a suspect carries the suspicion, so the suspect can refute
#   at once (Lifeguard's "buddy system").
# Rule 8: every reconnect interval, one member held DEAD (not LEFT) gets our table,
#   as Serf's reconnect does: after a partition each side holds the other dead, and
#   without this nothing would reunite them.

"""SWIM + Lifeguard membership, pure: messages and ``now`` in, packets out."""

from __future__ import annotations

import enum
import math
import operator
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Annotated

import msgspec
from msgspec.structs import replace as replace_struct

from ._broadcast import BroadcastQueue

__all__ = [
    "Ack",
    "Alive",
    "Dead",
    "MemberInfo",
    "Membership",
    "MembershipConfig",
    "Message",
    "Nack",
    "Packet",
    "Ping",
    "PingReq",
    "State",
    "Suspect",
    "Sync",
]


class State(enum.IntEnum):
    """Ordered: for one incarnation a state only moves to a higher one."""

    ALIVE = 0
    SUSPECT = 1
    DEAD = 2
    LEFT = 3


# -- messages (ONLY APPEND tags and fields: they go on the wire) ----------------


class Ping(msgspec.Struct, array_like=True, tag=60, frozen=True):
    seq: int
    target: str  # the id probed: a restarted process under another id does not answer
    source: str


class PingReq(msgspec.Struct, array_like=True, tag=61, frozen=True):
    """Probe ``target`` for me, and tell me (Ack), or that you could not (Nack)."""

    seq: int
    target: str
    target_address: str
    source: str


class Ack(msgspec.Struct, array_like=True, tag=62, frozen=True):
    seq: int
    source: str


class Nack(msgspec.Struct, array_like=True, tag=63, frozen=True):
    seq: int
    source: str


class Alive(msgspec.Struct, array_like=True, tag=64, frozen=True):
    node: str
    address: str
    incarnation: int


class Suspect(msgspec.Struct, array_like=True, tag=65, frozen=True):
    node: str
    incarnation: int
    source: str  # who suspects: independent confirmations shorten the timeout


class Dead(msgspec.Struct, array_like=True, tag=66, frozen=True):
    node: str
    incarnation: int
    source: str  # == node: it left gracefully
    address: str = ""  # in a table: where it was, so a reconnect can try it (rule 8)


# Members one table may list: SWIM clusters of 10,000+ exist (Lifeguard's paper); past
# this a table is refused rather than held (a peer cannot make us allocate without bound).
MAX_MEMBERS = 65_536


class Sync(msgspec.Struct, array_like=True, tag=67, frozen=True):
    """A whole member table (push); ``reply`` asks for the other's (pull)."""

    source: str
    members: Annotated[list[Alive | Suspect | Dead], msgspec.Meta(max_length=MAX_MEMBERS)]
    reply: bool


Message = Ping | PingReq | Ack | Nack | Alive | Suspect | Dead | Sync


@dataclass(frozen=True)
class Packet:
    """Messages for the member at ``address``, sent together."""

    address: str
    messages: tuple[Message, ...]


@dataclass(frozen=True)
class MembershipConfig:
    """Timers and fan-outs, in seconds and counts; see memberlist's config.go.

    Use a profile: ``MembershipConfig.lan()`` (the default for nodes) or
    ``MembershipConfig.local()`` (fast timers for one machine and tests, as memberlist's
    DefaultLocalConfig).

    The LAN profile is memberlist's DefaultLANConfig with the probe interval and timeout
    halved and the suspicion multiplier raised from 4 to 6, so that the shortest
    suspicion is 3 s at small N (memberlist's: 4 s) and 3 x log10 N s above. memberlist's
    own timers cannot declare a dead member dead within 6 s at p99 in a 5-node cluster:
    the first failed probe comes 1 interval after a probe that may itself come up to
    ~3 s late (each member probes one of 4 others per interval, in a shuffled order),
    then at least 4 s of suspicion (simulator, 100 seeds: p99 7.8-8.8 s; 10 s+ at 10%
    loss). With these, p99 4.9 s (5.2 s at 10% loss) and 0 false verdicts at 10% loss
    in the simulator, at twice memberlist's probe traffic (one ping every 0.5 s per
    member).
    """

    # How often a member is probed; a failure is first noticed within ~1.6 intervals.
    probe_interval: float = 0.5
    # How long to wait for a direct ack before asking others (indirect probes).
    probe_timeout: float = 0.25
    # Members asked to probe a silent member for us: more cuts false suspicions.
    indirect_checks: int = 3
    # Suspicion min timeout = suspicion_mult * max(1, log10 N) * probe_interval: 3 s at N=5.
    suspicion_mult: int = 6
    # ... and it starts at this many times min, shrinking as confirmations arrive.
    suspicion_max_timeout_mult: int = 6
    # News is piggybacked retransmit_mult * ceil(log10(N+1)) times: 4 at N=5.
    retransmit_mult: int = 4
    # Every gossip interval, queued news goes to this many random members.
    gossip_interval: float = 0.2
    gossip_nodes: int = 3
    # Full-table exchange with one member, for news the gossip lost (anti-entropy).
    push_pull_interval: float = 30.0
    # Local health: the probe interval and timeout stretch up to this factor.
    awareness_max_multiplier: int = 8
    # Every interval, one member held dead gets our table (Serf's reconnect): after a
    # partition both sides hold the other dead, and nothing else would ever reunite them.
    reconnect_interval: float = 30.0
    # Most news piggybacked on one packet.
    max_piggyback: int = 16

    @classmethod
    def lan(cls, **overrides: object) -> MembershipConfig:
        return replace(cls(), **overrides)  # type: ignore[arg-type]

    @classmethod
    def local(cls, **overrides: object) -> MembershipConfig:
        """One machine (loopback) and tests: fast timers, as memberlist's Local profile."""
        fast = replace(
            cls(),
            probe_interval=0.2,
            probe_timeout=0.1,
            indirect_checks=1,
            suspicion_mult=3,
            retransmit_mult=2,
            gossip_interval=0.05,
            push_pull_interval=5.0,
            reconnect_interval=2.0,
        )
        return replace(fast, **overrides)  # type: ignore[arg-type]


class MemberInfo(msgspec.Struct, frozen=True, kw_only=True):
    node: str
    address: str
    incarnation: int
    state: State
    since: float  # `now` of the last state change (the driver's clock)


_by_node = operator.attrgetter("node")


@dataclass
class _Suspicion:
    started: float
    k: int  # confirmations that bring the timeout down to min
    min: float
    max: float
    confirmed_by: set[str] = field(default_factory=set)  # who suspects, the first included

    def deadline(self) -> float:
        n = len(self.confirmed_by) - 1  # confirmations beyond the first suspicion
        if self.k <= 0:
            return self.started + self.min
        frac = math.log(n + 1) / math.log(self.k + 1)
        timeout = max(self.min, self.max - frac * (self.max - self.min))
        return self.started + timeout


@dataclass
class _Probe:
    seq: int
    target: str
    timeout_at: float  # no direct ack by then: indirect probes
    ends_at: float  # no ack at all by then: suspect
    indirect: bool = False
    expected_nacks: int = 0
    nacks: int = 0
    acked: bool = False


@dataclass
class _Relay:
    """A PingReq we serve: forward the target's ack, or send a nack in time."""

    origin_address: str
    origin_seq: int
    nack_at: float
    acked: bool = False


class Membership:
    """One member's view of the cluster. Methods take an event, return packets to send.

    Example (the driver)::

        me = Membership("n1", "tcp://10.0.0.1:4343", MembershipConfig.lan(), seed=7)
        send(me.join(["tcp://10.0.0.2:4343"], now))
        send(me.receive(address, messages, now))
        send(me.tick(now))  # at me.next_wakeup() at the latest
    """

    def __init__(
        self,
        node: str,
        address: str,
        config: MembershipConfig,
        *,
        incarnation: int = 1,
        seed: int | None = None,
        now: float = 0.0,
    ) -> None:
        self.node = node
        self.address = address
        self.config = config
        self._rng = random.Random(seed)
        self._members: dict[str, MemberInfo] = {
            node: MemberInfo(
                node=node, address=address, incarnation=incarnation, state=State.ALIVE, since=now
            )
        }
        self._broadcasts: BroadcastQueue[Message] = BroadcastQueue()
        self._suspicions: dict[str, _Suspicion] = {}
        self._probe: _Probe | None = None
        self._probe_order: list[str] = []
        self._relays: dict[int, _Relay] = {}  # {seq of our Ping: the PingReq it serves}
        self._seq = 0
        self._awareness = 0
        self._leaving = False
        self._seeds: list[str] = []  # join addresses, asked again while we know nobody
        # Members forgotten for good (the registry's ForgetOp): out of the table, and
        # news of them from members that have not heard yet is ignored.
        self._forgotten: set[str] = set()
        self.version = 0  # moves whenever the table does: who, where, state, incarnation
        self._live_cache: tuple[int, list[MemberInfo]] = (-1, [])
        self._next_probe = now + self._rng.uniform(0, config.probe_interval)
        self._next_gossip = now + config.gossip_interval
        self._next_push_pull = now + config.push_pull_interval
        self._next_reconnect = now + config.reconnect_interval

    # -- answers ----------------------------------------------------------------

    @property
    def incarnation(self) -> int:
        return self._members[self.node].incarnation

    @property
    def awareness(self) -> int:
        return self._awareness

    def members(self) -> list[MemberInfo]:
        """Everyone known, this member included, by node id."""
        return sorted(self._members.values(), key=_by_node)

    def table(self) -> tuple[MemberInfo, ...]:
        """Everyone known, in no particular order: what a node stores."""
        return tuple(self._members.values())

    def known(self) -> dict[str, MemberInfo]:
        """{node: member} of everyone known, this member included (read only)."""
        return self._members

    def state_of(self, node: str) -> State | None:
        member = self._members.get(node)
        return None if member is None else member.state

    def live_members(self) -> list[str]:
        """Members alive or suspected (not yet dead), this one included."""
        return [self.node, *(m.node for m in self.live_others())]

    def next_wakeup(self) -> float:
        """When :meth:`tick` must run next at the latest."""
        times = [self._next_probe, self._next_gossip, self._next_push_pull, self._next_reconnect]
        if self._probe is not None and not self._probe.acked:
            times.append(
                self._probe.timeout_at if not self._probe.indirect else self._probe.ends_at
            )
        times += [s.deadline() for s in self._suspicions.values()]
        times += [r.nack_at for r in self._relays.values() if not r.acked]
        return min(times)

    # -- events -----------------------------------------------------------------

    def remember(self, members: Iterable[MemberInfo], now: float) -> None:
        """Members known before a restart, as they were: the dead among them too, so
        that reconnects can find them (rule 8). Our own entry keeps this run's."""
        known = self._members  # holds our own entry: the check below skips it too
        added = 0
        for info in members:
            if info.node not in known and info.node not in self._forgotten:
                # Entries are immutable: one shared by many members (the simulator's
                # steady state of 10,000) costs one object, not 10,000.
                known[info.node] = info if info.since == now else replace_struct(info, since=now)
                added += 1
        self.version += added

    def forget(self, nodes: Iterable[str]) -> None:
        """Drop ``nodes`` from the table for good: nothing said of them brings them back
        (the node core also refuses what they send)."""
        for node in nodes:
            if node == self.node or node in self._forgotten:
                continue
            self._forgotten.add(node)
            self._suspicions.pop(node, None)
            if self._members.pop(node, None) is not None:
                self.version += 1

    def join(self, addresses: Iterable[str], now: float) -> list[Packet]:
        """Ask each known address for its table, sending ours (push/pull).

        Until some other member is known, :meth:`tick` asks again every probe interval:
        a lost packet, or a seed that starts later, does not leave us alone for good.
        """
        self._seeds = [address for address in addresses if address != self.address]
        # Our own ALIVE, gossiped like any news (memberlist's setAlive): a member that
        # joined the seed before we did learns of us from the members we reach, not
        # only from the seed's bounded retransmits or the next push/pull.
        me = self._members[self.node]
        self._broadcasts.put(self.node, Alive(self.node, self.address, me.incarnation))
        sync = self._sync(reply=True)
        return [Packet(address, (sync,)) for address in self._seeds]

    def leave(self, now: float) -> list[Packet]:
        """Say goodbye: every live member hears that we left (and gossip spreads it)."""
        self._leaving = True
        me = self._update(self.node, state=State.LEFT, since=now)
        self.version += 1
        goodbye = Dead(node=self.node, incarnation=me.incarnation, source=self.node)
        self._broadcasts.put(self.node, goodbye)
        return [Packet(m.address, (goodbye,)) for m in self._others() if m.state <= State.SUSPECT]

    def receive(self, address: str, messages: Sequence[Message], now: float) -> list[Packet]:
        out: list[Packet] = []
        accused = False
        for message in messages:
            out += self._receive_one(address, message, now)
            accused = accused or (
                type(message) in (Suspect, Dead)
                and message.node == self.node  # type: ignore[union-attr]
                and message.source != self.node  # type: ignore[union-attr]
            )
        if accused and not self._leaving:
            # Tell the accuser first, straight back: the refutation's gossip reaches each
            # member only with some probability at small N, and it holds us suspect or
            # dead until then (it does not probe the dead).
            me = self._members[self.node]
            out.append(Packet(address, (Alive(self.node, self.address, me.incarnation),)))
        return out

    def tick(self, now: float) -> list[Packet]:
        out: list[Packet] = []
        out += self._expire_suspicions(now)
        out += self._relay_nacks(now)
        out += self._advance_probe(now)
        if now >= self._next_gossip:
            self._next_gossip = now + self.config.gossip_interval
            out += self._gossip()
        if now >= self._next_push_pull:
            self._next_push_pull = now + self.config.push_pull_interval
            peer = self._random_others(1)
            if peer:
                out.append(Packet(peer[0].address, (self._sync(reply=True),)))
        if now >= self._next_reconnect:
            self._next_reconnect = now + self.config.reconnect_interval
            dead = [m for m in self._others() if m.state == State.DEAD]
            if dead and not self._leaving:
                # If it lives, our table tells it that it was held dead: it refutes.
                out.append(Packet(self._rng.choice(dead).address, (self._sync(reply=True),)))
        return out

    # -- receiving --------------------------------------------------------------

    def _receive_one(self, address: str, message: Message, now: float) -> list[Packet]:
        if isinstance(message, Ping):
            if message.target != self.node:
                return []  # meant for a former process at this address
            return [
                self._with_news(
                    address, Ack(message.seq, self.node), *self._verdict_on(message.source)
                )
            ]
        if isinstance(message, Ack):
            return self._on_ack(message, now)
        if isinstance(message, Nack):
            if self._probe is not None and message.seq == self._probe.seq:
                self._probe.nacks += 1
            return []
        if isinstance(message, PingReq):
            seq = self._next_seq()
            self._relays[seq] = _Relay(
                address, message.seq, nack_at=now + self._probe_timeout() * 0.8
            )
            ping = Ping(seq, message.target, self.node)
            return [self._with_news(message.target_address, ping)]
        if isinstance(message, Sync):
            for state in message.members:
                self._merge(state, now, from_sync=True)
            if message.reply:
                return [Packet(address, (self._sync(reply=False),))]
            return []
        self._merge(message, now, from_sync=False)
        return []

    def _on_ack(self, ack: Ack, now: float) -> list[Packet]:
        probe = self._probe
        if probe is not None and ack.seq == probe.seq and not probe.acked:
            probe.acked = True
            self._awareness = max(0, self._awareness - 1)
            return []
        relay = self._relays.pop(ack.seq, None)
        if relay is not None:
            return [Packet(relay.origin_address, (Ack(relay.origin_seq, self.node),))]
        return []

    def _merge(self, news: Message, now: float, *, from_sync: bool) -> None:
        if news.node in self._forgotten:  # type: ignore[union-attr]
            return
        if isinstance(news, Alive):
            self._on_alive(news, now)
        elif isinstance(news, Suspect):
            self._on_suspect(news, now)
        elif isinstance(news, Dead):
            if from_sync and news.source != news.node and news.node in self._members:
                # A table says "dead": we only suspect (memberlist's mergeState). Our
                # own timer, or the member's refutation, decides.
                self._on_suspect(Suspect(news.node, news.incarnation, news.source), now)
            else:
                self._on_dead(news, now)

    def _on_alive(self, news: Alive, now: float) -> None:
        if news.node == self.node:
            if news.incarnation > self.incarnation and not self._leaving:
                self._refute(news.incarnation, now)  # an old self, reborn in news
            return
        member = self._members.get(news.node)
        if member is None:
            self._members[news.node] = MemberInfo(
                node=news.node,
                address=news.address,
                incarnation=news.incarnation,
                state=State.ALIVE,
                since=now,
            )
            self.version += 1
            self._broadcasts.put(news.node, news)
            return
        if news.incarnation <= member.incarnation:
            return  # stale, or nothing new: ALIVE never undoes a suspicion at its incarnation
        self.version += 1
        if member.state != State.ALIVE:
            self._update(
                news.node,
                incarnation=news.incarnation,
                address=news.address,
                state=State.ALIVE,
                since=now,
            )
        else:
            self._update(news.node, incarnation=news.incarnation, address=news.address)
        self._suspicions.pop(news.node, None)
        self._broadcasts.put(news.node, news)

    def _on_suspect(self, news: Suspect, now: float) -> None:
        if news.node == self.node:
            self._about_me(news.incarnation, now)
            return
        member = self._members.get(news.node)
        if member is None or news.incarnation < member.incarnation:
            return
        if member.state >= State.DEAD:
            return  # only ALIVE news at a higher incarnation brings the dead back
        suspicion = self._suspicions.get(news.node)
        if (
            member.state == State.SUSPECT
            and news.incarnation == member.incarnation
            and suspicion is not None
        ):
            # An independent confirmation (ours too, when our own probe fails after we
            # heard of the suspicion) shortens the timeout, and spreads.
            if news.source not in suspicion.confirmed_by:
                suspicion.confirmed_by.add(news.source)
                self._broadcasts.put(news.node, news)
            return
        self.version += 1
        self._update(news.node, incarnation=news.incarnation, state=State.SUSPECT, since=now)
        self._start_suspicion(news.node, news.source, now)
        self._broadcasts.put(news.node, news)

    def _on_dead(self, news: Dead, now: float) -> None:
        if news.node == self.node:
            self._about_me(news.incarnation, now)
            return
        member = self._members.get(news.node)
        if member is None and news.address and news.source != news.node:
            # A member we never met, dead in someone's table: remember it, so a reconnect
            # can find it alive again after a partition (rule 8).
            self._members[news.node] = MemberInfo(
                node=news.node,
                address=news.address,
                incarnation=news.incarnation,
                state=State.DEAD,
                since=now,
            )
            self.version += 1
            return
        if member is None or news.incarnation < member.incarnation:
            return  # stale news, or a stranger's goodbye
        state = State.LEFT if news.source == news.node else State.DEAD
        if member.state >= State.DEAD and news.incarnation == member.incarnation:
            return
        self.version += 1
        self._update(news.node, incarnation=news.incarnation, state=state, since=now)
        self._suspicions.pop(news.node, None)
        self._broadcasts.put(news.node, news)

    def _about_me(self, incarnation: int, now: float) -> None:
        """Someone says we are suspect or dead: refute, or repeat that we live."""
        if self._leaving:
            return
        if incarnation >= self.incarnation:
            self._refute(incarnation, now)
        else:
            # Old news still travels: someone missed our refutation. Say it again
            # rather than wait for anti-entropy (found by the simulator: a member held
            # dead at an old incarnation until the next push/pull).
            me = self._members[self.node]
            self._broadcasts.put(self.node, Alive(self.node, self.address, me.incarnation))

    def _refute(self, incarnation: int, now: float) -> None:
        me = self._update(self.node, incarnation=incarnation + 1)
        self.version += 1
        self._broadcasts.put(self.node, Alive(self.node, self.address, me.incarnation))
        # Suspected ourselves: we may be the slow one (Lifeguard).
        self._awareness = min(self._awareness + 1, self.config.awareness_max_multiplier - 1)

    def _start_suspicion(self, node: str, source: str, now: float) -> None:
        n = len(self.live_members())
        minimum = (
            self.config.suspicion_mult
            * max(1.0, math.log10(max(n, 1)))
            * self.config.probe_interval
        )
        k = self.config.suspicion_mult - 2
        if n - 2 < k:
            k = 0
        self._suspicions[node] = _Suspicion(
            started=now,
            k=k,
            min=minimum,
            max=minimum * self.config.suspicion_max_timeout_mult,
            confirmed_by={source},
        )

    # -- timers -----------------------------------------------------------------

    def _expire_suspicions(self, now: float) -> list[Packet]:
        for node, suspicion in list(self._suspicions.items()):
            if now >= suspicion.deadline():
                member = self._members[node]
                del self._suspicions[node]
                if member.state == State.SUSPECT:
                    self._on_dead(Dead(node, member.incarnation, self.node), now)
        return []

    def _relay_nacks(self, now: float) -> list[Packet]:
        out: list[Packet] = []
        for seq, relay in list(self._relays.items()):
            if not relay.acked and now >= relay.nack_at:
                relay.acked = True  # answered: with a nack
                out.append(Packet(relay.origin_address, (Nack(relay.origin_seq, self.node),)))
            if now >= relay.nack_at + self.config.probe_interval:
                del self._relays[seq]
        return out

    def _advance_probe(self, now: float) -> list[Packet]:
        out: list[Packet] = []
        probe = self._probe
        if probe is not None and not probe.acked:
            if not probe.indirect and now >= probe.timeout_at:
                probe.indirect = True
                out += self._indirect_probes(probe)
            if now >= probe.ends_at:
                self._probe_failed(probe, now)
                self._probe = None
        if now >= self._next_probe and not self._leaving:
            if self._probe is not None and not self._probe.acked:
                self._probe_failed(self._probe, now)
            self._probe = None
            multiplier = self._awareness + 1
            self._next_probe = now + self.config.probe_interval * multiplier
            if self._seeds and len(self.live_members()) == 1:
                sync = self._sync(reply=True)
                out += [Packet(address, (sync,)) for address in self._seeds]
            target = self._next_target()
            if target is not None:
                seq = self._next_seq()
                self._probe = _Probe(
                    seq,
                    target.node,
                    timeout_at=now + self._probe_timeout(),
                    ends_at=now + self.config.probe_interval * multiplier,
                )
                ping: list[Message] = [Ping(seq, target.node, self.node)]
                if target.state == State.SUSPECT:  # rule 7: let it refute at once
                    ping.append(Suspect(target.node, target.incarnation, self.node))
                out.append(self._with_news(target.address, *ping))
        return out

    def _indirect_probes(self, probe: _Probe) -> list[Packet]:
        target = self._members.get(probe.target)
        if target is None:
            return []
        helpers = [
            m for m in self._random_others(self.config.indirect_checks + 1) if m.node != target.node
        ]
        helpers = helpers[: self.config.indirect_checks]
        probe.expected_nacks = len(helpers)
        request = PingReq(probe.seq, target.node, target.address, self.node)
        return [Packet(helper.address, (request,)) for helper in helpers]

    def _probe_failed(self, probe: _Probe, now: float) -> None:
        if probe.expected_nacks and probe.nacks < probe.expected_nacks:
            # Helpers did not even answer with a nack: the trouble may be ours (Lifeguard).
            self._awareness = min(
                self._awareness + (probe.expected_nacks - probe.nacks),
                self.config.awareness_max_multiplier - 1,
            )
        member = self._members.get(probe.target)
        if member is not None and member.state <= State.SUSPECT:
            # Already suspected by others: our failed probe is a confirmation.
            self._on_suspect(Suspect(member.node, member.incarnation, self.node), now)

    def _next_target(self) -> MemberInfo | None:
        for _ in range(2):
            while self._probe_order:
                node = self._probe_order.pop()
                member = self._members.get(node)
                if member is not None and member.state <= State.SUSPECT:
                    return member
            # A new round over a fresh shuffle, as memberlist does: every member is
            # probed once per round, in an order nobody can predict.
            self._probe_order = [m.node for m in self._others() if m.state <= State.SUSPECT]
            self._rng.shuffle(self._probe_order)
        return None

    def _gossip(self) -> list[Packet]:
        if not len(self._broadcasts):
            return []
        out: list[Packet] = []
        for member in self._random_others(self.config.gossip_nodes):
            news = self._take_news()
            if news:
                out.append(Packet(member.address, tuple(news)))
        return out

    # -- helpers ----------------------------------------------------------------

    def _verdict_on(self, node: str) -> tuple[Message, ...]:
        """What we hold against ``node``, for its own ears: a member that probes us while
        we hold it suspect or dead (one paused past its suspicion, then resumed) learns
        it from our ack and refutes at once, rather than when the news or a reconnect
        happens to reach it (up to a reconnect interval later), as Lifeguard's buddy
        system tells a suspect first."""
        member = self._members.get(node)
        if member is None or member.state == State.ALIVE or member.state == State.LEFT:
            return ()
        if member.state == State.SUSPECT:
            return (Suspect(node, member.incarnation, self.node),)
        return (Dead(node, member.incarnation, self.node, member.address),)

    def _with_news(self, address: str, *messages: Message) -> Packet:
        return Packet(address, (*messages, *self._take_news()))

    def _take_news(self) -> list[Message]:
        return self._broadcasts.take(
            self.config.max_piggyback,
            members=len(self._members),
            retransmit_mult=self.config.retransmit_mult,
        )

    def _sync(self, *, reply: bool) -> Sync:
        table: list[Alive | Suspect | Dead] = []
        for m in self._members.values():
            if m.state == State.ALIVE:
                table.append(Alive(m.node, m.address, m.incarnation))
            elif m.state == State.SUSPECT:
                table.append(Suspect(m.node, m.incarnation, self.node))
            else:
                source = m.node if m.state == State.LEFT else self.node
                table.append(Dead(m.node, m.incarnation, source, m.address))
        return Sync(self.node, table, reply)

    def _update(self, node: str, **changes: object) -> MemberInfo:
        """Replace ``node``'s entry (entries are immutable, so they can be shared)."""
        member = self._members[node] = replace_struct(self._members[node], **changes)
        return member

    def _others(self) -> list[MemberInfo]:
        return [m for m in self._members.values() if m.node != self.node]

    def _random_others(self, count: int) -> list[MemberInfo]:
        """Up to ``count`` random members, alive or suspected: who hears news and syncs.

        (A member wrongly declared dead still syncs with us, as it thinks us alive, and
        learns of its death from our table: then it refutes.)
        """
        pool = self.live_others()
        return self._rng.sample(pool, min(count, len(pool)))

    def live_others(self) -> list[MemberInfo]:
        """Members other than us, alive or suspected; rebuilt only when the table moves."""
        version, cached = self._live_cache
        if version != self.version:
            me = self.node
            cached = [
                m for m in self._members.values() if m.state <= State.SUSPECT and m.node != me
            ]
            self._live_cache = (self.version, cached)
        return cached

    def _probe_timeout(self) -> float:
        return self.config.probe_timeout * (self._awareness + 1)

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq
