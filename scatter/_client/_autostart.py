"""Auto-start: a detached node for a client that finds none at its loopback address.

The node outlives the process that started it (its own session, its output in
``node.log`` in its data directory), so the next script finds it running.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from .._config import ENV_AUTOSTART, ClientConfig, data_dir_for, parse_address
from .._exceptions import ScatterError, Unreachable

_autostart_lock = threading.Lock()


def _new_lock_in_child() -> None:
    # A thread of the parent may have held it at the fork: the child would wait forever.
    global _autostart_lock
    _autostart_lock = threading.Lock()


os.register_at_fork(after_in_child=_new_lock_in_child)
# Detached nodes started by this process: kept referenced so that Popen's destructor does
# not warn about a child still running (it is meant to outlive us).
_background_nodes: list[subprocess.Popen[bytes]] = []


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=max(timeout, 0.01)):
            return True
    except OSError:
        return False


def nothing_listens(host: str, port: int, timeout: float = 0.5) -> bool:
    """Whether a connection to ``host:port`` is refused: nothing listens there for sure.
    A timeout proves nothing (a saturated backlog, a host that drops packets)."""
    try:
        with socket.create_connection((host, port), timeout=max(timeout, 0.01)):
            return False
    except ConnectionRefusedError:
        return True
    except OSError:
        return False


def ensure_listening(config: ClientConfig, wait: float = 60.0) -> None:
    """Make sure something listens at ``config.address``: start a node if allowed, and
    wait up to ``wait`` seconds for it to listen.

    Raises:
        Unreachable: nothing listens, and auto-start is off (or the node started did not
            listen within ``wait``).
    """
    host, port = parse_address(config.address)
    if port_open(host, port):
        return
    if not config.autostart:
        hint = ""
        if os.environ.get(ENV_AUTOSTART, "").strip() not in ("", "1", "true", "yes", "on"):
            hint = f", or unset {ENV_AUTOSTART} to let Scatter start one"
        raise Unreachable(
            f"no node answered at {config.address}; start one with `scatter node start`"
            + hint
        )
    # One start per process, however many threads found the port closed at once.
    with _autostart_lock:
        if not port_open(host, port):
            start_background_node(config.address, config.data_dir, announce=True, wait=wait)


def start_background_node(
    address: str,
    data_dir: Path | None = None,
    *,
    announce: bool = False,
    wait: float = 60.0,
    node_options: list[str] | None = None,
) -> int:
    """Start a detached node process (it outlives this one) and wait until it answers.

    Returns:
        the node's pid.

    Raises:
        ScatterError: the node exited before it listened (its log's last lines say why:
            a data directory in use, a bad option).
        Unreachable: it still did not listen after ``wait`` seconds.
    """
    directory = data_dir or data_dir_for(address)
    directory.mkdir(parents=True, exist_ok=True)
    log_path = directory / "node.log"
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "scatter._node",
                "--address",
                address,
                "--data-dir",
                str(directory),
                *(node_options or []),
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
            close_fds=True,
        )
    _background_nodes.append(process)
    if announce:
        print(
            f"scatter: no node answered at {address}; started one in the background "
            f"(pid {process.pid}, log {log_path})",
            file=sys.stderr,
        )
    host, port = parse_address(address)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if port_open(host, port):
            return process.pid
        if process.poll() is not None and not port_open(host, port):
            # Not Unreachable: the node did not fail to answer, it failed to start.
            tail = log_path.read_text(errors="replace").strip().splitlines()[-3:]
            raise ScatterError(
                f"the background node exited with code {process.returncode}: "
                + " | ".join(tail)
            )
        time.sleep(0.05)
    raise Unreachable(f"the background node did not start listening at {address} in {wait:g} s")
