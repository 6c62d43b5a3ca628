"""Break a real cluster on purpose, then prove nothing was lost (issue 12).

``python -m cluster.chaos --minutes 10 --seed 7`` (``nox -s chaos -- ...``): a 5-node
loopback cluster, 3 writer and 3 caller processes, a nemesis, then a final heal and a
checker. It prints a report and writes ``report.json`` in the run directory; it exits 1 if
the checker found a violation. The same seed replays the same fault schedule.

Why it is built this way:

- **Real processes, each with its own history.** Nodes are ``LocalNode`` processes.
  Writers (publish, set publish, rollback, vaporize) and callers are separate processes,
  each a client of a random member per operation, as users are. Each logs every operation
  in Jepsen's model, one JSON line per event: ``invoke``, then ``ok`` (it happened),
  ``fail`` (it certainly did not: the node refused it) or ``info`` (unknown: a timeout, a
  dead node). The checker treats ``info`` as maybe-applied. Times are ``CLOCK_MONOTONIC``,
  one clock for every process of the machine, plus the wall clock to match a change's
  ``at`` (set by its origin node on the same machine).
- **Side effects recorded by the functions.** Every version's body is built around a
  unique marker and appends ``token name marker pid`` to one file (``O_APPEND``, one
  ``write`` per line: atomic for lines this short) each time it runs, as Jepsen records
  side effects. Every call carries a unique token, so "no call ran twice" and "ran a
  version that existed under that name and number" are read off that file, whatever the
  callers saw.
- **Faults, all with PIDs or rules this run made.** SIGKILL and a restart from the data
  directory; SIGSTOP and SIGCONT. Network faults with nftables: every node starts in its
  own cgroup v2, and rules in this run's own table match a node's sockets by that cgroup
  (``socket cgroupv2``) and the peer's TCP port, so node-to-node traffic is cut or thinned
  while clients still reach every node (as in Jepsen, the clients are not partitioned).
  Shapes: one node cut off, a majority/minority split, a ring of overlapping majorities
  (each node sees only its two ring neighbours), and a minority cut off with one of it
  killed and restarted while still cut off (``kill-in-partition``); loss drops a share
  of node-to-node packets (``numgen random``; over TCP this is retransmission delay,
  never a lost message). Clock jumps (``clock-jump``): the last node starts with
  libfaketime preloaded (``cluster/faketime.py``) and an offset file, so the nemesis
  moves its wall clock (``time.time()``; its monotonic clock stays real) forward by hours
  for half the fault, back by hours for the other half, then heals it to +0; the node
  stamps its changes' ``at`` with it. Only that node carries libfaketime: it makes every
  process it is loaded in several times slower (its clock reads contend on a lock across
  the node's threads: 100 status and publish requests took 3.9 s with it, 0.36 s
  without, and 28,771 futex calls against 442), and with it in every node the nodes'
  loops stood still for 0.1-1.8 s at a time (a slow-event line per second in every
  node's log; none without it), which the convergence times measured. The checker reads ``at`` through
  the offsets it logged, and checks that every function's current version is the one
  its last change in the total order made, counting those made with a jumped clock (a
  registry ordering by wall clock would let a change made hours ahead win, and one made
  hours behind lose). Where libfaketime cannot load (not Linux, not installed) the
  fault is skipped and the report says why.
- **Delay and reordering** (``delay-one``: both directions of one node's links;
  ``delay-all``: every link), without ``tc netem`` (missing from this kernel): a relay
  of the fault's own (``cluster/delay_proxy.py``, a Trio loop in a thread of this
  process, outside every node's cgroup) and nftables NAT rules in this run's table
  (``type nat hook output``) that redirect a node's *new* connections to a peer's port
  to it; the relay reads the original destination (``SO_ORIGINAL_DST``) and connects
  there itself. ``ss -K`` then ends the node's open peer connections (both ends), so
  ZeroMQ reconnects through the relay. Every chunk is held a random time drawn from the
  fault's range, each direction apart, never released before the chunk read before it:
  what is *delayed* is every byte between the nodes named; what gets *reordered* is
  messages on different connections (a node has one connection to each peer it sends
  to, carrying SWIM gossip, pushed changes and digests, so one sent later to B may
  arrive before one sent earlier to C, and a change gossiped on by B may reach C before
  the push it depends on); what is *not* reordered is bytes within one connection (TCP
  keeps them in order on any network; breaking it would only break ZMTP/CURVE framing).
  Clients are neither redirected nor delayed. The heal stops the relay first (it writes
  on what it holds and closes its connections), then deletes the redirects, and the
  nodes reconnect directly (what was still in a sender's kernel buffers is lost, as on
  any reset connection); in the other order the closes never reach the nodes
  (``Network.heal`` says why), and the rig checks that no node connection is left with
  one end. The report counts what the relays carried. Without NAT in nftables or a
  working ``ss -K``, these faults are skipped and the report says why.
- **Replayable.** The schedule (what, whom, when, for how long) is drawn from
  ``Random(seed)`` before the run and printed; the clients draw their operations from
  the seed too (their outcomes, of course, depend on timing).
- **The checker joins three sources**: the histories, the executions file, and each
  node's persisted change log (read after the nodes stop, with the node's own store
  class), plus live reads (status, functions, versions) after the heal. The change log is
  the ground truth of the one total order; every check is stated in ``check()``.
- **Convergence** is the time from the end of the final heal (rules gone, everyone
  resumed, killed nodes restarted and listening) until every node reports the same
  replica hash and nothing pending; the bound is 2 anti-entropy intervals (2 s).
"""

from __future__ import annotations

import argparse
import atexit
import concurrent.futures
import contextlib
import dataclasses
import functools
import json
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cluster.delay_proxy import DelayProxy, RelayCounts
from cluster.faketime import faketime_env, faketime_unavailable, set_offset
from cluster.launch import LocalCluster, LocalNode, free_port, kill_if_alive

FUNCTIONS = ("f0", "f1", "f2", "f3")  # plain functions the writers share
SET_NAME = "s0"
SET_MEMBERS = ("s0_a", "s0_b")
CALLABLE = FUNCTIONS + SET_MEMBERS
CALL_TIMEOUT = 2.0  # seconds: a call to a frozen worker's node still ends soon
ANTI_ENTROPY_INTERVAL = 1.0  # NodeConfig.anti_entropy_interval
CONVERGENCE_BOUND = 2 * ANTI_ENTROPY_INTERVAL
CGROUP2_ROOT = Path("/sys/fs/cgroup/unified")  # this machine's cgroup2 mount
NFT_PATH_ROOT = Path("/sys/fs/cgroup")  # nft names a cgroup relative to this

PROCESS_FAULTS = ("kill", "pause")
NETWORK_FAULTS = (
    "partition-one",
    "partition-halves",
    "partition-ring",
    "loss",
    "kill-in-partition",
)
CLOCK_FAULTS = ("clock-jump",)
# A clock jump moves one node's wall clock forward by one of these, then back by one.
CLOCK_FORWARD = (3600, 3 * 3600, 86400)
CLOCK_BACK = (-3600, -3 * 3600, -86400)
# Through the delay proxy (cluster/delay_proxy.py): every chunk held for a time drawn
# from one of these ranges (ms). One node's links: a slow node, from about the local
# profile's probe timeout (100 ms) to several of its probe intervals (200 ms). All
# links: messages on different connections overtake each other.
DELAY_FAULTS = ("delay-one", "delay-all")
DELAY_ONE_MS = ((50, 100), (200, 400), (800, 1200))
DELAY_ALL_MS = ((0, 50), (0, 200), (50, 500))
NOT_INJECTED = {
    "reordering within a connection": "TCP delivers a connection's bytes in order on any "
    "network; the delay proxy reorders messages across connections only",
}


# ---------------------------------------------------------------------------
# The schedule: drawn from the seed alone, before anything starts.
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Fault:
    at: float  # seconds after the chaos starts
    kind: str
    nodes: tuple[int, ...]  # the victims; for partitions, the side cut off (or the ring)
    duration: float
    loss_percent: int = 0
    offsets: tuple[int, ...] = ()  # clock-jump: seconds forward, then back (then +0)
    delay_ms: tuple[int, ...] = ()  # delay-*: each chunk held between these (low, high)

    def describe(self) -> str:
        extra = f" {self.loss_percent}%" if self.kind == "loss" else ""
        if self.kind == "clock-jump":
            extra = " " + " then ".join(f"{o / 3600:+g}h" for o in self.offsets)
        if self.kind in DELAY_FAULTS:
            extra = f" {self.delay_ms[0]}-{self.delay_ms[1]}ms"
        nodes = list(self.nodes)
        return f"t={self.at:6.1f}s {self.kind}{extra} nodes={nodes} for {self.duration:.1f}s"


def skewable(nodes: int) -> int:
    """The one node whose wall clock the nemesis moves (the module docstring says why one)."""
    return nodes - 1


def fault_schedule(
    seed: int, seconds: float, nodes: int, kinds: Iterable[str], interval: float
) -> list[Fault]:
    """One fault per ``interval`` on average: active 40-70% of its slot, then quiet."""
    rng = random.Random(f"schedule-{seed}")
    kinds = sorted(kinds)
    schedule: list[Fault] = []
    t = rng.uniform(0.5, 1.5)
    while True:
        slot = interval * rng.uniform(0.7, 1.3)
        duration = round(slot * rng.uniform(0.4, 0.7), 2)
        if t + duration > seconds:
            if schedule:  # the last one lasts until the final heal
                last = schedule[-1]
                schedule[-1] = dataclasses.replace(last, duration=round(seconds - last.at, 2))
            return schedule
        kind = rng.choice(kinds)
        members = list(range(nodes))
        loss = 0
        offsets: tuple[int, ...] = ()
        delay: tuple[int, ...] = ()
        if kind in ("kill", "pause", "partition-one"):
            victims: tuple[int, ...] = (rng.choice(members),)
        elif kind == "clock-jump":
            rng.choice(members)  # drawn still: the rest of a seed's schedule stays as it was
            victims = (skewable(nodes),)
            offsets = (rng.choice(CLOCK_FORWARD), rng.choice(CLOCK_BACK))
        elif kind == "delay-one":
            victims = (rng.choice(members),)
            delay = rng.choice(DELAY_ONE_MS)
        elif kind == "delay-all":
            victims = tuple(members)
            delay = rng.choice(DELAY_ALL_MS)
        elif kind in ("partition-halves", "kill-in-partition"):
            rng.shuffle(members)
            victims = tuple(sorted(members[: (nodes - 1) // 2]))  # the minority
        elif kind == "partition-ring":
            rng.shuffle(members)
            victims = tuple(members)  # the ring's order
        else:  # loss, between all nodes
            victims = tuple(members)
            loss = rng.choice((10, 30, 50))
        schedule.append(Fault(round(t, 2), kind, victims, duration, loss, offsets, delay))
        t += slot


def cut_pairs(fault: Fault, nodes: int) -> set[tuple[int, int]]:
    """The (from, to) node pairs a partition cuts: both directions of each cut link."""
    everyone = range(nodes)
    if fault.kind in ("partition-one", "partition-halves", "kill-in-partition"):
        inside = set(fault.nodes)
        return {(a, b) for a in everyone for b in everyone if (a in inside) != (b in inside)}
    if fault.kind == "partition-ring":
        ring = fault.nodes
        neighbours = {
            (ring[i], ring[(i + d) % len(ring)]) for i in range(len(ring)) for d in (1, -1)
        }
        return {(a, b) for a in everyone for b in everyone if a != b and (a, b) not in neighbours}
    return set()


def delayed_pairs(fault: Fault, nodes: int) -> set[tuple[int, int]]:
    """The (from, to) node pairs whose connections a delay fault sends through the proxy:
    for one node, both directions of each of its links (each direction is a connection
    of its own, from the sender's DEALER to the receiver's port)."""
    everyone = range(nodes)
    if fault.kind == "delay-one":
        (slow,) = fault.nodes
        return {(a, b) for a in everyone for b in everyone if a != b and slow in (a, b)}
    if fault.kind == "delay-all":
        return {(a, b) for a in everyone for b in everyone if a != b}
    return set()


# ---------------------------------------------------------------------------
# History: one JSON line per event, per process.
# ---------------------------------------------------------------------------


class History:
    def __init__(self, path: Path, process: str) -> None:
        self.process = process
        self._file = open(path, "a", buffering=1)  # noqa: SIM115 - one per process lifetime

    def log(self, type_: str, f: str, value: dict[str, Any], **extra: Any) -> None:
        entry = {
            "process": self.process,
            "type": type_,
            "f": f,
            "value": value,
            "time": time.monotonic(),
            "wall": time.time(),
            **extra,
        }
        self._file.write(json.dumps(entry) + "\n")

    def close(self) -> None:
        self._file.close()


def read_histories(run_dir: Path) -> list[dict[str, Any]]:
    events = []
    for path in sorted((run_dir / "history").glob("*.jsonl")):
        for line in path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):  # a process killed mid-line
                events.append(json.loads(line))
    events.sort(key=lambda e: e["time"])
    return events


def pair_operations(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each invoke with its completion: {process, f, value, start, end, type, ...}."""
    open_ops: dict[str, dict[str, Any]] = {}
    operations = []
    for event in events:
        if event["process"] == "nemesis":
            continue
        if event["type"] == "invoke":
            op = {
                "process": event["process"],
                "f": event["f"],
                "node": event.get("node"),
                "value": dict(event["value"]),
                "start": event["time"],
                "start_wall": event["wall"],
                "type": "info",  # no completion logged: the process died or stopped
                "end": None,
                "end_wall": None,
                "error": "",
            }
            open_ops[event["process"]] = op
            operations.append(op)
            continue
        op = open_ops.pop(event["process"], None)
        if op is None:
            continue
        op["type"] = event["type"]
        op["end"] = event["time"]
        op["end_wall"] = event["wall"]
        op["value"].update(event["value"])
        op["error"] = event.get("error", "")
    return operations


# ---------------------------------------------------------------------------
# The clients: writer and caller processes.
# ---------------------------------------------------------------------------


def make_body(name: str, marker: str, executions: str, *, wide: bool = False) -> Callable[..., str]:
    """A version of ``name`` that records each run of it, and answers its marker.

    ``wide`` adds an optional parameter: another signature, so callers holding the old one
    get ``SignatureChanged`` and refresh. A token ending in 7 makes the call last 0.3 s, so
    some calls are running when their node is killed or frozen.
    """

    def record_run(token: str) -> str:
        import os
        import time

        if token.endswith("7"):
            time.sleep(0.3)
        fd = os.open(executions, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            # CLOCK_MONOTONIC is one clock for every process here, the callers' too.
            os.write(fd, f"{token} {name} {marker} {os.getpid()} {time.monotonic():.6f}\n".encode())
        finally:
            os.close(fd)
        return marker

    def body(token: str) -> str:
        return record_run(token)

    def wide_body(token: str, extra: int = 0) -> str:
        return record_run(token)

    chosen = wide_body if wide else body
    chosen.__name__ = chosen.__qualname__ = name
    return chosen


def classify(exc: BaseException) -> str:
    """``fail`` when the error says nothing happened, else ``info`` (maybe it did)."""
    import scatter

    certain = (
        scatter.FunctionNotFound,
        scatter.VersionNotFound,
        scatter.SignatureChanged,
        scatter.AuthenticationError,
        scatter.ConfigError,
        scatter.NotScatterable,
    )
    if isinstance(exc, certain):
        return "fail"
    if isinstance(exc, scatter.ValidationError) and exc.parameter != "return":
        return "fail"  # an argument refused before the function ran (a result: after)
    # Everything else may have run: a timeout, a crash, silence, or (never ours) the
    # function raising, which means it ran.
    return "info"


def error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]


class Clients:
    """One scatter.Client per node address, replaced after an error of unknown outcome
    (as a Jepsen client reopens its connection): the rig measures the cluster, not how
    long one broken connection takes to notice."""

    def __init__(self, addresses: list[str]) -> None:
        self.addresses = addresses
        self._clients: dict[int, Any] = {}
        self.callables: dict[tuple[int, str, int | None], Any] = {}

    def get(self, node: int) -> Any:
        import scatter

        if node not in self._clients:
            self._clients[node] = scatter.Client(self.addresses[node], autostart=False)
        return self._clients[node]

    def drop(self, node: int) -> None:
        client = self._clients.pop(node, None)
        for key in [k for k in self.callables if k[0] == node]:
            del self.callables[key]
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()

    def close(self) -> None:
        for node in list(self._clients):
            self.drop(node)


def run_writer(
    process: str, run_dir: Path, addresses: list[str], seed: int, stop_at: float
) -> None:
    rng = random.Random(f"{process}-{seed}")
    history = History(run_dir / "history" / f"{process}.jsonl", process)
    executions = str(run_dir / "executions.log")
    clients = Clients(addresses)
    sequence = 0
    try:
        while time.monotonic() < stop_at:
            sequence += 1
            node = rng.randrange(len(addresses))
            roll = rng.random()
            if roll < 0.5:
                f, name = "publish", rng.choice(FUNCTIONS)
            elif roll < 0.62:
                f, name = "publish_set", SET_NAME
            elif roll < 0.9:
                f, name = "rollback", rng.choice((*FUNCTIONS, SET_NAME))
            else:
                f, name = "vaporize", rng.choice((*FUNCTIONS, SET_NAME))
            marker = f"<{process}.{sequence}>"
            value: dict[str, Any] = {"name": name}
            if f == "publish":
                value["marker"] = marker
                value["wide"] = rng.random() < 0.2  # another signature
            elif f == "publish_set":
                value["markers"] = {m: f"<{process}.{sequence}.{m}>" for m in SET_MEMBERS}
            history.log("invoke", f, value, node=node)
            try:
                client = clients.get(node)
                if f == "publish":
                    body = make_body(name, marker, executions, wide=value["wide"])
                    published = client.publish(body, name=name)
                    result = {
                        "version": published.version,
                        "content_id": published.content_id,
                        "noop": published.unchanged,
                    }
                elif f == "publish_set":
                    members = [
                        (make_body(m, value["markers"][m], executions), m, None)
                        for m in SET_MEMBERS
                    ]
                    result = {"version": client.publish_set(name, members).version}
                elif f == "rollback":
                    result = {"version": client.rollback(name)}
                else:
                    client.vaporize(name)
                    result = {}
                # A client fails over to another member when its node is down (before the
                # request was delivered): the change is that member's.
                result["acked_by"] = addresses.index(client.address_in_use)
                history.log("ok", f, result)
            except Exception as exc:  # every outcome is history
                outcome = classify(exc)
                history.log(outcome, f, {}, error=error_text(exc))
                if outcome == "info":
                    clients.drop(node)
            time.sleep(rng.uniform(0.1, 0.5))
    finally:
        clients.close()
        history.close()


def run_caller(
    process: str, run_dir: Path, addresses: list[str], seed: int, stop_at: float
) -> None:
    rng = random.Random(f"{process}-{seed}")
    history = History(run_dir / "history" / f"{process}.jsonl", process)
    clients = Clients(addresses)
    highest: dict[str, int] = defaultdict(lambda: 1)  # versions seen, to pin within
    sequence = 0
    try:
        while time.monotonic() < stop_at:
            sequence += 1
            node = rng.randrange(len(addresses))
            name = rng.choice(CALLABLE)
            # Pins near the newest version seen: older ones are mostly vaporized.
            pin = (
                rng.randint(max(1, highest[name] - 3), highest[name])
                if rng.random() < 0.25
                else None
            )
            token = f"{process}.{sequence}"
            history.log("invoke", "call", {"name": name, "pin": pin, "token": token}, node=node)
            try:
                key = (node, name, pin)
                if key not in clients.callables:
                    clients.callables[key] = clients.get(node).make_callable(name, pin)
                remote = clients.callables[key]
                marker = remote.call(token, timeout=CALL_TIMEOUT)
                highest[name] = max(highest[name], remote.version)
                history.log("ok", "call", {"marker": marker, "version": remote.version})
            except Exception as exc:  # every outcome is history
                outcome = classify(exc)
                history.log(outcome, "call", {}, error=error_text(exc))
                clients.callables.pop((node, name, pin), None)
                if outcome == "info":
                    clients.drop(node)
            time.sleep(rng.uniform(0.02, 0.1))
    finally:
        clients.close()
        history.close()


# ---------------------------------------------------------------------------
# The nemesis: nftables, cgroups and signals, all undone at the end.
# ---------------------------------------------------------------------------


def network_faults_unavailable() -> str:
    """Why nftables faults cannot run here ("" when they can)."""
    if os.geteuid() != 0:
        return "not root: nftables rules need root"
    if shutil.which("nft") is None:
        return "nft is missing (apt-get install nftables)"
    if not (CGROUP2_ROOT / "cgroup.procs").exists():
        return f"no cgroup v2 hierarchy at {CGROUP2_ROOT} to tell nodes' sockets apart"
    return ""


@functools.cache
def delay_faults_unavailable() -> str:
    """Why delay faults cannot run here ("" when they can): they need what the other
    network faults need, NAT in nftables (to redirect connections to the proxy), and
    ``ss -K`` (to end the connections opened before the redirect)."""
    why = network_faults_unavailable()
    if why:
        return why
    probe = f"scatter_chaos_probe_{os.getpid()}"
    made = subprocess.run(
        ["nft", "-f", "-"],
        input=(
            f"add table inet {probe}\n"
            f"add chain inet {probe} nat_out {{ type nat hook output priority -100; }}\n"
        ).encode(),
        capture_output=True,
        timeout=10,
    )
    subprocess.run(["nft", "delete", "table", "inet", probe], capture_output=True, timeout=10)
    if made.returncode:
        return f"no NAT in nftables here: {made.stderr.decode(errors='replace').strip()}"
    if shutil.which("ss") is None:
        return "ss is missing (apt-get install iproute2): connections could not be moved"
    if not _ss_kill_works():
        return "ss -K ends no socket here (a kernel without CONFIG_INET_DIAG_DESTROY)"
    return ""


def _ss_kill_works() -> bool:
    """Whether ``ss -K`` really ends a TCP connection: one of our own, on loopback."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)) as near:
            far, _ = listener.accept()
            with far:
                near_port = near.getsockname()[1]
                subprocess.run(
                    ["ss", "-K", "-tn", f"sport = :{near_port} and dport = :{port}"],
                    capture_output=True,
                    timeout=10,
                )
                far.settimeout(2)
                try:
                    return far.recv(1) == b""
                except OSError:
                    return True  # reset: ended
                except TimeoutError:
                    return False


class Network:
    """This run's nftables table and cgroups. Deleted in ``close``, also at exit.

    ``redirects`` adds a NAT chain for the delay faults: at output, before the filter
    chain, so a redirected connection's packets carry the proxy's port by the time the
    filter rules look (a partition's rules never see them).
    """

    def __init__(self, nodes: int, *, redirects: bool = False) -> None:
        self.name = f"scatter_chaos_{os.getpid()}"
        self.root = CGROUP2_ROOT / self.name
        self.cgroups = [self.root / f"node{i}" for i in range(nodes)]
        self.redirects = redirects
        self._closed = False
        for cgroup in self.cgroups:
            cgroup.mkdir(parents=True, exist_ok=True)
        atexit.register(self.close)
        self._nft(
            f"add table inet {self.name}\n"
            f"add chain inet {self.name} out "
            "{ type filter hook output priority 0; policy accept; }\n"
            + (
                f"add chain inet {self.name} nat_out "
                "{ type nat hook output priority -100; policy accept; }\n"
                if redirects
                else ""
            )
        )

    def _nft(self, script: str) -> None:
        subprocess.run(["nft", "-f", "-"], input=script.encode(), check=True, timeout=10)

    def _cgroup_match(self, node: int | None) -> str:
        path = (self.root if node is None else self.cgroups[node]).relative_to(NFT_PATH_ROOT)
        level = 1 if node is None else 2
        return f'socket cgroupv2 level {level} "{path}"'

    def cut(self, pairs: set[tuple[int, int]], ports: list[int]) -> None:
        rules = [
            f"add rule inet {self.name} out {self._cgroup_match(a)} tcp dport {ports[b]} drop"
            for a, b in sorted(pairs)
        ]
        self._nft("\n".join(rules) + "\n")

    def lose(self, percent: int, ports: list[int]) -> None:
        port_set = ", ".join(str(p) for p in ports)
        self._nft(
            f"add rule inet {self.name} out {self._cgroup_match(None)} "
            f"tcp dport {{ {port_set} }} numgen random mod 100 < {percent} drop\n"
        )

    def redirect(self, pairs: set[tuple[int, int]], ports: list[int], proxy_port: int) -> None:
        """New connections from node a to node b's port go to the proxy instead. Only
        new ones: conntrack NATs a connection as its first packet says (see
        ``reset_connections``). The proxy's own connections to b come from outside
        every node's cgroup, so they go straight to b."""
        assert self.redirects, "a Network made without redirects=True"
        rules = [
            f"add rule inet {self.name} nat_out {self._cgroup_match(a)} "
            f"tcp dport {ports[b]} redirect to :{proxy_port}"
            for a, b in sorted(pairs)
        ]
        self._nft("\n".join(rules) + "\n")

    def reset_connections(self, pairs: set[tuple[int, int]], ports: list[int]) -> None:
        """End node a's open connections to node b's port (both ends: ``ss -K`` resets
        the peer too), so that ZeroMQ reconnects, and the new connection follows the
        rules now in place. A node keeps its peer connections for its whole life:
        without this, a redirect would catch only members that join later."""
        by_source: dict[int, list[int]] = defaultdict(list)
        for a, b in pairs:
            by_source[a].append(ports[b])
        for a, peer_ports in sorted(by_source.items()):
            cgroup = "/" + str(self.cgroups[a].relative_to(CGROUP2_ROOT))
            ports_filter = " or ".join(f"dport = :{port}" for port in sorted(peer_ports))
            subprocess.run(
                ["ss", "-K", "-tn", f"cgroup {cgroup} and ( {ports_filter} )"],
                capture_output=True,
                check=True,
                timeout=10,
            )

    def heal(self, proxy: DelayProxy | None = None) -> RelayCounts | None:
        """Every rule gone; a delay fault's ``proxy`` stopped first (its counts returned).

        First, while its redirects still stand: they are the only rules here that need
        connection tracking, and with the last of them gone the kernel stops tracking
        (a fresh loopback connection gets conntrack entries while a redirect exists,
        none after the flush). Packets of a connection already redirected then go
        untranslated: the relay's close leaves from the relay's port, matches no node
        socket, and the node's end stays ESTABLISHED with no other end. A node in the
        middle of a CURVE handshake sends nothing while it waits for its peer's next
        step, so it never finds out: libzmq gives up after its handshake interval
        (ZMQ_HANDSHAKE_IVL, 30 s), and the slow node stayed cut off that long after its
        fault began (17-25 s after the heal in the chaos runs). Stopped first, the
        relay's closes reach the nodes; their reconnects meet the closed relay port
        (refused; ZeroMQ retries within 100-200 ms) until the flush lets them through.
        """
        try:
            counts = proxy.stop() if proxy is not None else None
        finally:
            self._nft(
                f"flush chain inet {self.name} out\n"
                + (f"flush chain inet {self.name} nat_out\n" if self.redirects else "")
            )
        return counts

    def half_open(self, ports: list[int], host: str = "127.0.0.1") -> list[str]:
        """Node connections with one end: an established socket to a node's port that
        no socket answers to (what a redirect leaves when its relay's close is lost).
        Outside a delay fault there are none (a connection being opened right now may
        show for a moment: ask twice)."""
        listing = subprocess.run(
            ["ss", "-tanH"], capture_output=True, text=True, check=True, timeout=10
        ).stdout
        nodes = {f"{host}:{port}" for port in ports}
        ends: set[tuple[str, str]] = set()
        established: list[tuple[str, str]] = []
        for line in listing.splitlines():
            fields = line.split()
            if len(fields) < 5:
                continue
            state, local, peer = fields[0], fields[3], fields[4]
            ends.add((local, peer))
            if state == "ESTAB" and peer in nodes:
                established.append((local, peer))
        return [f"{local} -> {peer}" for local, peer in established if (peer, local) not in ends]

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        subprocess.run(
            ["nft", "delete", "table", "inet", self.name], capture_output=True, timeout=10
        )
        # A killed node's workers leave its cgroup only as they exit: wait a little.
        deadline = time.monotonic() + 15
        for cgroup in [*self.cgroups, self.root]:
            while cgroup.exists():
                try:
                    cgroup.rmdir()
                except OSError:
                    if time.monotonic() > deadline:
                        print(f"chaos: could not remove cgroup {cgroup}", file=sys.stderr)
                        break
                    time.sleep(0.1)


@dataclass
class ChaosConfig:
    seconds: float = 60.0
    seed: int = 0
    nodes: int = 5
    writers: int = 3
    callers: int = 3
    interval: float = 6.0  # seconds per fault slot (Jepsen: 10 s)
    run_dir: Path | None = None
    network: bool = True  # nftables faults, when this machine allows them
    clock: bool = True  # clock jumps, when libfaketime loads here
    kinds: tuple[str, ...] = ()  # () = every kind available


@dataclass
class Report:
    seed: int
    seconds: float
    run_dir: str
    schedule: list[str]
    kinds_injected: list[str]
    not_injected: dict[str, str]
    operations: dict[str, dict[str, int]] = field(default_factory=dict)
    faults: dict[str, int] = field(default_factory=dict)
    executions: int = 0
    convergence_seconds: float | None = None
    converged: bool = False
    replica_hashes: list[str] = field(default_factory=list)
    # (seconds after the heal, node index, its hash or "held"/"unreachable"), on change
    convergence_trace: list[tuple[float, int, str]] = field(default_factory=list)
    membership_seconds: float | None = None  # after convergence, until all see all alive
    alive_seen: list[int] = field(default_factory=list)  # members each node sees alive
    calls: dict[str, Any] = field(default_factory=dict)
    delay_proxy: dict[str, int] = field(default_factory=dict)  # RelayCounts, all faults
    checks: dict[str, int] = field(default_factory=dict)
    violations: list[dict[str, Any]] = field(default_factory=list)
    observations: list[str] = field(default_factory=list)  # gaps not yet promised

    def ok(self) -> bool:
        return not self.violations


class Rig:
    def __init__(self, config: ChaosConfig) -> None:
        self.config = config
        self.run_dir = config.run_dir or Path(tempfile.mkdtemp(prefix="scatter-chaos-"))
        (self.run_dir / "history").mkdir(parents=True, exist_ok=True)
        self.nemesis = History(self.run_dir / "history" / "nemesis.jsonl", "nemesis")
        self.network: Network | None = None
        self.nodes: list[LocalNode] = []
        self.paused: set[int] = set()
        self.dead: set[int] = set()
        self.skewed: set[int] = set()  # nodes whose clock is off
        self.proxy: DelayProxy | None = None  # while a delay fault lasts
        self.relayed = Counter[str]()  # what the delay faults' proxies carried
        self.observations: list[str] = []  # for the report: the rig's own misfires
        self.convergence_trace: list[tuple[float, int, str]] = []  # see wait_for_convergence
        self.clients: list[subprocess.Popen[bytes]] = []
        why = network_faults_unavailable() if config.network else "turned off (--no-network)"
        self.network_unavailable = why
        self.delay_unavailable = why or delay_faults_unavailable()
        self.clock_unavailable = (
            faketime_unavailable() if config.clock else "turned off (--no-clock)"
        )
        available = list(PROCESS_FAULTS) + ([] if why else list(NETWORK_FAULTS))
        available += [] if self.delay_unavailable else list(DELAY_FAULTS)
        available += [] if self.clock_unavailable else list(CLOCK_FAULTS)
        self.kinds = [k for k in available if not config.kinds or k in config.kinds]

    # -- nodes --

    def start_cluster(self) -> None:
        if not self.network_unavailable:
            redirects = any(kind in DELAY_FAULTS for kind in self.kinds)
            self.network = Network(self.config.nodes, redirects=redirects)
        ports = [free_port() for _ in range(self.config.nodes)]
        for i, port in enumerate(ports):
            options = ["--profile", "local"]
            if i:
                options += ["--join", f"tcp://127.0.0.1:{ports[i - 1]}"]
            # The checker reads each node's change log; it cannot read a snapshot yet, so
            # the nodes keep their whole history (compaction is tested in tests/core).
            env: dict[str, str] = {"SCATTER_COMPACT_AFTER": str(10**9)}
            if not self.clock_unavailable and i == skewable(self.config.nodes):
                set_offset(self.offset_file(i), 0)
                env.update(faketime_env(self.offset_file(i)))
            node = LocalNode(
                self.run_dir / f"node-{i}",
                port=port,
                options=options,
                env=env,
                cgroup=self.network.cgroups[i] if self.network else None,
            )
            self.nodes.append(node)
            node.start()
        LocalCluster(self.run_dir, self.config.nodes, nodes=self.nodes).wait_until_joined(60)

    def restart(self, i: int) -> None:
        old = self.nodes[i]
        self.nodes[i] = LocalNode(
            old.data_dir, port=old.port, options=old.options, env=old.env, cgroup=old.cgroup
        )
        self.nodes[i].start(timeout=60)
        self.dead.discard(i)

    def offset_file(self, i: int) -> Path:
        return self.run_dir / f"clock-{i}"

    def set_clock(self, i: int, seconds: int) -> None:
        """Move node ``i``'s wall clock (and its workers') to real + ``seconds``, and log it:
        the checker reads ``at`` through these offsets."""
        set_offset(self.offset_file(i), seconds)
        self.skewed.discard(i)
        if seconds:
            self.skewed.add(i)
        self.nemesis.log("info", "clock-set", {"node": i, "offset": seconds})

    def node_ids(self) -> list[str]:
        import scatter

        ids = []
        for node in self.nodes:
            with scatter.Client(node.address, autostart=False) as client:
                ids.append(client.status().node_id)
        return ids

    # -- clients --

    def start_clients(self, stop_at: float) -> None:
        addresses = ",".join(n.address for n in self.nodes)
        roles = [("writer", f"w{i}") for i in range(self.config.writers)]
        roles += [("caller", f"c{i}") for i in range(self.config.callers)]
        env = dict(os.environ, SCATTER_AUTOSTART="0")
        root = Path(__file__).resolve().parents[1]
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
        for role, name in roles:
            log = open(self.run_dir / f"{name}.log", "ab")  # noqa: SIM115 - the child keeps it
            self.clients.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "cluster.chaos",
                        "--role",
                        role,
                        "--process",
                        name,
                        "--run-dir",
                        str(self.run_dir),
                        "--addresses",
                        addresses,
                        "--seed",
                        str(self.config.seed),
                        "--stop-at",
                        repr(stop_at),
                    ],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    env=env,
                )
            )
            log.close()

    def wait_for_clients(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for process in self.clients:
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                kill_if_alive(process.pid)
                process.wait(10)

    # -- faults --

    def begin(self, fault: Fault) -> None:
        ports = [n.port for n in self.nodes]
        if fault.kind == "kill":
            (victim,) = fault.nodes
            self.nodes[victim].kill()
            self.dead.add(victim)
        elif fault.kind == "pause":
            (victim,) = fault.nodes
            self.nodes[victim].pause()
            self.paused.add(victim)
        elif fault.kind == "loss":
            assert self.network is not None
            self.network.lose(fault.loss_percent, ports)
        elif fault.kind == "clock-jump":
            self.set_clock(fault.nodes[0], fault.offsets[0])
        elif fault.kind in DELAY_FAULTS:
            self.start_delay(fault, ports)
        elif fault.kind == "kill-in-partition":
            assert self.network is not None
            self.network.cut(cut_pairs(fault, len(self.nodes)), ports)
            self.nodes[fault.nodes[0]].kill()
            self.dead.add(fault.nodes[0])
        else:
            assert self.network is not None
            self.network.cut(cut_pairs(fault, len(self.nodes)), ports)

    def end(self, fault: Fault) -> None:
        if fault.kind == "kill":
            self.restart(fault.nodes[0])
        elif fault.kind == "kill-in-partition":
            self.restart(fault.nodes[0])  # still cut off: it restarts alone with its side
            assert self.network is not None
            self.network.heal()
        elif fault.kind == "pause":
            self.resume_all()
        elif fault.kind == "clock-jump":
            self.set_clock(fault.nodes[0], 0)
        elif self.network is not None:
            self.heal_network()

    def start_delay(self, fault: Fault, ports: list[int]) -> None:
        """A proxy of this fault's own, the redirects to it, then the open connections
        reset so that they come back through it."""
        assert self.network is not None
        low, high = (ms / 1000 for ms in fault.delay_ms)
        self.proxy = DelayProxy(low, high, seed=f"delay-{self.config.seed}-{fault.at}")
        proxy_port = self.proxy.start()
        pairs = delayed_pairs(fault, len(self.nodes))
        self.network.redirect(pairs, ports, proxy_port)
        self.network.reset_connections(pairs, ports)

    def heal_network(self) -> None:
        """Every rule gone; a delay fault's relay stopped first (``Network.heal``), and
        then no node connection may be left with one end: the rig would have injected
        a silent half-open connection rather than the delay it meant, and the nodes
        would wait out libzmq's 30 s handshake interval. Such a heal is an observation
        in the report."""
        assert self.network is not None
        proxy, self.proxy = self.proxy, None
        counts = self.network.heal(proxy)
        if counts is None:
            return
        self._count_relayed(counts)
        ports = [n.port for n in self.nodes]
        stuck = self.network.half_open(ports)
        if stuck:
            time.sleep(0.5)  # one being opened right now is not stuck
            stuck = sorted(set(stuck) & set(self.network.half_open(ports)))
        if stuck:
            self.nemesis.log("info", "half-open", {"connections": stuck})
            self.observations.append(
                f"a delay fault's heal left {len(stuck)} node connection(s) with one end "
                f"(the nodes wait out ZeroMQ's handshake interval): {', '.join(stuck)}"
            )

    def stop_delay(self) -> None:
        """The proxy writes on what it holds and closes its connections (only where the
        rules go next anyway: ``heal_network`` is the heal)."""
        if self.proxy is None:
            return
        counts = self.proxy.stop()
        self.proxy = None
        self._count_relayed(counts)

    def _count_relayed(self, counts: RelayCounts) -> None:
        self.relayed.update(asdict(counts))
        self.nemesis.log("info", "delay-proxy", asdict(counts))

    def resume_all(self) -> None:
        for i in sorted(self.paused):
            with contextlib.suppress(ProcessLookupError, AssertionError):
                self.nodes[i].resume()
        self.paused.clear()

    def heal_all(self) -> None:
        """Everything back: rules gone, everyone resumed, the killed restarted."""
        if self.network is not None:
            self.heal_network()
        self.resume_all()
        for i in sorted(self.skewed):
            self.set_clock(i, 0)
        for i in sorted(self.dead):
            self.restart(i)

    def run_schedule(self, schedule: list[Fault], started: float) -> Counter[str]:
        counts: Counter[str] = Counter()
        for fault in schedule:
            _sleep_until(started + fault.at)
            self.nemesis.log("invoke", fault.kind, asdict(fault))
            self.begin(fault)
            counts[fault.kind] += 1
            print(f"chaos: {fault.describe()}", flush=True)
            if fault.kind == "clock-jump":  # forward for its first half, then back
                _sleep_until(started + fault.at + fault.duration / 2)
                self.set_clock(fault.nodes[0], fault.offsets[1])
            if fault is schedule[-1]:
                break  # the final heal ends it, after the clients stopped
            _sleep_until(started + fault.at + fault.duration)
            self.end(fault)
            self.nemesis.log("ok", fault.kind, asdict(fault))
        return counts

    # -- the end --

    def wait_for_convergence(self, timeout: float) -> tuple[float | None, list[str]]:
        """Seconds from now until every node reports one replica hash and nothing held."""
        import scatter

        started = time.monotonic()
        hashes: list[str] = []
        last: list[str] = [""] * len(self.nodes)

        def look(node: LocalNode) -> tuple[str, float]:
            asked = time.monotonic()
            try:
                with scatter.Client(node.address, autostart=False) as client:
                    status = client.status()
                seen = (
                    status.replica_hash
                    if not status.pending_changes
                    else f"held ({status.pending_changes} pending)"
                )
            except scatter.ScatterError:
                seen = "unreachable"
            return seen, time.monotonic() - asked

        # Every node at once: one node slow to answer (busy catching up) must not hold
        # back the look at the others, or the convergence time is the sum of the waits.
        with concurrent.futures.ThreadPoolExecutor(len(self.nodes)) as looks:
            while time.monotonic() - started < timeout:
                hashes = []
                for i, (seen, took) in enumerate(looks.map(look, self.nodes)):
                    if seen != last[i]:
                        # Which node lagged, and how (the status's round trip says
                        # whether the node was slow to answer): read when convergence is slow.
                        at = round(time.monotonic() - started, 3)
                        shown = seen if took < 0.2 else f"{seen} (answered in {took:.2f} s)"
                        self.convergence_trace.append((at, i, shown))
                        last[i] = seen
                    hashes.append(seen if not seen.startswith("held") else "held")
                if len(set(hashes)) == 1 and hashes[0] not in ("held", "unreachable"):
                    return time.monotonic() - started, hashes
                time.sleep(0.05)
        return None, hashes

    def wait_for_membership(self, timeout: float) -> tuple[float | None, list[int]]:
        """Seconds from now until every node lists every node alive; else the counts seen."""
        import scatter

        started = time.monotonic()
        counts: list[int] = []
        while time.monotonic() - started < timeout:
            counts = []
            for node in self.nodes:
                try:
                    with scatter.Client(node.address, autostart=False) as client:
                        members = client.members()
                    counts.append(sum(1 for m in members if m["state"] == "alive"))
                except scatter.ScatterError:
                    counts.append(-1)
            if all(count == len(self.nodes) for count in counts):
                return time.monotonic() - started, counts
            time.sleep(0.1)
        return None, counts

    def final_reads(self) -> list[dict[str, list[dict[str, Any]]]]:
        import scatter

        reads = []
        for node in self.nodes:
            per_name: dict[str, list[dict[str, Any]]] = {}
            with scatter.Client(node.address, autostart=False) as client:
                for name in (*FUNCTIONS, SET_NAME, *SET_MEMBERS):
                    try:
                        per_name[name] = client.versions(name)
                    except scatter.FunctionNotFound:
                        per_name[name] = []
                per_name[""] = client.functions()
            reads.append(per_name)
        return reads

    def stop(self) -> None:
        """Everything this run started, by PID; rules and cgroups deleted. Idempotent."""
        with contextlib.suppress(Exception):
            self.resume_all()
        for process in self.clients:
            with contextlib.suppress(Exception):
                kill_if_alive(process.pid)
                process.wait(10)
        for node in self.nodes:
            with contextlib.suppress(Exception):
                node.stop()
        with contextlib.suppress(Exception):
            self.stop_delay()
        if self.network is not None:
            self.network.close()
        self.nemesis.close()


def _sleep_until(deadline: float) -> None:
    while (left := deadline - time.monotonic()) > 0:
        time.sleep(min(left, 0.05))


def run(config: ChaosConfig, out: Callable[[str], None] = print) -> Report:
    """One chaos run: cluster, clients, schedule, heal, convergence, checker."""
    rig = Rig(config)
    schedule = fault_schedule(config.seed, config.seconds, config.nodes, rig.kinds, config.interval)
    out(f"chaos: seed {config.seed}, {config.seconds:g} s, run directory {rig.run_dir}")
    if rig.network_unavailable:
        out(f"chaos: no network faults: {rig.network_unavailable}")
    if rig.delay_unavailable and not rig.network_unavailable:
        out(f"chaos: no delay faults: {rig.delay_unavailable}")
    if rig.clock_unavailable:
        out(f"chaos: no clock jumps: {rig.clock_unavailable}")
    out("chaos: schedule (replay with --seed " + str(config.seed) + "):")
    for fault in schedule:
        out(f"  {fault.describe()}")
    report = Report(
        seed=config.seed,
        seconds=config.seconds,
        run_dir=str(rig.run_dir),
        schedule=[f.describe() for f in schedule],
        kinds_injected=rig.kinds,
        not_injected=dict(NOT_INJECTED)
        | ({"network": rig.network_unavailable} if rig.network_unavailable else {})
        | (
            {"delay": rig.delay_unavailable}
            if rig.delay_unavailable and not rig.network_unavailable
            else {}
        )
        | ({"clock-jump": rig.clock_unavailable} if rig.clock_unavailable else {}),
    )
    previous_handler = signal.getsignal(signal.SIGTERM)
    if previous_handler is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        rig.start_cluster()
        node_ids = rig.node_ids()
        started = time.monotonic()
        rig.start_clients(stop_at=started + config.seconds)
        report.faults = dict(rig.run_schedule(schedule, started))
        _sleep_until(started + config.seconds)
        # Long enough for a call stuck in a lease from a dead node (30 s) to end by itself.
        rig.wait_for_clients(timeout=40)
        rig.heal_all()
        report.delay_proxy = dict(rig.relayed)
        report.observations += rig.observations
        if schedule:
            rig.nemesis.log("ok", schedule[-1].kind, asdict(schedule[-1]))
        rig.nemesis.log("info", "healed", {})
        convergence, hashes = rig.wait_for_convergence(timeout=60)
        report.convergence_seconds = convergence
        report.converged = convergence is not None
        report.replica_hashes = hashes
        report.convergence_trace = rig.convergence_trace
        membership, alive_counts = rig.wait_for_membership(timeout=30)
        report.membership_seconds = membership
        report.alive_seen = alive_counts
        reads = rig.final_reads() if report.converged else []
        for node in rig.nodes:  # SIGTERM to all first: they wind down in parallel
            if node.process is not None and node.process.poll() is None:
                node.process.terminate()
        for node in rig.nodes:
            node.stop()
        logs = [read_change_log(node.data_dir) for node in rig.nodes]
    finally:
        rig.stop()
        signal.signal(signal.SIGTERM, previous_handler)
    # What the checker reads besides histories and logs, so that `--recheck` can rerun it.
    (rig.run_dir / "final.json").write_text(
        json.dumps({"report": asdict(report), "node_ids": node_ids, "reads": reads}, default=str)
    )
    check(report, rig.run_dir, node_ids, reads, logs, schedule)
    (rig.run_dir / "report.json").write_text(json.dumps(asdict(report), indent=2, default=str))
    return report


def recheck(run_dir: Path) -> Report:
    """The checker again over a finished run's directory (after changing the checker)."""
    final = json.loads((run_dir / "final.json").read_text())
    report = Report(**final["report"])
    logs = [read_change_log(run_dir / f"node-{i}") for i in range(len(final["node_ids"]))]
    check(report, run_dir, final["node_ids"], final["reads"], logs, [])
    return report


def _raise_keyboard_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # so that `finally` undoes every fault and stops every PID


def read_change_log(data_dir: Path) -> list[Any]:
    """A stopped node's persisted changes, read with the node's own store."""
    from scatter._node._store import RegistryStore

    store = RegistryStore(data_dir / "registry")
    try:
        return store.changes()
    finally:
        store.close()


# ---------------------------------------------------------------------------
# The checker.
# ---------------------------------------------------------------------------


def check(
    report: Report,
    run_dir: Path,
    node_ids: list[str],
    reads: list[dict[str, list[dict[str, Any]]]],
    logs: list[list[Any]],
    schedule: list[Fault],
) -> None:
    """Fill ``report``: counts, call figures and every violation found.

    1. Convergence: one replica hash on every node, within 2 anti-entropy intervals of the
       heal; the same change ids persisted on every node; the same versions() everywhere.
    2. No acknowledged change lost: each ok publish, set publish, rollback and vaporize is
       a change in every node's log (found by content id, or by origin, name, number and
       the wall-time window of the operation). A rollback or vaporize that failed for
       certain is not (where no ok or info one of the same node and name overlaps it).
    3. Present or superseded: an ok publish's version is in the final versions() exactly
       when no vaporize of its name (or its set) sorts after it in the total order.
    4. No resurrection: every live version sorts after the last vaporize of its name.
    5. Calls: no token ran twice; a call that failed for certain did not run; every run
       is of a version published under that name (a marker some writer invoked), not
       before that publish was invoked, and not one whose publish failed for certain; a
       pinned call ran a version whose number was the pin on some node (see
       ``_number_ranges``).
    6. Ordered by vector clock, not by wall clock: each plain function's current version
       is the one the total order makes current (replayed: publish, rollback to a version
       still there, vaporize), whatever clock its origin had; changes whose ``at`` lies hours outside
       the run (made while their node's clock was jumped) are counted. Where 2 and 2b
       match a change by its ``at``, they read it through the offsets the nemesis gave
       the node's clock during the operation.
    """
    from scatter._core._registry import PublishOp, PublishSetOp, RollbackOp, VaporizeOp, order_key

    events = read_histories(run_dir)
    operations = pair_operations(events)
    violations = report.violations
    clock_sets: dict[int, list[tuple[float, int]]] = defaultdict(list)  # node -> (time, offset)
    for event in events:
        if event["process"] == "nemesis" and event["f"] == "clock-set":
            clock_sets[event["value"]["node"]].append((event["time"], event["value"]["offset"]))

    def offsets(op: dict[str, Any], slack: float = 1.0) -> set[int]:
        """Every offset the clock of the op's node had while the op ran."""
        start, end = op["start"] - slack, (op["end"] or math.inf) + slack
        found = {0}
        node = op["value"].get("acked_by", op["node"])  # the member that made it
        for at, offset in clock_sets.get(node, []):
            if at <= start:
                found = {offset}
            elif at <= end:
                found.add(offset)
        return found

    def violation(kind: str, detail: str, near: Iterable[dict[str, Any]] = ()) -> None:
        violations.append(
            {"kind": kind, "detail": detail, "seed": report.seed, "history": list(near)[:20]}
        )

    def around(name: str, at: float, seconds: float = 3.0) -> list[dict[str, Any]]:
        return [
            _brief(op)
            for op in operations
            if op["value"].get("name") in (name, SET_NAME if name in SET_MEMBERS else name)
            and abs(op["start"] - at) < seconds
        ]

    counts: dict[str, Counter[str]] = defaultdict(Counter)
    for op in operations:
        counts[op["f"]][op["type"]] += 1
    report.operations = {f: dict(c) for f, c in sorted(counts.items())}

    # 1. convergence
    if not report.converged:
        violation("no convergence", f"replica hashes after 60 s: {report.replica_hashes}")
    elif report.convergence_seconds is not None and report.convergence_seconds > CONVERGENCE_BOUND:
        violation(
            "slow convergence",
            f"{report.convergence_seconds:.2f} s from the final heal to one replica hash "
            f"(bound: 2 anti-entropy intervals, {CONVERGENCE_BOUND:g} s); each node's "
            "state as it changed (s after the heal, node, hash or held): "
            + ", ".join(f"{t:g} n{i} {seen[:12]}" for t, i, seen in report.convergence_trace),
        )
    if report.membership_seconds is None:
        violation(
            "membership did not heal",
            f"30 s after convergence, the nodes see {report.alive_seen} members alive "
            f"(of {len(node_ids)})",
        )
    id_sets = [frozenset(c.change_id for c in log) for log in logs]
    if len(set(id_sets)) > 1:
        union = frozenset().union(*id_sets)
        missing = {
            node_ids[i]: sorted(union - ids)[:10] for i, ids in enumerate(id_sets) if union - ids
        }
        violation("logs differ", f"changes missing from persisted logs: {missing}")
    for i, read in enumerate(reads[1:], 1):
        if read != reads[0]:
            names = [n for n in read if read[n] != reads[0].get(n)]
            violation(
                "reads differ", f"node {i} answers versions()/functions() of {names} unlike node 0"
            )

    changes = {c.change_id: c for log in logs for c in log}
    ordered = sorted(changes.values(), key=order_key)
    position = {c.change_id: i for i, c in enumerate(ordered)}

    def last_vaporize(names: tuple[str, ...]) -> int:
        last = -1
        for i, change in enumerate(ordered):
            if any(isinstance(op, VaporizeOp) and op.name in names for op in change.ops):
                last = i
        return last

    final = reads[0] if reads else {}
    live_content = {
        name: {row["content_id"] for row in final.get(name, []) if row.get("kind") == "function"}
        for name in CALLABLE
    }

    # 2 and 3: acknowledged changes
    checked = Counter[str]()
    taken: set[str] = set()
    # marker -> content id, for the versions an acknowledgement names
    content_of_marker = {
        op["value"]["marker"]: op["value"]["content_id"]
        for op in operations
        if op["f"] == "publish" and op["type"] == "ok"
    }
    for op in operations:
        if op["type"] != "ok" or op["f"] not in ("publish", "publish_set", "rollback", "vaporize"):
            continue
        name, value = op["value"]["name"], op["value"]
        origin = node_ids[value.get("acked_by", op["node"])]
        if op["f"] == "publish" and value.get("noop"):
            continue
        found = None
        for change in ordered:
            # A change's origin is a node *start* ("<node id>.<start>.<random>").
            if change.change_id in taken or not change.origin.startswith(origin + "."):
                continue
            for change_op in change.ops:
                if op["f"] == "publish" and isinstance(change_op, PublishOp):
                    hit = change_op.record.content_id == value["content_id"]
                elif op["f"] == "publish_set" and isinstance(change_op, PublishSetOp):
                    hit = change_op.name == name and change_op.proposed_version == value["version"]
                elif isinstance(change_op, RollbackOp | VaporizeOp) and op["f"] == _tag(change_op):
                    hit = change_op.name == name and _within(change.at, op, offsets(op))
                else:
                    hit = False
                if hit:
                    found = change
                    break
            if found is not None:
                break
        checked["acknowledged changes"] += 1
        if found is None:
            violation(
                "acknowledged change lost",
                f"{op['process']} {op['f']} {name} acknowledged by node "
                f"{value.get('acked_by', op['node'])} "
                f"({origin}) but no such change is in any node's log",
                around(name, op["start"]),
            )
            continue
        taken.add(found.change_id)
        if op["f"] == "publish_set":
            for change_op in found.ops:
                if isinstance(change_op, PublishOp) and change_op.record.name in value["markers"]:
                    marker = value["markers"][change_op.record.name]
                    content_of_marker[marker] = change_op.record.content_id
        if op["f"] == "publish":
            made = [(name, value["content_id"])]
        elif op["f"] == "publish_set":
            made = [
                (change_op.record.name, change_op.record.content_id)
                for change_op in found.ops
                if isinstance(change_op, PublishOp)
            ]
        else:
            continue
        for made_name, content_id in made:
            owners = (made_name, SET_NAME) if made_name in SET_MEMBERS else (made_name,)
            superseded = last_vaporize(owners) > position[found.change_id]
            present = content_id in live_content.get(made_name, set())
            checked["acknowledged versions, present or superseded"] += 1
            if present == superseded and reads:
                what = "present although a later vaporize superseded it" if present else "missing"
                violation(
                    "acknowledged version " + ("resurrected" if present else "lost"),
                    f"{made_name} content {content_id} (acknowledged as {name} "
                    f"v{value['version']} by node {op['node']}) is {what} in the final registry",
                    around(made_name, op["start"]),
                )

    # 2b: a rollback or vaporize that failed for certain made no change. Only where no
    # other operation of that kind, name and node whose outcome allows a change (ok or
    # info) overlaps it in time: then the change can only be the failed one's.
    for op in operations:
        if op["type"] != "fail" or op["f"] not in ("rollback", "vaporize"):
            continue
        name, origin = op["value"]["name"], node_ids[op["node"]]
        overlapping = [
            other
            for other in operations
            if other is not op
            and other["type"] in ("ok", "info")
            and (other["f"], other["value"].get("name"), other["node"])
            == (op["f"], name, op["node"])
            and other["start_wall"] <= (op["end_wall"] or math.inf) + 1.0
            and op["start_wall"] <= (other["end_wall"] or math.inf) + 1.0
        ]
        if overlapping:
            continue
        checked["failed changes checked"] += 1
        for change in ordered:
            if change.change_id in taken or not change.origin.startswith(origin + "."):
                continue
            if any(
                isinstance(change_op, RollbackOp | VaporizeOp)
                and _tag(change_op) == op["f"]
                and change_op.name == name
                for change_op in change.ops
            ) and _within(change.at, op, offsets(op)):
                violation(
                    "a failed change applied",
                    f"{op['process']} {op['f']} {name} failed at node {op['node']} "
                    f"({op['error']}), yet change {change.change_id} is that {op['f']}",
                    around(name, op["start"]),
                )
                break

    # 4: no resurrection
    publishes_by_content: dict[str, tuple[int, str]] = {}
    for i, change in enumerate(ordered):
        for change_op in change.ops:
            if isinstance(change_op, PublishOp):
                publishes_by_content[change_op.record.content_id] = (i, change_op.record.name)
    for name in CALLABLE:
        owners = (name, SET_NAME) if name in SET_MEMBERS else (name,)
        gone_at = last_vaporize(owners)
        for content_id in live_content.get(name, set()):
            checked["live versions"] += 1
            made_at = publishes_by_content.get(content_id, (-2, ""))[0]
            if made_at < gone_at:
                violation(
                    "vaporized version resurrected",
                    f"{name} content {content_id} is live, but its publish sorts before the "
                    "last vaporize of its name",
                )

    # 5: calls
    executions = _read_executions(run_dir / "executions.log")
    report.executions = len(executions)
    markers: dict[str, dict[str, Any]] = {}  # marker -> {name, start, numbers}
    for op in operations:
        if op["f"] == "publish":
            markers[op["value"]["marker"]] = {"name": op["value"]["name"], "op": op}
        elif op["f"] == "publish_set":
            for member, marker in op["value"]["markers"].items():
                markers[marker] = {"name": member, "op": op}
    number_range = _number_ranges(ordered)
    calls = {op["value"]["token"]: op for op in operations if op["f"] == "call"}
    runs = Counter(token for token, _, _, _ in executions)
    for token, times in runs.items():
        if times > 1:
            violation(
                "call ran twice",
                f"token {token} ran {times} times",
                [_brief(calls[token])] if token in calls else [],
            )
    checked["executions"] = len(executions)
    for token, name, marker, ran_at in executions:
        call = calls.get(token)
        if call is None:
            violation(
                "unknown call ran", f"token {token} ran {name} {marker}: no caller invoked it"
            )
            continue
        if call["type"] == "info" and call["end"] is not None and ran_at > call["end"]:
            # Not yet promised (issue 10: a call its caller gave up on never starts).
            report.observations.append(
                f"{token} ran {ran_at - call['end']:.2f} s after its caller gave up "
                f"({call['error']})"
            )
        if call["value"]["name"] != name:
            violation(
                "ran another function",
                f"{token} asked for {call['value']['name']}, ran {name}",
                [_brief(call)],
            )
        if call["type"] == "fail":
            violation(
                "failed call ran",
                f"{token} failed with {call['error']!r} but ran {name} {marker}",
                [_brief(call)],
            )
        known = markers.get(marker)
        if known is None or known["name"] != name:
            violation(
                "ran an unknown version",
                f"{token} ran {name} with marker {marker}, never published under {name}",
                [_brief(call)],
            )
            continue
        published = known["op"]
        if call["end"] is not None and published["start"] > call["end"]:
            violation(
                "ran a version before it was published", f"{token} ran {marker}", [_brief(call)]
            )
        if published["type"] == "fail":
            violation(
                "a failed publish ran",
                f"{token} ran {marker}, whose {published['f']} failed: {published['error']}",
                [_brief(published), _brief(call)],
            )
        if marker not in content_of_marker or content_of_marker[marker] not in number_range:
            continue
        low, high = number_range[content_of_marker[marker]]
        pin = call["value"].get("pin")
        if pin:
            checked["pinned runs checked"] += 1
            if not low <= pin <= high:
                violation(
                    "pinned call ran another version",
                    f"{token} pinned {name} v{pin} but ran {marker}, numbered {low} to {high}",
                    around(name, call["start"]),
                )
        reported = call["value"].get("version")
        if call["type"] == "ok" and reported is not None:
            checked["reported versions checked"] += 1
            if not low <= reported <= high:
                violation(
                    "a call reported another version than it ran",
                    f"{token} ran {marker} of {name}, numbered {low} to {high}, "
                    f"and its result said v{reported}",
                    around(name, call["start"]),
                )
    for op in calls.values():
        if op["type"] == "ok" and op["value"]["token"] not in runs:
            violation(
                "acknowledged call never ran",
                f"{op['value']['token']} returned {op['value'].get('marker')}",
                [_brief(op)],
            )

    # 6: ordered by vector clock, whatever the origin's wall clock said
    walls = [event["wall"] for event in events]
    run_walls = (min(walls) - 600, max(walls) + 600) if walls else (-math.inf, math.inf)

    def jumped(change: Any) -> bool:
        return not run_walls[0] <= change.at <= run_walls[1]

    checked["changes made with a jumped clock"] = sum(1 for c in ordered if jumped(c))
    for name in FUNCTIONS if reads else ():
        # Replayed here from the rule, not with the registry's code: a publish makes its
        # version current; a rollback makes its target current if that version still
        # exists; a vaporize leaves nothing.
        versions: dict[str, str] = {}  # change id -> content id, since the last vaporize
        current_id: str | None = None
        decided_by = None
        for change in ordered:
            for change_op in change.ops:
                if isinstance(change_op, PublishOp) and change_op.record.name == name:
                    versions[change.change_id] = change_op.record.content_id
                    current_id, decided_by = change_op.record.content_id, change
                elif isinstance(change_op, RollbackOp) and change_op.name == name:
                    if change_op.target in versions:
                        current_id, decided_by = versions[change_op.target], change
                elif isinstance(change_op, VaporizeOp) and change_op.name == name:
                    versions, current_id, decided_by = {}, None, change
        checked["current versions as the total order says"] += 1
        if decided_by is not None and jumped(decided_by):
            checked["of them decided by a change made with a jumped clock"] += 1
        current = [row["content_id"] for row in final.get(name, []) if row.get("current")]
        if current != ([current_id] if current_id else []):
            violation(
                "current version not the one the total order makes current",
                f"{name}: the total order makes {current_id} current (last decided by "
                + (
                    f"{decided_by.change_id}, made at {decided_by.at:.0f} by "
                    f"{'a jumped' if jumped(decided_by) else 'a true'} clock"
                    if decided_by is not None
                    else "nothing"
                )
                + f"); the current version is {current}",
            )
    report.checks = dict(checked)
    report.calls = call_figures(list(calls.values()), events)


def _tag(op: Any) -> str:
    return str(type(op).__struct_config__.tag)


def _within(
    at: float, op: dict[str, Any], offsets: Iterable[float] = (0,), slack: float = 1.0
) -> bool:
    """Whether a change stamped ``at`` by a clock ``offset`` off was made during ``op``."""
    end = op["end_wall"] if op["end_wall"] is not None else math.inf
    return any(op["start_wall"] - slack <= at - offset <= end + slack for offset in offsets)


def _number_ranges(ordered: list[Any]) -> dict[str, tuple[int, int]]:
    """{content id: (lowest, highest) number its version can have had on any node}.

    A version's number on a node is 1 + the publishes of its name that node holds and
    that sort before it (numbers are never reused: vaporize keeps the high-water mark).
    Every node holds at least its causal past (its proposed number) and at most every
    change (its number in the full order), so the number lies between the two. Recomputed
    here from the rule, not with the registry's code.
    """
    from scatter._core._registry import PublishOp, PublishSetOp

    high_water: Counter[str] = Counter()
    ranges: dict[str, tuple[int, int]] = {}
    for change in ordered:
        for op in change.ops:
            if isinstance(op, PublishOp):
                high_water[op.record.name] += 1
                ranges[op.record.content_id] = (op.proposed_version, high_water[op.record.name])
            elif isinstance(op, PublishSetOp):
                high_water[op.name] += 1
    return ranges


def _read_executions(path: Path) -> list[tuple[str, str, str, float]]:
    """(token, name, marker, monotonic time it ran) per line of the executions file."""
    if not path.exists():
        return []
    found = []
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) in (4, 5):  # runs before the time was recorded have 4 fields
            ran_at = float(parts[4]) if len(parts) == 5 else math.nan
            found.append((parts[0], parts[1], parts[2], ran_at))
    return found


def _brief(op: dict[str, Any]) -> dict[str, Any]:
    return {
        "process": op["process"],
        "f": op["f"],
        "node": op["node"],
        "type": op["type"],
        "value": op["value"],
        "start": round(op["start"], 3),
        "end": None if op["end"] is None else round(op["end"], 3),
        "error": op["error"],
    }


def call_figures(calls: list[dict[str, Any]], events: list[dict[str, Any]]) -> dict[str, Any]:
    """Latency of calls and the share that failed by error class, with a fault active or not."""
    windows = []
    started: dict[str, float] = {}
    for event in events:
        if event["process"] != "nemesis" or event["f"] == "healed":
            continue
        key = json.dumps(event["value"], sort_keys=True)
        if event["type"] == "invoke":
            started[key] = event["time"]
        elif key in started:
            windows.append((started.pop(key), event["time"]))
    windows += [(t, math.inf) for t in started.values()]

    def faulty(op: dict[str, Any]) -> bool:
        end = op["end"] if op["end"] is not None else op["start"]
        return any(a <= end and op["start"] <= b for a, b in windows)

    figures: dict[str, Any] = {}
    for label, chosen in (
        ("all", calls),
        ("during faults", [c for c in calls if faulty(c)]),
        ("without faults", [c for c in calls if not faulty(c)]),
    ):
        latencies = sorted(c["end"] - c["start"] for c in chosen if c["end"] is not None)
        failed = Counter(
            c["error"].split(":")[0] or "no completion (client stopped)"
            for c in chosen
            if c["type"] != "ok"
        )
        figures[label] = {
            "calls": len(chosen),
            "p50_ms": _percentile(latencies, 50),
            "p99_ms": _percentile(latencies, 99),
            "failed_share": {k: round(v / len(chosen), 4) for k, v in failed.most_common()}
            if chosen
            else {},
        }
    return figures


def _percentile(values: list[float], p: float) -> float | None:
    if not values:
        return None
    index = min(len(values) - 1, max(0, math.ceil(p / 100 * len(values)) - 1))
    return round(values[index] * 1000, 1)


def render(report: Report) -> str:
    lines = [
        f"chaos report: seed {report.seed}, {report.seconds:g} s, {report.run_dir}",
        "operations: "
        + "; ".join(
            f"{f} " + " ".join(f"{t}={n}" for t, n in sorted(c.items()))
            for f, c in report.operations.items()
        ),
        "faults: " + (", ".join(f"{k} {n}" for k, n in sorted(report.faults.items())) or "none"),
        "not injected: " + "; ".join(f"{k} ({v})" for k, v in report.not_injected.items()),
    ]
    if report.delay_proxy:
        relayed = report.delay_proxy
        lines.append(
            f"delay proxy: {relayed.get('connections', 0)} connections relayed, "
            f"{relayed.get('chunks', 0)} chunks ({relayed.get('bytes', 0) / 1e6:.1f} MB) "
            f"held and written on, {relayed.get('dropped', 0)} dropped as their connection "
            f"closed, {relayed.get('refused', 0)} connections refused by their destination"
        )
    lines += [
        f"executions recorded: {report.executions}",
        "convergence after the final heal: "
        + (f"{report.convergence_seconds:.2f} s" if report.converged else "NONE within 60 s")
        + "; every member alive everywhere "
        + (
            f"{report.membership_seconds:.2f} s later"
            if report.membership_seconds is not None
            else f"NOT within 30 s ({report.alive_seen})"
        ),
        "checked: " + ", ".join(f"{k} {n}" for k, n in report.checks.items()),
    ]
    for label, figures in report.calls.items():
        shares = ", ".join(f"{k} {v:.1%}" for k, v in figures["failed_share"].items()) or "none"
        lines.append(
            f"calls {label}: {figures['calls']}, p50 {figures['p50_ms']} ms, "
            f"p99 {figures['p99_ms']} ms, failed: {shares}"
        )
    if report.observations:
        lines.append(f"observations (not violations): {len(report.observations)}")
        lines += [f"  {o}" for o in report.observations[:5]]
    lines.append(f"violations: {len(report.violations)}")
    for v in report.violations:
        lines.append(f"  [{v['kind']}] seed {v['seed']}: {v['detail']}")
        for entry in v["history"][:8]:
            lines.append(f"      {json.dumps(entry)}")
    if report.violations:
        lines.append(
            f"replay: python -m cluster.chaos --seed {report.seed} --seconds {report.seconds:g}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cluster.chaos", description=__doc__.split("\n")[0]
    )
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--minutes", type=float)
    length.add_argument("--seconds", type=float)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--nodes", type=int, default=5)
    parser.add_argument("--writers", type=int, default=3)
    parser.add_argument("--callers", type=int, default=3)
    parser.add_argument(
        "--interval", type=float, default=6.0, help="seconds per fault (Jepsen: 10)"
    )
    parser.add_argument(
        "--faults", default="", help="comma-separated kinds (default: all available)"
    )
    parser.add_argument("--no-network", action="store_true", help="no nftables faults")
    parser.add_argument("--no-clock", action="store_true", help="no clock jumps (libfaketime)")
    parser.add_argument("--run-dir", type=Path, default=None)
    parser.add_argument("--recheck", type=Path, metavar="RUN_DIR", help="rerun the checker only")
    # A writer or caller process (started by the rig itself):
    parser.add_argument("--role", choices=("writer", "caller"), help=argparse.SUPPRESS)
    parser.add_argument("--process", help=argparse.SUPPRESS)
    parser.add_argument("--addresses", help=argparse.SUPPRESS)
    parser.add_argument("--stop-at", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 31)
    if args.role:
        runner = run_writer if args.role == "writer" else run_caller
        runner(args.process, args.run_dir, args.addresses.split(","), seed, args.stop_at)
        return 0
    if args.recheck:
        report = recheck(args.recheck)
        print(render(report), flush=True)
        return 0 if report.ok() else 1
    seconds = args.seconds or (args.minutes or 1.0) * 60
    config = ChaosConfig(
        seconds=seconds,
        seed=seed,
        nodes=args.nodes,
        writers=args.writers,
        callers=args.callers,
        interval=args.interval,
        run_dir=args.run_dir,
        network=not args.no_network,
        clock=not args.no_clock,
        kinds=tuple(k for k in args.faults.split(",") if k),
    )
    report = run(config)
    print(render(report), flush=True)
    print(f"chaos: report written to {Path(report.run_dir) / 'report.json'}")
    return 0 if report.ok() else 1


if __name__ == "__main__":
    sys.exit(main())
