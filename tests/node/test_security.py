"""Secure by default: only holders of the secret reach a node, and roles hold."""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

import scatter
from cluster.launch import LocalNode, kill_if_alive
from scatter import _wire
from scatter._config import default_address
from scatter._security import call_only_secret, new_secret

ROOT = Path(__file__).resolve().parents[2]


def add(a: int, b: int) -> int:
    return a + b


@pytest.mark.timeout(60)
def test_a_client_with_the_wrong_secret_is_refused_at_once_and_others_go_on(
    client: scatter.Client, node: LocalNode
) -> None:
    client.publish(add)
    started = time.monotonic()
    with (
        scatter.Client(node.address, autostart=False, secret=new_secret()) as stranger,
        pytest.raises(scatter.AuthenticationError, match="check SCATTER_SECRET"),
    ):
        stranger.functions()
    assert time.monotonic() - started < 3.0  # the handshake says so, not a timeout
    assert client.make_callable("add")(1, 2) == 3  # the node serves the right ones
    # The stranger's client knocked again and again; the node said so once.
    assert node.log().count("refused a client at 127.0.0.1") == 1, node.log()


@pytest.mark.timeout(60)
def test_a_call_only_secret_may_call_but_change_nothing(
    client: scatter.Client, node: LocalNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    client.publish(add)
    cluster_secret = (Path(os.environ["XDG_DATA_HOME"]) / "scatter" / "secret").read_text()
    with scatter.Client(
        node.address, autostart=False, secret=call_only_secret(cluster_secret.strip())
    ) as caller:
        assert caller.make_callable("add")(2, 3) == 5
        assert [f["name"] for f in caller.functions()] == ["add"]
        assert caller.describe("add").version == 1
        with pytest.raises(scatter.AuthenticationError, match="call-only secret"):
            caller.publish(add, name="other")
        with pytest.raises(scatter.AuthenticationError, match="call-only secret"):
            caller.vaporize("add")
        with pytest.raises(scatter.AuthenticationError, match="call-only secret"):
            caller.shutdown()
    assert client.current_version("add") == 1
    assert client.status().pid == node.pid


def _raw(endpoint: str, frame: bytes) -> bytes | None:
    context = zmq.Context()
    try:
        sock = context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoint)
        sock.send(frame)
        return sock.recv() if sock.poll(1500) else None
    finally:
        context.destroy(linger=0)


@pytest.mark.timeout(60)
def test_a_raw_socket_without_curve_gets_nothing_from_node_or_worker(
    client: scatter.Client, node: LocalNode
) -> None:
    client.publish(add)
    leased: _wire.Leased = client.request(lambda i: _wire.Lease(i))
    assert leased.endpoint.startswith("tcp://")
    for endpoint in (node.address, leased.endpoint):
        assert _raw(endpoint, _wire.encoder.encode(_wire.ListFunctions(1))) is None, endpoint
    assert client.make_callable("add")(1, 1) == 2


@pytest.mark.timeout(60)
def test_transport_tcp_calls_workers_over_curve_on_loopback_too(
    client: scatter.Client, node: LocalNode
) -> None:
    client.publish(add)
    assert client.make_callable("add")(1, 2) == 3
    assert [c.endpoint[:6] for c in client._pool.idle] == ["ipc://"]  # the same-user fast path
    with scatter.Client(node.address, autostart=False, transport="tcp") as tcp:
        assert tcp.make_callable("add")(2, 3) == 5
        assert [c.endpoint[:6] for c in tcp._pool.idle] == ["tcp://"]
    with pytest.raises(scatter.ConfigError, match="transport"):
        scatter.Client(node.address, autostart=False, transport="udp")  # type: ignore[arg-type]


@pytest.mark.timeout(60)
def test_the_data_directory_and_the_user_secret_are_private(
    client: scatter.Client, node: LocalNode
) -> None:
    client.publish(add)
    secret_file = Path(os.environ["XDG_DATA_HOME"]) / "scatter" / "secret"
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(node.data_dir.stat().st_mode) == 0o700
    for path in node.data_dir.rglob("*"):
        if path.is_file() and not path.name.endswith(".log"):
            mode = stat.S_IMODE(path.stat().st_mode)
            assert not mode & 0o077, f"{path} is {mode:o}"


# -- a second OS user -----------------------------------------------------------


def _can_switch_users() -> str:
    if os.geteuid() != 0:
        return "needs root to create a second OS user"
    if shutil.which("useradd") is None:
        return "needs useradd to create a second OS user"
    return ""


@pytest.fixture
def other_user(tmp_path: Path) -> Iterator[pwd.struct_passwd]:
    reason = _can_switch_users()
    if reason:
        pytest.skip(reason)
    name = f"sct{os.getpid() % 100000}"
    home = Path(tempfile.mkdtemp(prefix="scatter-other-home-"))
    subprocess.run(
        ["useradd", "--no-create-home", "--home-dir", str(home), "--shell", "/bin/sh", name],
        check=True,
        capture_output=True,
    )
    # The other user must be able to run this very Python (under /root with pyenv, say):
    # directories on its path get search permission for "other" during the test, and
    # only that (no listing, no reading), then their modes come back.
    opened: list[tuple[Path, int]] = []
    for directory in [*Path(sys.executable).parents, *ROOT.parents, ROOT]:
        mode = directory.stat().st_mode
        if not mode & stat.S_IXOTH:
            opened.append((directory, stat.S_IMODE(mode)))
            directory.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)
    try:
        user = pwd.getpwnam(name)
        os.chown(home, user.pw_uid, user.pw_gid)
        yield user
    finally:
        for directory, mode in opened:
            directory.chmod(mode)
        subprocess.run(["userdel", name], capture_output=True)
        shutil.rmtree(home, ignore_errors=True)


def _as_user(user: pwd.struct_passwd, script: str, env: dict[str, str], timeout: float = 60.0) -> str:
    def drop() -> None:
        os.setgid(user.pw_gid)
        os.setgroups([])
        os.setuid(user.pw_uid)

    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        env={
            "PATH": os.environ["PATH"],
            "HOME": user.pw_dir,
            "PYTHONPATH": str(ROOT),
            "SCATTER_AUTOSTART": "0",
            **env,
        },
        cwd=user.pw_dir,
        preexec_fn=drop,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.timeout(120)
def test_another_os_user_cannot_use_read_or_stop_the_node_and_gets_its_own(
    other_user: pwd.struct_passwd, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A world-traversable place, so that only the node's own modes keep the other out.
    shared = Path(tempfile.mkdtemp(prefix="scatter-shared-"))
    shared.chmod(0o755)
    monkeypatch.setenv("XDG_DATA_HOME", str(shared / "xdg"))
    node = LocalNode(shared / "node").start()
    own_pid = None
    try:
        with scatter.Client(node.address, autostart=False) as client:
            client.publish(add)
        report = _as_user(
            other_user,
            f"""
            import os, scatter
            from pathlib import Path

            def mine(a: int) -> int:
                return a

            outcomes = []
            for attempt in ("functions", "publish", "shutdown"):
                try:
                    with scatter.Client({node.address!r}, autostart=False) as c:
                        if attempt == "functions":
                            c.functions()
                        elif attempt == "publish":
                            c.publish(mine)
                        else:
                            c.shutdown()
                    outcomes.append(f"{{attempt}}: allowed")
                except scatter.ScatterError as exc:
                    outcomes.append(f"{{attempt}}: {{type(exc).__name__}}")
            for path in ({str(shared / "xdg" / "scatter" / "secret")!r},
                         {str(node.data_dir / "registry" / "cache.db")!r}):
                try:
                    Path(path).read_bytes()
                    outcomes.append(f"read {{path}}: allowed")
                except PermissionError:
                    outcomes.append("read: refused")
            print("\\n".join(outcomes))
            """,
            env={},
        )
        assert "allowed" not in report, report
        assert report.count("AuthenticationError") == 3, report
        assert report.count("read: refused") == 2, report
        with scatter.Client(node.address, autostart=False) as client:
            assert client.make_callable("add")(1, 2) == 3  # still up, still ours
        # By default the other user's client finds (or starts) a node of its own.
        own = _as_user(
            other_user,
            """
            import scatter

            def twice(x: int) -> int:
                return 2 * x

            client = scatter.Client()
            client.publish(twice)
            print(client.address, client.status().pid, client.make_callable("twice")(21))
            """,
            env={"SCATTER_AUTOSTART": "1"},
        )
        address, pid, result = own.split()
        own_pid = int(pid)
        assert address == default_address(other_user.pw_uid) != node.address
        assert result == "42"
    finally:
        if own_pid is not None:
            kill_if_alive(own_pid)
        node.stop()
        shutil.rmtree(shared, ignore_errors=True)
