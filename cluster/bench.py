"""Scatter's speed, measured against raw pyzmq and zeroapi in one run.

    nox -s bench                  # 3 rounds
    nox -s bench -- --quick       # 1 short round, well under 90 s with the install
    python cluster/bench.py --systems pyzmq-reqrep,zeroapi --workloads add --rounds 5
    python cluster/bench.py --workloads add --rounds 3 \
        --systems pyzmq-reqrep,pyzmq-reqrep-curve,scatter-tcp,scatter-tcp-plain  # CURVE
    python cluster/bench.py --only-registry-scaling   # just @scatter at 10 vs 5,000 functions

Systems (each a server on a free loopback port, in processes of its own):

- ``pyzmq-reqrep``, the baseline: a plain REP loop with typed msgspec decoding, doing the
  work itself (``_bench_servers.py``);
- ``pyzmq-reqrep-curve``: the same server and client with CurveZMQ keys (a CURVE server
  without ZAP, as Scatter's workers are), so that CURVE's raw cost is measured in the run;
- ``tcp-msgspec``: a plain TCP server, a thread per connection, length-prefixed msgspec
  frames, the work done in-process: the fastest Python RPC measured here, the limit Scatter
  aims at (``scatter-local`` against it is reported after the table);
- ``zeroapi``: zeroapi 1.0.1 in its default layout, a broker and one worker process per core;
- ``scatter-local``: a Scatter node, the calls run by the node the client talks to; the
  client is a same-user local one, so it reaches its workers over their Unix socket;
- ``scatter-tcp``: a Scatter node of its own, its clients made with ``transport="tcp"``:
  the workers' TCP endpoint, with CURVE, as every client off the node's machine uses;
- ``scatter-tcp-plain``: the same, with CURVE off on the workers' TCP endpoint (only here);
- ``scatter-forwarded``: a 2-node cluster, the client on node A, the workloads runnable
  only on node B (they need a module only B's ``PYTHONPATH`` has): each call is refused
  unrun by A's worker once, then routed (A hands out a worker of B: the direct route), so
  the figures are those of calls straight to a member's worker.

Workloads (``_bench_workloads.py``): ``add(a, b)``, ``total(xs)`` of 1,000 floats, and
``cpu(n)``, pure Python for about 5 ms (``n`` calibrated once here, the same for all).

Each workload runs with one client in sequence (p50, p99, calls/s) and with several
client processes at once (4 for add and total, 2 for cpu), released together by a
barrier, each running for the same fixed time. Rounds alternate the systems, rotating
their order, so that drift (thermal, noisy neighbours) hits them all alike; each figure's
ratio to the baseline is taken within its round, and the report gives medians across
rounds. The issue's targets are checked at the end as PASS/FAIL lines: reported, never
asserted (a failed target still exits 0; a system that could not run exits 1).

What CURVE costs Scatter (add p50, one client): ``scatter-tcp`` over ``scatter-tcp-plain``,
a node whose workers were given no key (``_bench_servers.py --plain-workers``; Scatter has
no such option itself) and clients that offer none, in the same round: the same code over
the same TCP endpoint, CURVE on and off. Without ``scatter-tcp-plain`` in the run, the
target is judged on scatter-tcp over scatter-local (CURVE and TCP against a Unix socket, an
upper bound). pyzmq with CURVE over pyzmq without is reported beside them.

After the rounds, for Scatter alone: how long ``@scatter`` takes to return, and the
pipelined variant, ``RemoteFunction.map``, against sequential calls from the same
process in the same minute (``add``, and ``cpu`` on one worker against every core).

Last, whether ``@scatter`` slows down as the registry grows: on a fresh node of its own,
the median time of 20 ``@scatter`` publishes (each a new version of one function, with a
distinct body) once the node holds 10 functions, then again after filling it to
``--registry-size`` functions (default 5,000; the probe counts as one of them). The fill
publishes function sets (``FunctionSet``) of 500 members, one registry change each, so it
takes seconds where 5,000 single publishes would take minutes; it stops at its time limit
(60 s, 30 s with ``--quick``) and the report then names the size it reached. Both medians,
their ratio and the fill time go to the report line and ``registry_scaling`` in the JSON.
``--only-registry-scaling`` runs this measurement alone (no other system, no rounds, no
cpu calibration), in well under 15 s.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import importlib.util
import json
import linecache
import multiprocessing
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

if __package__:
    from . import _bench_servers as servers, _bench_workloads as workloads
    from .launch import LocalCluster, LocalNode
else:  # run as a script: this file's folder is sys.path[0]
    import _bench_servers as servers
    import _bench_workloads as workloads
    from launch import LocalCluster, LocalNode

HERE = Path(__file__).resolve().parent
SERVERS_SCRIPT = HERE / "_bench_servers.py"
CURVE_SECRET_VARIABLE = servers.CURVE_SECRET_VARIABLE
BASELINE = "pyzmq-reqrep"
CURVE_BASELINE = "pyzmq-reqrep-curve"  # the baseline with CURVE keys
SCATTER_TCP = "scatter-tcp"  # Scatter through its workers' TCP endpoint: CURVE
SCATTER_TCP_PLAIN = "scatter-tcp-plain"  # the same endpoint without CURVE: its cost
TCP_MSGSPEC = "tcp-msgspec"  # the fastest Python RPC here: the limit Scatter aims at
FORWARDED = "scatter-forwarded"  # client on node A, the function runnable only on node B
FORWARDED_MODULE = "scatter_bench_only_on_b"
SYSTEMS = (
    BASELINE,
    CURVE_BASELINE,
    TCP_MSGSPEC,
    "zeroapi",
    "scatter-local",
    SCATTER_TCP,
    SCATTER_TCP_PLAIN,
    FORWARDED,
)
SCATTER_SYSTEMS = ("scatter-local", SCATTER_TCP, SCATTER_TCP_PLAIN)

# Bounds on waiting, so that a stuck system fails the run instead of hanging it.
SERVER_START_TIMEOUT = 60.0
CLIENT_READY_TIMEOUT = 120.0
REPLY_MARGIN = 60.0  # on top of warmup + duration, for a measurement's replies
CALL_TIMEOUT_MS = 10_000  # the baseline client's own limit on one call
MIN_WARMUP_CALLS = 10
MAX_CALLS = 5_000_000  # per client and measurement: bounds memory if a call is a no-op

# Piped output (nox, CI logs) would otherwise be wrapped at 80 columns.
console = Console(highlight=False, width=None if sys.stdout.isatty() else 120)


@dataclass(frozen=True)
class Settings:
    systems: tuple[str, ...]
    workloads: tuple[str, ...]
    rounds: int
    duration_s: float
    warmup_s: float
    publish_samples: int
    quick: bool
    registry_size: int = 5000
    only_registry_scaling: bool = False


# -- client processes ------------------------------------------------------------------
# Each client is a process of its own (spawned, so no inherited sockets or threads), set
# up once per system, then told which measurement to run. They share nothing but a barrier.


def _pyzmq_callers(address: str, server_key: bytes | None) -> dict[str, Callable[..., Any]]:
    import msgspec
    import zmq

    sock = zmq.Context.instance().socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    if server_key is not None:  # CURVE: the server's public key, a key pair of our own
        sock.curve_serverkey = server_key
        sock.curve_publickey, sock.curve_secretkey = zmq.curve_keypair()
    sock.setsockopt(zmq.RCVTIMEO, CALL_TIMEOUT_MS)
    sock.setsockopt(zmq.SNDTIMEO, CALL_TIMEOUT_MS)
    sock.connect(address)
    encode = msgspec.msgpack.Encoder().encode

    def caller(workload: str) -> Callable[..., Any]:
        name = workload.encode()
        decode = msgspec.msgpack.Decoder(float if workload == "total" else int).decode
        pack_all = workload == "add"  # add's two arguments travel as one pair

        def call(*args: Any) -> Any:
            sock.send_multipart([name, encode(args if pack_all else args[0])])
            status, payload = sock.recv_multipart()
            if status != b"ok":
                raise RuntimeError(f"{workload}: the server said {payload.decode()}")
            return decode(payload)

        return call

    return {workload: caller(workload) for workload in workloads.WORKLOADS}


def _tcp_msgspec_callers(address: str, server_key: bytes | None) -> dict[str, Callable[..., Any]]:
    import socket

    import msgspec

    host, port = address.removeprefix("tcp://").rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=CALL_TIMEOUT_MS / 1000)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    encode = msgspec.msgpack.Encoder().encode

    def caller(workload: str) -> Callable[..., Any]:
        result = float if workload == "total" else int
        decode = msgspec.msgpack.Decoder(tuple[str, result | str]).decode  # type: ignore[valid-type]
        pack_all = workload == "add"  # add's two arguments travel as one pair

        def call(*args: Any) -> Any:
            payload = encode((workload, args if pack_all else args[0]))
            sock.sendall(servers.FRAME_HEADER.pack(len(payload)) + payload)
            header = servers.recv_exactly(sock, servers.FRAME_HEADER.size)
            (size,) = servers.FRAME_HEADER.unpack(header)
            status, value = decode(servers.recv_exactly(sock, size))
            if status != "ok":
                raise RuntimeError(f"{workload}: the server said {value}")
            return value

        return call

    return {workload: caller(workload) for workload in workloads.WORKLOADS}


def _zeroapi_callers(address: str, server_key: bytes | None) -> dict[str, Callable[..., Any]]:
    import logging

    from zero import ZeroClient

    logging.getLogger().setLevel(logging.WARNING)  # zero's import turns INFO logging on
    host, port = address.removeprefix("tcp://").rsplit(":", 1)
    client = ZeroClient(host, int(port))

    def caller(workload: str) -> Callable[..., Any]:
        return_type = float if workload == "total" else int
        pack_all = workload == "add"  # zeroapi functions take one argument: add takes a pair

        def call(*args: Any) -> Any:
            return client.call(workload, args if pack_all else args[0], return_type=return_type)

        return call

    return {workload: caller(workload) for workload in workloads.WORKLOADS}


def _scatter_callers(
    address: str,
    server_key: bytes | None,
    transport: Literal["auto", "tcp"] = "auto",
    plain: bool = False,
) -> dict[str, Callable[..., Any]]:
    import scatter

    if plain:  # scatter-tcp-plain: worker sockets without CURVE keys, as its workers
        import scatter._client._connections as connections

        connections.apply_client_keys = lambda sock, keys: None

    # Each client process connects itself; its keys come from this user's secret.
    client = scatter.Client(address, autostart=False, transport=transport)
    return {workload: client.make_callable(workload) for workload in workloads.WORKLOADS}


CALLERS: dict[str, Callable[[str, bytes | None], dict[str, Callable[..., Any]]]] = {
    BASELINE: _pyzmq_callers,
    CURVE_BASELINE: _pyzmq_callers,  # given the server's key
    TCP_MSGSPEC: _tcp_msgspec_callers,
    "zeroapi": _zeroapi_callers,
    "scatter-local": _scatter_callers,
    SCATTER_TCP: functools.partial(_scatter_callers, transport="tcp"),
    SCATTER_TCP_PLAIN: functools.partial(_scatter_callers, transport="tcp", plain=True),
    FORWARDED: _scatter_callers,  # given node A's address
}


def _measure(call: Callable[[], Any], barrier: Any, warmup_s: float, duration_s: float) -> Any:
    warm_until = time.perf_counter() + warmup_s
    calls = 0
    while calls < MIN_WARMUP_CALLS or time.perf_counter() < warm_until:
        call()
        calls += 1
    barrier.wait(timeout=CLIENT_READY_TIMEOUT)
    clock = time.perf_counter_ns
    latencies = array("q")
    started = now = clock()
    stop = started + int(duration_s * 1e9)
    while now < stop and len(latencies) < MAX_CALLS:
        call()
        done = clock()
        latencies.append(done - now)
        now = done
    return len(latencies), (now - started) / 1e9, latencies.tobytes()


def client_main(
    system: str,
    address: str,
    server_key: bytes | None,
    cpu_loops: int,
    conn: Any,
    barriers: dict[int, Any],
) -> None:
    """One client process: set up, say ready, then run measurements until told to stop."""
    try:
        calls = {}
        for workload, fn in CALLERS[system](address, server_key).items():
            args = workloads.call_args(workload, cpu_loops)
            got, want = fn(*args), workloads.expected(workload, cpu_loops)
            if got != want:
                raise AssertionError(f"{system} {workload} returned {got!r}, expected {want!r}")
            calls[workload] = functools.partial(fn, *args)
        conn.send(("ready", None))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        return
    # Bounded: every wait has a limit, and the pipe reports EOF when the parent is gone.
    while conn.poll(3600):
        try:
            message = conn.recv()
        except EOFError:
            return
        if message is None:
            return
        workload, clients, warmup_s, duration_s = message
        barrier = barriers[clients]
        try:
            conn.send(("result", _measure(calls[workload], barrier, warmup_s, duration_s)))
        except BaseException:
            barrier.abort()  # release the others (and the parent) at once
            conn.send(("error", traceback.format_exc()))


# -- results ---------------------------------------------------------------------------


@dataclass
class Measurement:
    calls: int
    calls_per_s: float
    p50_us: float
    p99_us: float

    @classmethod
    def from_clients(cls, replies: list[tuple[int, float, bytes]]) -> Measurement:
        merged = array("q")
        for _, _, raw in replies:
            merged.frombytes(raw)
        ordered = sorted(merged)
        if not ordered:
            raise RuntimeError("no call completed")

        def quantile(q: float) -> float:
            return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1000

        # Aggregate rate: each client's calls over its own measured time, summed.
        rate = sum(n / elapsed for n, elapsed, _ in replies if elapsed > 0)
        return cls(len(ordered), rate, quantile(0.50), quantile(0.99))


@dataclass
class Row:
    system: str
    workload: str
    clients: int
    rounds: dict[int, Measurement] = field(default_factory=dict)


class SystemFailed(Exception):
    pass


# -- processes: servers and client pools -----------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def _stop_group(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM the server's process group (its workers too), then SIGKILL what is left."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=3)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=5)


def _log_tail(path: Path, lines: int = 15) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


@contextlib.contextmanager
def server(system: str, workdir: Path, curve_secret: bytes | None = None) -> Iterator[str]:
    """Start the system's server in a session of its own; yield its address.

    ``curve_secret``: the CURVE server key of ``pyzmq-reqrep-curve``.
    """
    if system == FORWARDED:
        with forwarded_cluster(workdir) as address:
            yield address
        return
    workdir.mkdir(parents=True)
    port = free_port()
    kind = "scatter-node" if system in SCATTER_SYSTEMS else system
    env = dict(os.environ)
    if system == CURVE_BASELINE:
        if curve_secret is None:
            raise SystemFailed(f"{system}: no CURVE key given")
        kind = BASELINE
        env[CURVE_SECRET_VARIABLE] = curve_secret.decode()
    command = [sys.executable, str(SERVERS_SCRIPT), kind, "--port", str(port)]
    command += ["--parent", str(os.getpid())]
    if system == CURVE_BASELINE:
        command.append("--curve")
    if kind == "scatter-node":
        command += ["--data-dir", str(workdir / "data")]
        if system == SCATTER_TCP_PLAIN:
            command.append("--plain-workers")
        # The node must run the same scatter this process imports, installed or not.
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [_scatter_root(), env.get("PYTHONPATH")]))
    log_path = workdir / "server.log"
    with open(log_path, "wb") as log:
        # cwd: zeroapi puts its IPC socket file in the working directory.
        process = subprocess.Popen(
            command,
            cwd=workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while not _port_open(port):
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemFailed(
                    f"{system}: the server did not start listening on port {port}\n"
                    + _log_tail(log_path)
                )
            time.sleep(0.05)
        yield f"tcp://127.0.0.1:{port}"
    finally:
        _stop_group(process)


@contextlib.contextmanager
def forwarded_cluster(workdir: Path) -> Iterator[str]:
    """``scatter-forwarded``: nodes A and B on loopback, the workloads published through B
    from a module only B's ``PYTHONPATH`` has (pickled by reference, as an installed
    package is), so A's workers cannot load them; yields A's address. Stopped by PID."""
    import inspect

    import cloudpickle

    import scatter
    from scatter import _wire
    from scatter._publish import prepare_publish

    only_b = workdir / "only-b"
    only_b.mkdir(parents=True)
    source = "".join(
        inspect.getsource(fn) + "\n\n" for fn in (workloads.add, workloads.total, workloads.cpu)
    )
    (only_b / f"{FORWARDED_MODULE}.py").write_text(source)
    base = os.pathsep.join(filter(None, [_scatter_root(), os.environ.get("PYTHONPATH")]))
    a = LocalNode(workdir / "a", options=["--profile", "local"], env={"PYTHONPATH": base})
    cluster = LocalCluster(workdir, 2, nodes=[a])
    try:
        a.start(SERVER_START_TIMEOUT)
        b = LocalNode(
            workdir / "b",
            options=["--profile", "local", "--join", a.address],
            env={"PYTHONPATH": os.pathsep.join([str(only_b), base])},
        )
        cluster.nodes.append(b)
        b.start(SERVER_START_TIMEOUT)
        cluster.wait_until_joined(SERVER_START_TIMEOUT)
        sys.path.insert(0, str(only_b))
        try:
            module = importlib.import_module(FORWARDED_MODULE)
        finally:
            sys.path.remove(str(only_b))
        with scatter.Client(b.address, autostart=False) as through_b:
            for name in workloads.WORKLOADS:
                fields = prepare_publish(getattr(module, name), name=name)
                fields["body"] = cloudpickle.dumps(getattr(module, name))  # by reference
                through_b.request(lambda i, fields=fields: _wire.Publish(id=i, **fields))
        with scatter.Client(a.address, autostart=False) as through_a:
            deadline = time.monotonic() + SERVER_START_TIMEOUT
            while {row["name"] for row in through_a.functions()} < set(workloads.WORKLOADS):
                if time.monotonic() > deadline:
                    raise SystemFailed(f"{FORWARDED}: node A never heard of the workloads")
                time.sleep(0.05)
        yield a.address
    finally:
        cluster.stop()


class ClientPool:
    """``size`` client processes of one system, each connected once, reused per round."""

    def __init__(
        self, system: str, address: str, server_key: bytes | None, cpu_loops: int, size: int
    ) -> None:
        self.system = system
        context = multiprocessing.get_context("spawn")
        counts = {1, *(workloads.CONCURRENT_CLIENTS.values())}
        # One barrier per client count; the parent is a party too, so it knows when all
        # clients are warm and released.
        self.barriers = {n: context.Barrier(n + 1) for n in counts}
        self.conns: list[Any] = []
        self.processes: list[Any] = []
        for i in range(size):
            parent_end, child_end = context.Pipe()
            process = context.Process(
                target=client_main,
                args=(system, address, server_key, cpu_loops, child_end, self.barriers),
                name=f"bench-{system}-{i}",
                daemon=True,
            )
            process.start()
            child_end.close()
            self.conns.append(parent_end)
            self.processes.append(process)

    def _recv(self, conn: Any, timeout: float) -> tuple[str, Any]:
        if not conn.poll(timeout):
            raise SystemFailed(f"{self.system}: a client gave no answer within {timeout:g} s")
        try:
            reply: tuple[str, Any] = conn.recv()
        except EOFError:
            raise SystemFailed(f"{self.system}: a client process died") from None
        return reply

    def wait_ready(self) -> None:
        errors = []
        for conn in self.conns:
            kind, detail = self._recv(conn, CLIENT_READY_TIMEOUT)
            if kind != "ready":
                errors.append(detail)
        if errors:
            raise SystemFailed(f"{self.system}: a client could not start\n{errors[0]}")

    def measure(
        self, workload: str, clients: int, warmup_s: float, duration_s: float
    ) -> Measurement:
        conns = self.conns[:clients]
        for conn in conns:
            conn.send((workload, clients, warmup_s, duration_s))
        barrier = self.barriers[clients]
        with contextlib.suppress(threading.BrokenBarrierError):
            barrier.wait(timeout=CLIENT_READY_TIMEOUT)  # a broken one: the replies say why
        replies = [self._recv(conn, warmup_s + duration_s + REPLY_MARGIN) for conn in conns]
        errors = [detail for kind, detail in replies if kind != "result"]
        if errors:
            barrier.reset()
            raise SystemFailed(f"{self.system} {workload} x{clients}: a client failed\n{errors[0]}")
        return Measurement.from_clients([detail for _, detail in replies])

    def close(self) -> None:
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.send(None)
        for process in self.processes:
            process.join(timeout=5)
            if process.is_alive():
                process.kill()
                process.join(timeout=5)


@contextlib.contextmanager
def client_pool(
    system: str, address: str, server_key: bytes | None, cpu_loops: int, size: int
) -> Iterator[ClientPool]:
    pool = ClientPool(system, address, server_key, cpu_loops, size)
    try:
        yield pool
    finally:
        pool.close()


# -- Scatter-specific steps ------------------------------------------------------------


def _scatter_root() -> str | None:
    spec = importlib.util.find_spec("scatter")
    if spec is None or not spec.submodule_search_locations:
        return None
    return str(Path(next(iter(spec.submodule_search_locations))).parent)


def publish_workloads(address: str, *, default: bool = True) -> Any:
    """Publish the workloads; ``default``: through (and keep) the default client."""
    import scatter

    if not default:  # a node of its own, the default client left to scatter-local
        with scatter.Client(address, autostart=False) as client:
            for fn in (workloads.add, workloads.total, workloads.cpu):
                client.publish(fn)
        return None
    scatter.connect(address, autostart=False)
    for fn in (workloads.add, workloads.total, workloads.cpu):
        scatter.scatter(fn)
    return scatter


def _fresh_function(name: str, constant: int) -> Callable[..., Any]:
    """A new small function with a body of its own, and source that inspect can find."""
    source = f"def {name}(x: int, y: float = 1.0) -> float:\n    return x * y + {constant}\n"
    filename = f"<scatter-bench {name}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    # A module name that is not importable: cloudpickle ships the function by value.
    namespace: dict[str, Any] = {"__name__": "scatter_bench_generated"}
    exec(compile(source, filename, "exec"), namespace)
    return namespace[name]  # type: ignore[no-any-return]


def time_publishes(scatter_module: Any, samples: int) -> list[float]:
    """Seconds for ``@scatter`` to return, each on a distinct, never-seen body."""
    tag = uuid.uuid4().hex[:8]
    timings = []
    for i in range(samples + 2):  # the first two warm up the connection and are dropped
        fn = _fresh_function(f"bench_publish_{tag}_{i}", i)
        started = time.perf_counter()
        scatter_module.scatter(fn)
        timings.append(time.perf_counter() - started)
    return timings[2:]


SCALING_SMALL_SIZE = 10  # the registry size @scatter is first timed at
FILL_SET_SIZE = 500  # members per FunctionSet publish while filling the registry
FILL_BUDGET_S = 60.0  # the fill stops here (30 s with --quick); the report names the size


def time_registry_scaling(
    address: str,
    sizes: tuple[int, int],
    samples: int,
    fill_budget_s: float,
    say: Callable[[str], None],
) -> dict[str, Any]:
    """``@scatter`` times with ``sizes[0]`` and then ``sizes[1]`` functions on the node.

    At each size the registry holds filler functions plus one probe; the probe is then
    published ``samples`` + 2 times, each a new version with a distinct body (the first
    two warm up and are dropped), so the function count stays at the size throughout.
    Filler goes in FunctionSets of ``FILL_SET_SIZE``: one registry change per set.
    """
    import scatter

    tag = uuid.uuid4().hex[:8]
    registered = 0  # functions on the node: filler and probes
    sets = 0
    fill_s = 0.0  # time spent filling, both sizes together

    def fill(target: int) -> None:
        nonlocal registered, sets, fill_s
        started = time.monotonic()
        next_report = registered + max(FILL_SET_SIZE, target // 5)
        while registered < target:
            if fill_s + time.monotonic() - started > fill_budget_s:
                say(f"registry fill stopped at its {fill_budget_s:g} s limit")
                break
            group = scatter.FunctionSet(f"bench_fill_{tag}_{sets}", address=address)
            for i in range(min(FILL_SET_SIZE, target - registered)):
                group.function(_fresh_function(f"bench_fill_{tag}_{sets}_{i}", i))
            group.publish()
            registered += len(group.members)
            sets += 1
            if registered >= next_report or registered >= target:
                say(f"registry: {registered:,}/{target:,} functions")
                next_report = registered + max(FILL_SET_SIZE, target // 5)
        fill_s += time.monotonic() - started

    def time_at(size: int) -> tuple[int, list[float]]:
        nonlocal registered
        fill(size - 1)  # the probe's first publish makes it size
        probe = f"bench_scaling_probe_{tag}_{size}"
        publish = scatter.scatter(address=address)  # @scatter(address=...), made once
        timings = []
        for i in range(samples + 2):
            fn = _fresh_function(probe, i)
            started = time.perf_counter()
            publish(fn)
            timings.append(time.perf_counter() - started)
        registered += 1  # the probe
        return registered, timings[2:]

    small, large = sizes
    say(f"registry scaling: @scatter with {small} functions, then {large:,}")
    small_size, small_s = time_at(small)
    large_size, large_s = time_at(large)
    live = sum(1 for f in scatter.functions(address=address) if f.kind == "function")
    if live != large_size:
        raise RuntimeError(f"the node holds {live} functions, expected {large_size}")
    small_ms = statistics.median(small_s) * 1000
    large_ms = statistics.median(large_s) * 1000
    return {
        "what": "ms for @scatter to return (new version, distinct body) by registry size",
        "small_size": small_size,
        "large_size": large_size,
        "requested_size": large,
        "small_median_ms": small_ms,
        "large_median_ms": large_ms,
        "ratio": large_ms / small_ms,
        "small_samples_ms": [t * 1000 for t in small_s],
        "large_samples_ms": [t * 1000 for t in large_s],
        "fill_s": fill_s,
        "fill": f"FunctionSets of up to {FILL_SET_SIZE} members, {sets} set publishes",
    }


# -- the run ---------------------------------------------------------------------------


def time_map(scatter_module: Any, cpu_loops: int, duration_s: float) -> dict[str, Any]:
    """Calls/s of ``map`` against sequential calls, alternated, from this process."""
    add = scatter_module.make_callable("add")
    cpu = scatter_module.make_callable("cpu")
    cores = os.cpu_count() or 1

    def rate(run: Callable[[int], None], calls: int) -> float:
        # Grow the batch until one takes long enough to time, then time one more.
        while True:
            started = time.perf_counter()
            run(calls)
            elapsed = time.perf_counter() - started
            if elapsed >= duration_s / 2:
                return calls / elapsed
            calls *= 2

    def sequential_add(calls: int) -> None:
        for i in range(calls):
            add(i, i)

    def mapped_add(calls: int) -> None:
        for _ in add.map(range(calls), range(calls)):
            pass

    def mapped_cpu(parallel: int) -> Callable[[int], None]:
        def run(calls: int) -> None:
            for _ in cpu.map([cpu_loops] * calls, parallel=parallel):
                pass

        return run

    measured: dict[str, list[float]] = {}
    for _ in range(2):
        for name, run, calls in (
            ("add sequential", sequential_add, 500),
            ("add map", mapped_add, 2000),
            ("cpu map, 1 worker", mapped_cpu(1), 20),
            (f"cpu map, {cores} workers", mapped_cpu(cores), 20),
        ):
            measured.setdefault(name, []).append(rate(run, calls))
    rates = {name: statistics.median(values) for name, values in measured.items()}
    return {
        "what": "calls/s from one process: RemoteFunction.map against sequential calls",
        "calls_per_s": rates,
        "add_map_vs_sequential": rates["add map"] / rates["add sequential"],
        "cpu_map_all_cores_vs_one": rates[f"cpu map, {cores} workers"] / rates["cpu map, 1 worker"],
    }


def machine_info(cpu_loops: int) -> dict[str, Any]:
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break

    def version(dist: str) -> str | None:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    import zmq

    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "pyzmq": zmq.__version__,
        "libzmq": zmq.zmq_version(),
        "msgspec": version("msgspec"),
        "zeroapi": version("zeroapi"),
        "scatter": version("scatter-rpc"),
        "cpu_loops": cpu_loops,
    }


class Run:
    """One benchmark run: every server and client pool up at once, then the rounds."""

    def __init__(self, settings: Settings, cpu_loops: int, workdir: Path) -> None:
        self.settings = settings
        self.cpu_loops = cpu_loops
        self.workdir = workdir
        self.started = time.monotonic()
        self.rows: dict[tuple[str, str, int], Row] = {}
        self.errors: dict[str, str] = {}
        self.publish_s: list[float] = []
        self.map_rates: dict[str, Any] | None = None
        self.registry_scaling: dict[str, Any] | None = None
        self.live: list[str] = []  # systems still being measured, in canonical order

    def say(self, text: str) -> None:
        console.print(f"{time.monotonic() - self.started:5.1f} s  {escape(text)}")

    def fail(self, system: str, detail: str) -> None:
        """Record why a system cannot be measured; the others go on."""
        self.errors[system] = detail
        if system in self.live:
            self.live.remove(system)
        console.print(f"[bold red]{system} FAILED[/]:\n{escape(detail)}")

    def execute(self) -> None:
        import zmq

        pool_size = max(workloads.CONCURRENT_CLIENTS[w] for w in self.settings.workloads)
        scatter_module = None
        # The CURVE baseline's server key pair, made for this run.
        curve_public, curve_secret = zmq.curve_keypair()
        server_keys = {CURVE_BASELINE: curve_public}
        with contextlib.ExitStack() as stack:
            addresses: dict[str, str] = {}
            for system in self.settings.systems:
                try:
                    address = stack.enter_context(
                        server(system, self.workdir / system, curve_secret)
                    )
                    if system == "scatter-local":
                        scatter_module = publish_workloads(address)
                    elif system in (SCATTER_TCP, SCATTER_TCP_PLAIN):
                        publish_workloads(address, default=False)
                    addresses[system] = address
                except Exception as exc:
                    self.fail(
                        system,
                        str(exc) if isinstance(exc, SystemFailed) else traceback.format_exc(),
                    )
            # Start every pool before waiting on any: they import and connect in parallel.
            pools = {
                system: stack.enter_context(
                    client_pool(system, address, server_keys.get(system), self.cpu_loops, pool_size)
                )
                for system, address in addresses.items()
            }
            for system, pool in pools.items():
                try:
                    pool.wait_ready()
                    self.live.append(system)
                except SystemFailed as exc:
                    self.fail(system, str(exc))
            self.say(f"ready: {', '.join(self.live) or 'nothing'}")
            for number in range(1, self.settings.rounds + 1):
                self.measure_round(number, pools)
            if scatter_module is not None and "scatter-local" in self.live:
                try:
                    self.publish_s = time_publishes(scatter_module, self.settings.publish_samples)
                except Exception:
                    self.fail("scatter-local publish", traceback.format_exc())
                try:
                    self.say("pipelined calls (map)")
                    self.map_rates = time_map(
                        scatter_module, self.cpu_loops, self.settings.duration_s
                    )
                except Exception:
                    self.fail("scatter-local map", traceback.format_exc())
                self.measure_registry_scaling()
            self.say("stopping servers")

    def measure_registry_scaling(self) -> None:
        """``@scatter`` at 10 and at ``registry_size`` functions, on a node of its own."""
        settings = self.settings
        try:
            with server("scatter-local", self.workdir / "registry-scaling") as address:
                self.registry_scaling = time_registry_scaling(
                    address,
                    (SCALING_SMALL_SIZE, settings.registry_size),
                    settings.publish_samples,
                    FILL_BUDGET_S / 2 if settings.quick else FILL_BUDGET_S,
                    self.say,
                )
        except Exception as exc:
            detail = str(exc) if isinstance(exc, SystemFailed) else traceback.format_exc()
            self.fail("scatter-local registry scaling", detail)

    def measure_round(self, number: int, pools: dict[str, ClientPool]) -> None:
        # Rotate the order each round, and alternate systems within each measurement
        # kind, so that slow drift falls on every system alike.
        shift = (number - 1) % max(1, len(self.live))
        order = self.live[shift:] + self.live[:shift]
        self.say(f"round {number}/{self.settings.rounds}: {' -> '.join(order)}")
        for workload in self.settings.workloads:
            for clients in (1, workloads.CONCURRENT_CLIENTS[workload]):
                for system in order:
                    if system not in self.live:
                        continue  # it failed earlier in this round
                    try:
                        result = pools[system].measure(
                            workload, clients, self.settings.warmup_s, self.settings.duration_s
                        )
                    except SystemFailed as exc:
                        log = _log_tail(self.workdir / system / "server.log", 30)
                        self.fail(system, f"{exc}\nserver log (last lines):\n{log}")
                        continue
                    key = (system, workload, clients)
                    self.rows.setdefault(key, Row(system, workload, clients)).rounds[number] = (
                        result
                    )


def run(settings: Settings) -> tuple[Run, dict[str, Any]]:
    if settings.only_registry_scaling:  # no cpu workload to calibrate
        cpu_loops, machine = 0, machine_info(0)
    else:
        cpu_loops = workloads.calibrate_cpu()
        cpu_ms = _time_cpu(cpu_loops) * 1000
        console.print(
            f"cpu workload: {cpu_loops} loops, {cpu_ms:.2f} ms per call here (target 5 ms)"
        )
        machine = machine_info(cpu_loops) | {"cpu_call_ms": round(cpu_ms, 3)}
    with tempfile.TemporaryDirectory(prefix="scatter-bench-") as tmp:
        bench = Run(settings, cpu_loops, Path(tmp))
        if settings.only_registry_scaling:
            bench.measure_registry_scaling()
        else:
            bench.execute()
    return bench, machine


def _time_cpu(cpu_loops: int) -> float:
    timings = []
    for _ in range(5):
        started = time.perf_counter()
        workloads.cpu(cpu_loops)
        timings.append(time.perf_counter() - started)
    return statistics.median(timings)


# -- the report ------------------------------------------------------------------------


def _ratio(value: float | None, reference: float | None) -> float | None:
    if value is None or not reference:
        return None
    return value / reference


def per_round_ratios(
    rows: dict[tuple[str, str, int], Row],
    row: Row,
    reference_system: str,
    metric: str,
    reference_clients: int | None = None,
) -> dict[int, float]:
    """row's metric over the reference's, round by round (only rounds both ran)."""
    key = (reference_system, row.workload, reference_clients or row.clients)
    reference = rows.get(key)
    if reference is None:
        return {}
    ratios = {}
    for number, measurement in row.rounds.items():
        other = reference.rounds.get(number)
        ratio = _ratio(getattr(measurement, metric), other and getattr(other, metric))
        if ratio is not None:
            ratios[number] = ratio
    return ratios


def _median(values: Any) -> float | None:
    values = list(values)
    return statistics.median(values) if values else None


def build_report(bench: Run, machine: dict[str, Any]) -> dict[str, Any]:
    rows, settings = bench.rows, bench.settings
    runs = []
    for row in sorted(rows.values(), key=_row_order):
        ratios = {
            metric: per_round_ratios(rows, row, BASELINE, metric)
            for metric in ("p50_us", "p99_us", "calls_per_s")
        }
        runs.append(
            {
                "system": row.system,
                "workload": row.workload,
                "clients": row.clients,
                "p50_us": _median(m.p50_us for m in row.rounds.values()),
                "p99_us": _median(m.p99_us for m in row.rounds.values()),
                "calls_per_s": _median(m.calls_per_s for m in row.rounds.values()),
                "vs_baseline": {metric: _median(r.values()) for metric, r in ratios.items()},
                "rounds": [
                    {
                        "round": number,
                        "p50_us": m.p50_us,
                        "p99_us": m.p99_us,
                        "calls_per_s": m.calls_per_s,
                        "calls": m.calls,
                        "vs_baseline": {metric: r.get(number) for metric, r in ratios.items()},
                    }
                    for number, m in sorted(row.rounds.items())
                ],
            }
        )
    publish = None
    if bench.publish_s:
        publish = {
            "what": "seconds for @scatter to return: fresh small functions, distinct bodies",
            "median_ms": statistics.median(bench.publish_s) * 1000,
            "samples_ms": [t * 1000 for t in bench.publish_s],
        }
    return {
        "machine": machine,
        "settings": {
            "rounds": settings.rounds,
            "duration_s": settings.duration_s,
            "warmup_s": settings.warmup_s,
            "quick": settings.quick,
            "baseline": BASELINE,
            "concurrent_clients": workloads.CONCURRENT_CLIENTS,
        },
        "runs": runs,
        "publish": publish,
        "map": bench.map_rates,
        "registry_scaling": bench.registry_scaling,
        "limit": against_limit(rows),
        "curve": (curve := curve_cost(rows)),
        "targets": [*check_targets(rows), curve["target"]],
        "errors": bench.errors,
    }


def _row_order(row: Row) -> tuple[int, int, int]:
    return (
        workloads.WORKLOADS.index(row.workload),
        row.clients,
        SYSTEMS.index(row.system),
    )


@dataclass(frozen=True)
class Target:
    """One of the issue's targets: scatter-local's metric over a reference's, same round."""

    text: str
    workload: str
    clients: int
    metric: str
    reference: str
    bound: float
    at_most: bool = False  # latencies must stay under the bound, rates reach it
    reference_clients: int | None = None  # default: the same client count
    system: str = "scatter-local"  # whose metric


_S = "scatter-local"
TARGETS = (
    Target(f"{_S} add p50 <= 1.2x {BASELINE}", "add", 1, "p50_us", BASELINE, 1.2, at_most=True),
    Target(f"{_S} add 1-client calls/s >= 2x zeroapi", "add", 1, "calls_per_s", "zeroapi", 2.0),
    Target(f"{_S} add 4-client calls/s >= 0.9x {BASELINE}", "add", 4, "calls_per_s", BASELINE, 0.9),
    Target(f"{_S} total p50 <= 1.2x {BASELINE}", "total", 1, "p50_us", BASELINE, 1.2, at_most=True),
    Target(
        f"{_S} cpu 2-client calls/s >= 1.7x its 1-client",
        "cpu",
        2,
        "calls_per_s",
        _S,
        1.7,
        reference_clients=1,
    ),
    Target(
        f"{FORWARDED} add p50 <= 2.0x {BASELINE}",
        "add",
        1,
        "p50_us",
        BASELINE,
        2.0,
        at_most=True,
        system=FORWARDED,
    ),
)


def check_targets(rows: dict[tuple[str, str, int], Row]) -> list[dict[str, Any]]:
    """Each target from per-round ratios, judged on their median across rounds."""
    results = []
    for target in TARGETS:
        row = rows.get((target.system, target.workload, target.clients))
        ratios = {}
        if row is not None:
            ratios = per_round_ratios(
                rows, row, target.reference, target.metric, target.reference_clients
            )
        value = _median(ratios.values())
        if value is None:
            status = "SKIP"
        elif value <= target.bound if target.at_most else value >= target.bound:
            status = "PASS"
        else:
            status = "FAIL"
        results.append(
            {
                "target": target.text,
                "status": status,
                "ratio": value,
                "bound": target.bound,
                "per_round": [ratios[n] for n in sorted(ratios)],
            }
        )
    return results


def against_limit(rows: dict[tuple[str, str, int], Row]) -> list[dict[str, Any]]:
    """scatter-local over tcp-msgspec, the limit Scatter aims at: same-round medians."""
    found = []
    for (system, workload, clients), row in sorted(rows.items()):
        if system != _S or (TCP_MSGSPEC, workload, clients) not in rows:
            continue
        p50 = _median(per_round_ratios(rows, row, TCP_MSGSPEC, "p50_us").values())
        rate = _median(per_round_ratios(rows, row, TCP_MSGSPEC, "calls_per_s").values())
        found.append({"workload": workload, "clients": clients, "p50": p50, "calls_per_s": rate})
    return found


CURVE_BOUND = 1.15
CURVE_TARGET = "scatter over TCP with CURVE: add p50 at most 1.15x Scatter over TCP without CURVE"


def curve_cost(rows: dict[tuple[str, str, int], Row]) -> dict[str, Any]:
    """What CURVE costs, on add p50 with one client, from same-round figures.

    The target: scatter-tcp over scatter-tcp-plain, the same node and client code over
    the same TCP endpoint with and without CURVE. When scatter-tcp-plain did not run,
    the target is judged on scatter-tcp over scatter-local instead (CURVE and TCP
    against a Unix socket: an upper bound). pyzmq with CURVE over pyzmq without is
    reported beside them, CURVE's raw cost on a bare round trip.
    """

    def row(system: str) -> Row | None:
        return rows.get((system, "add", 1))

    def ratios(system: str, reference: str) -> dict[int, float]:
        found = row(system)
        return per_round_ratios(rows, found, reference, "p50_us") if found else {}

    def summary(per_round: dict[int, float]) -> dict[str, Any]:
        return {
            "ratio": _median(per_round.values()),
            "per_round": [per_round[n] for n in sorted(per_round)],
        }

    direct = ratios(SCATTER_TCP, SCATTER_TCP_PLAIN)
    bound = ratios(SCATTER_TCP, "scatter-local")
    judged, how = (
        (direct, "scatter-tcp p50 / scatter-tcp-plain p50 (the same TCP path, CURVE on and off)")
        if direct
        else (bound, "scatter-tcp p50 / scatter-local p50 (an upper bound: CURVE and TCP)")
    )
    value = _median(judged.values())
    status = "SKIP" if value is None else "PASS" if value <= CURVE_BOUND else "FAIL"
    return {
        "what": "add p50, 1 client, same-round ratios (median across rounds)",
        "scatter_tcp_vs_plain": summary(direct),
        "scatter_tcp_vs_local": summary(bound),
        "pyzmq_curve_vs_plain": summary(ratios(CURVE_BASELINE, BASELINE)),
        "target": {
            "target": CURVE_TARGET,
            "status": status,
            "ratio": value,
            "bound": CURVE_BOUND,
            "per_round": [judged[n] for n in sorted(judged)],
            "how": how,
        },
    }


def _number(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _times(ratio: float | None) -> str:
    return "" if ratio is None else f"{ratio:.2f}x"


def print_report(report: dict[str, Any]) -> None:
    machine = report["machine"]
    settings = report["settings"]
    table = Table(
        box=box.SIMPLE_HEAD,
        title=(
            f"{machine['cpu_count']} x {machine['cpu_model']}, Python {machine['python']}, "
            f"{settings['rounds']} round(s) of {settings['duration_s']:g} s per measurement"
        ),
        caption=f"x base: ratio to {BASELINE} in the same round (median across rounds)",
    )
    for name in ("system", "workload"):
        table.add_column(name)
    for name in ("clients", "p50 us", "x base", "p99 us", "x base", "calls/s", "x base"):
        table.add_column(name, justify="right")
    if settings["rounds"] > 1:
        table.add_column("calls/s x base per round")
    previous = None
    for run_ in report["runs"]:
        group = (run_["workload"], run_["clients"])
        if previous is not None and group != previous:
            table.add_section()
        previous = group
        ratios = run_["vs_baseline"]
        cells = [
            run_["system"],
            run_["workload"],
            str(run_["clients"]),
            _number(run_["p50_us"], 1),
            _times(ratios["p50_us"]),
            _number(run_["p99_us"], 1),
            _times(ratios["p99_us"]),
            _number(run_["calls_per_s"], 0),
            _times(ratios["calls_per_s"]),
        ]
        if settings["rounds"] > 1:
            per_round = [r["vs_baseline"]["calls_per_s"] for r in run_["rounds"]]
            cells.append(" ".join("-" if r is None else f"{r:.2f}" for r in per_round))
        table.add_row(*cells)
    if report["runs"]:
        console.print(table)
    if report["publish"]:
        samples = report["publish"]["samples_ms"]
        console.print(
            f"@scatter returns in {report['publish']['median_ms']:.1f} ms "
            f"(median of {len(samples)} fresh publishes, min {min(samples):.1f}, "
            f"max {max(samples):.1f} ms)"
        )
    if report["map"]:
        rates = report["map"]["calls_per_s"]
        console.print(
            "pipelined (RemoteFunction.map, one process): "
            + ", ".join(f"{name} {value:,.0f}/s" for name, value in rates.items())
            + f"; add map {report['map']['add_map_vs_sequential']:.1f}x sequential, "
            f"cpu map on every core {report['map']['cpu_map_all_cores_vs_one']:.2f}x one worker"
        )
    if report["registry_scaling"]:
        scaling = report["registry_scaling"]
        large = f"{scaling['large_size']:,}"
        if scaling["large_size"] != scaling["requested_size"]:
            large += f" (of {scaling['requested_size']:,} asked: the fill hit its time limit)"
        console.print(
            f"@scatter with {scaling['small_size']:,} functions: "
            f"{scaling['small_median_ms']:.1f} ms, with {large}: "
            f"{scaling['large_median_ms']:.1f} ms ({scaling['ratio']:.2f}x); "
            f"medians of {len(scaling['small_samples_ms'])} new versions each, "
            f"fill took {scaling['fill_s']:.1f} s"
        )
    if not report["runs"]:
        for system in report["errors"]:
            console.print(f"[bold red]ERROR[/] {system} could not be measured (see above)")
        return
    if report["limit"]:
        console.print("\nscatter-local against tcp-msgspec, the limit (same-round medians):")
        for line in report["limit"]:
            console.print(
                f"  {line['workload']} x{line['clients']}: p50 {_times(line['p50'])}, "
                f"calls/s {_times(line['calls_per_s'])}"
            )
    curve = report["curve"]
    measured = (curve[key]["ratio"] for key in curve if key.endswith(("_plain", "_local")))
    if any(ratio is not None for ratio in measured):
        console.print("\nCURVE's cost (add p50, 1 client, same-round ratios):")
        for text, figures in (
            ("scatter-tcp (CURVE) vs scatter-tcp-plain (none)", curve["scatter_tcp_vs_plain"]),
            ("scatter-tcp (CURVE) vs scatter-local (ipc)", curve["scatter_tcp_vs_local"]),
            ("pyzmq CURVE vs plain", curve["pyzmq_curve_vs_plain"]),
        ):
            ratio, per_round = figures["ratio"], figures["per_round"]
            detail = "not measured in this run" if ratio is None else f"{ratio:.2f}x"
            if len(per_round) > 1:
                detail += f" (per round: {', '.join(f'{r:.2f}' for r in per_round)})"
            console.print(f"  {text}: {detail}")
    console.print("\ntargets (the issue's, from same-round ratios):")
    colours = {"PASS": "green", "FAIL": "bold red", "SKIP": "yellow"}
    for target in report["targets"]:
        status, ratio, per_round = target["status"], target["ratio"], target["per_round"]
        if ratio is None:
            detail = "not measured in this run"
        elif len(per_round) > 1:
            detail = f"{ratio:.2f}x (per round: {', '.join(f'{r:.2f}' for r in per_round)})"
        else:
            detail = f"{ratio:.2f}x"
        console.print(f"[{colours[status]}]{status}[/] {target['target']}: {detail}")
    for system in report["errors"]:
        console.print(f"[bold red]ERROR[/] {system} could not be measured (see above)")


# -- the command line ------------------------------------------------------------------


def _split(value: str | None, allowed: tuple[str, ...], what: str) -> tuple[str, ...]:
    if not value:
        return allowed
    chosen = tuple(dict.fromkeys(v.strip() for v in value.split(",") if v.strip()))
    unknown = [v for v in chosen if v not in allowed]
    if unknown:
        raise typer.BadParameter(
            f"unknown {what} {', '.join(unknown)}; choose from {', '.join(allowed)}"
        )
    # Keep the canonical order, so the table always reads the same way.
    return tuple(v for v in allowed if v in chosen)


def main(
    quick: Annotated[
        bool, typer.Option("--quick", help="One short round (about 1 s per measurement).")
    ] = False,
    rounds: Annotated[
        int | None, typer.Option(min=1, max=50, help="Rounds (default 3, or 1 with --quick).")
    ] = None,
    systems: Annotated[
        str | None, typer.Option(help=f"Comma-separated, from {','.join(SYSTEMS)}.")
    ] = None,
    workloads_: Annotated[
        str | None,
        typer.Option("--workloads", help=f"Comma-separated, from {','.join(workloads.WORKLOADS)}."),
    ] = None,
    output: Annotated[Path, typer.Option(help="Where to write the JSON results.")] = Path(
        "bench-results.json"
    ),
    duration: Annotated[
        float | None,
        typer.Option(
            min=0.1, max=120, help="Seconds per measurement (default 2, or 1 with --quick)."
        ),
    ] = None,
    registry_size: Annotated[
        int,
        typer.Option(
            min=SCALING_SMALL_SIZE + 1,
            max=100_000,
            help=f"Functions on the node for the second @scatter timing (the first: "
            f"{SCALING_SMALL_SIZE}).",
        ),
    ] = 5000,
    only_registry_scaling: Annotated[
        bool,
        typer.Option(
            "--only-registry-scaling",
            help="Only time @scatter with 10 and with --registry-size functions registered.",
        ),
    ] = False,
) -> None:
    """Benchmark Scatter against raw pyzmq REQ/REP and zeroapi (see the module docstring)."""
    settings = Settings(
        systems=_split(systems, SYSTEMS, "system"),
        workloads=_split(workloads_, workloads.WORKLOADS, "workload"),
        rounds=rounds or (1 if quick else 3),
        duration_s=duration or (1.0 if quick else 2.0),
        warmup_s=0.2 if quick else 0.5,
        publish_samples=20,
        quick=quick,
        registry_size=registry_size,
        only_registry_scaling=only_registry_scaling,
    )
    # A SIGTERM (nox interrupted, a CI timeout) unwinds normally: every server is killed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.monotonic()
    bench, machine = run(settings)
    report = build_report(bench, machine)
    report["settings"]["wall_s"] = round(time.monotonic() - started, 1)
    output.write_text(json.dumps(report, indent=2) + "\n")
    print_report(report)
    console.print(f"\nwrote {output} in {report['settings']['wall_s']:g} s")
    if report["errors"]:
        raise typer.Exit(1)


if __name__ == "__main__":
    if importlib.util.find_spec("scatter") is None:
        # A checkout that was not installed: use the scatter package next to cluster/.
        sys.path.insert(1, str(HERE.parent))
    typer.run(main)
