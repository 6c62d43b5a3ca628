"""Launch real Scatter nodes on free loopback ports, and stop or break them by PID.

Used by the tests, the benchmark and by hand::

    python -m cluster.launch --nodes 1      # prints each node's address and pid, Ctrl-C stops

A ``LocalNode`` owns one node process (and through it, its worker processes, which die
with it). Nothing is ever stopped by name: only the PIDs this module started.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (the kernel's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``condition`` until it holds; AssertionError naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting until {what}")
        time.sleep(0.02)


def process_gone(pid: int) -> bool:
    """True once ``pid`` has exited (a zombie awaiting its reaper counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def child_pids(parent: int) -> list[int]:
    """The live (not zombie) children of ``parent``: a node's children are its workers."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == parent and fields[0] != "Z":
            pids.append(int(stat.parent.name))
    return pids


def kill_if_alive(pid: int) -> None:
    """SIGKILL ``pid`` (one this process started or looked up) unless it is gone already."""
    if not process_gone(pid):
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: process_gone(pid), 10, f"pid {pid} dies after SIGKILL")


@dataclass
class LocalNode:
    """One node process on loopback, with its own data directory."""

    data_dir: Path
    host: str = "127.0.0.1"
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    options: list[str] = field(default_factory=list)  # more `python -m scatter._node` flags
    env: dict[str, str] = field(default_factory=dict)  # more environment for the node
    # A cgroup v2 directory the node (and so its workers) starts in: the chaos rig's
    # nftables rules match a node's sockets by it (cluster/chaos.py).
    cgroup: Path | None = None

    @property
    def address(self) -> str:
        return f"tcp://{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        assert self.process is not None, "node not started"
        return self.process.pid

    def start(self, timeout: float = 30.0) -> LocalNode:
        """Start the node and wait until it accepts connections."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.data_dir / "node.log"
        env = dict(os.environ, SCATTER_AUTOSTART="0", **self.env)
        # A restarted node appends to the same log: only what this start writes counts.
        log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "scatter._node",
                    "--address",
                    self.address,
                    "--data-dir",
                    str(self.data_dir),
                    *self.options,
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=env,
                preexec_fn=None if self.cgroup is None else self._enter_cgroup,
            )
        # The node prints its ready line once its workers and control socket are up; an
        # open port alone could be another process, or a node about to be refused.
        deadline = time.monotonic() + timeout
        while not self._printed_ready_line(log_offset):
            if self.process.poll() is not None:
                raise RuntimeError(f"node exited with {self.process.returncode}: {self.log()}")
            if time.monotonic() > deadline:
                self.kill()
                raise TimeoutError(f"node at {self.address} did not listen in {timeout} s")
            time.sleep(0.02)
        return self

    def _enter_cgroup(self) -> None:
        # In the child, before exec: every socket the node ever opens is then the cgroup's.
        assert self.cgroup is not None
        (self.cgroup / "cgroup.procs").write_text("0")

    def _printed_ready_line(self, log_offset: int) -> bool:
        assert self.log_path is not None
        with open(self.log_path, "rb") as log:
            log.seek(log_offset)
            return f"listening at {self.address}".encode() in log.read()

    def log(self) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL if it does not exit in time."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """SIGKILL: the node gets no chance to clean up (its workers die with it)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def pause(self) -> None:
        os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.pid, signal.SIGCONT)

    def __enter__(self) -> LocalNode:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


@dataclass
class LocalCluster:
    """N nodes on loopback forming one cluster: node i joins through node i - 1, so the
    cluster is chained as memberlist's integration test chains it.

    Resource handling: every node is a process of its own, stopped by PID in
    :meth:`stop` (SIGTERM, then SIGKILL).
    """

    root: Path
    size: int
    profile: str = "local"
    nodes: list[LocalNode] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)  # more environment for every node

    def start(self, timeout: float = 60.0) -> LocalCluster:
        try:
            for i in range(self.size):
                options = ["--profile", self.profile]
                if self.nodes:
                    options += ["--join", self.nodes[-1].address]
                node = LocalNode(self.root / f"node-{i}", options=options, env=dict(self.env))
                self.nodes.append(node.start())
            self.wait_until_joined(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_until_joined(self, timeout: float) -> None:
        """Until every node lists every node alive (its own view, over its control socket)."""
        import scatter  # here: the launcher itself runs without the client stack loaded

        deadline = time.monotonic() + timeout
        for node in self.nodes:
            with scatter.Client(node.address, autostart=False) as client:
                while True:
                    alive = {m["node"] for m in client.members() if m["state"] == "alive"}
                    if len(alive) >= len(self.nodes):
                        break
                    if time.monotonic() > deadline:
                        raise TimeoutError(
                            f"{node.address} sees {len(alive)} of {len(self.nodes)} members "
                            f"alive after {timeout:g} s"
                        )
                    time.sleep(0.05)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m cluster.launch",
        description="Start N Scatter nodes on loopback as one cluster; Ctrl-C stops them.",
    )
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--data-root", type=Path, default=None)
    parser.add_argument("--profile", choices=("lan", "local"), default="local")
    args = parser.parse_args(argv)
    root = args.data_root or Path(tempfile.mkdtemp(prefix="scatter-cluster-"))
    cluster = LocalCluster(root, args.nodes, args.profile)

    def stop_on_sigterm(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # so that `finally` stops every node by its PID

    signal.signal(signal.SIGTERM, stop_on_sigterm)
    try:
        cluster.start()
        for node in cluster.nodes:
            print(f"{node.address} pid {node.pid} data {node.data_dir}", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            while all(n.process is not None and n.process.poll() is None for n in cluster.nodes):
                time.sleep(0.5)
    finally:
        cluster.stop()


if __name__ == "__main__":
    main()
