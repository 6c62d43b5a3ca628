"""The command line over real node processes.

Every command runs through typer's CliRunner (in this process, against the ``node``
fixture); a few also run as ``python -m scatter`` subprocesses, the way a user runs them.
A node started in the background by the CLI is stopped by the CLI, and killed by its pid
in a ``finally`` if it is still there.
"""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

import scatter
from cluster.launch import LocalNode, free_port, kill_if_alive, port_open, process_gone
from scatter._cli import app, cli_arguments
from tests.waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()


def cli(address: str | None, *args: str) -> Result:
    """``scatter [--address ADDRESS] ARGS...`` in this process, wide enough for tables."""
    prefix = ["--address", address] if address else []
    return runner.invoke(app, [*prefix, *args], env={"COLUMNS": "200"})


def cli_process(
    address: str, *args: str, timeout: float = 60.0
) -> subprocess.CompletedProcess[str]:
    """``python -m scatter --address ADDRESS ARGS...`` as a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "scatter", "--address", address, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=dict(os.environ, COLUMNS="200"),
    )


def one_error_line(stderr: str) -> str:
    """The CLI's error: exactly one line, starting with ``error: ``."""
    lines = stderr.strip("\n").splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got: {stderr!r}"
    assert lines[0].startswith("error: "), lines[0]
    return lines[0]


# ---------------------------------------------------------------- functions to publish


@dataclass
class Point:
    x: float
    y: float


def add(a: int, b: int) -> int:
    return a + b


def add3(a: int, b: int, c: int) -> int:
    return a + b + c


def greet(name: str, punct: str = "!") -> str:
    return f"hello {name}{punct}"


def total(xs: list[float]) -> float:
    return sum(xs)


def norm(p: Point, scale: float = 1.0) -> float:
    return float((p.x**2 + p.y**2) ** 0.5 * scale)


def half(p: Point) -> Point:
    return Point(p.x / 2, p.y / 2)


def to_complex(real: float, imag: float) -> complex:
    return complex(real, imag)


def boom(x: int) -> int:
    raise ValueError(f"boom {x}")


def publish(client: scatter.Client, *functions: object, name: str | None = None) -> None:
    for fn in functions:
        client.publish(fn, name=name)  # type: ignore[arg-type]


# ---------------------------------------------------------------- help


def test_help_lists_every_command() -> None:
    result = cli(None, "--help")
    assert result.exit_code == 0, result.output
    for command in ("node", "ls", "versions", "show", "rollback", "rm", "call", "--address"):
        assert command in result.stdout
    node_help = cli(None, "node", "--help")
    assert node_help.exit_code == 0, node_help.output
    for command in ("start", "stop", "status"):
        assert command in node_help.stdout


# ---------------------------------------------------------------- listing and history


@pytest.mark.timeout(60)
def test_ls_lists_functions_with_current_version_and_signature(
    node: LocalNode, client: scatter.Client
) -> None:
    empty = cli(node.address, "ls")
    assert empty.exit_code == 0, empty.output
    assert "no functions" in empty.stdout

    publish(client, add, greet)
    result = cli(node.address, "ls")
    assert result.exit_code == 0, result.output
    lines = {line.split()[1]: line for line in result.stdout.splitlines() if "│" in line}
    assert "v1" in lines["add"]
    assert "(a: int, b: int) -> int" in lines["add"]
    assert "(name: str, punct: str = '!') -> str" in lines["greet"]


@pytest.mark.timeout(60)
def test_versions_marks_the_current_version_and_show_prints_its_source(
    node: LocalNode, client: scatter.Client
) -> None:
    publish(client, add)
    publish(client, add3, name="add")

    result = cli(node.address, "versions", "add")
    assert result.exit_code == 0, result.output
    rows = [line for line in result.stdout.splitlines() if re.search(r"│\s+v\d", line)]
    assert len(rows) == 2, result.stdout
    v1, v2 = rows
    assert "(a: int, b: int) -> int" in v1 and "*" not in v1
    assert "(a: int, b: int, c: int) -> int" in v2 and "*" in v2

    current = cli(node.address, "show", "add")
    assert current.exit_code == 0, current.output
    assert "def add3(a: int, b: int, c: int) -> int:" in current.stdout
    assert "return a + b + c" in current.stdout
    first = cli(node.address, "show", "add", "--version", "1")
    assert first.exit_code == 0, first.output
    assert "return a + b\n" in first.stdout

    missing = cli(node.address, "show", "add", "--version", "9")
    assert missing.exit_code == 1
    assert "no version 9" in one_error_line(missing.stderr)


@pytest.mark.timeout(60)
def test_rollback_and_rm_change_what_the_node_serves(
    node: LocalNode, client: scatter.Client
) -> None:
    publish(client, add)
    publish(client, add3, name="add")

    back = cli(node.address, "rollback", "add")
    assert back.exit_code == 0, back.output
    assert "add: version 1 is current" in back.stdout
    assert client.current_version("add") == 1

    forward = cli(node.address, "rollback", "add", "--to", "2")
    assert forward.exit_code == 0, forward.output
    assert client.current_version("add") == 2

    nowhere = cli(node.address, "rollback", "add", "--to", "7")
    assert nowhere.exit_code == 1
    assert "no version 7" in one_error_line(nowhere.stderr)

    gone = cli(node.address, "rm", "add")
    assert gone.exit_code == 0, gone.output
    assert "add: vaporized" in gone.stdout
    with pytest.raises(scatter.FunctionNotFound):
        client.make_callable("add")
    assert "no functions" in cli(node.address, "ls").stdout

    again = cli(node.address, "rm", "add")
    assert again.exit_code == 1
    assert "'add'" in one_error_line(again.stderr)


# ---------------------------------------------------------------- call


@pytest.mark.timeout(60)
def test_call_converts_each_argument_by_its_parameter(
    node: LocalNode, client: scatter.Client
) -> None:
    publish(client, add, greet, total, norm, half, to_complex)
    cases = [
        (["add", "1", "2"], "3"),  # JSON: ints
        (["add", "1", "b=5"], "6"),  # key=value
        (["add", "-5", "3"], "-2"),  # a negative number is a value, not an option
        (["greet", "42"], '"hello 42!"'),  # str parameter: taken raw
        (["greet", "name=Bob", "punct=?"], '"hello Bob?"'),
        (["total", "[1.5, 2]"], "3.5"),  # a JSON list
        (["norm", '{"x": 3, "y": 4}', "scale=2"], "10.0"),  # a dataclass from a JSON object
        (["half", '{"x": 3, "y": 4}'], '{"x":1.5,"y":2.0}'),  # a dataclass result, as JSON
        (["to_complex", "1", "2"], "(1+2j)"),  # no JSON form for complex: repr
    ]
    for args, expected in cases:
        result = cli(node.address, "call", *args)
        assert result.exit_code == 0, (args, result.output)
        assert result.stdout == expected + "\n", args


@pytest.mark.timeout(60)
def test_call_runs_a_pinned_version(node: LocalNode, client: scatter.Client) -> None:
    publish(client, add)
    publish(client, add3, name="add")
    assert cli(node.address, "call", "add", "1", "2", "3").stdout == "6\n"
    pinned = cli(node.address, "call", "add", "1", "2", "--version", "1")
    assert pinned.exit_code == 0, pinned.output
    assert pinned.stdout == "3\n"


@pytest.mark.timeout(60)
def test_call_errors_are_one_line_and_exit_1(node: LocalNode, client: scatter.Client) -> None:
    publish(client, add, boom)
    cases = [
        (["add", "1"], "add() missing 1 required positional argument: 'b'"),  # Python's words
        (["add", "x", "2"], "Expected `int`, got `str`"),  # ValidationError
        (["add", "1", "2", "3"], "takes 2 positional arguments but 3 were given"),
        (["add", "a=1", "2"], "follows a key=value argument"),
        (["boom", "3"], "ValueError: boom 3"),  # RemoteError, without its traceback
        (["nope"], "no function named 'nope'"),
        (["add", "1", "2", "--version", "5"], "no version 5"),
    ]
    for args, expected in cases:
        result = cli(node.address, "call", *args)
        assert result.exit_code == 1, (args, result.output)
        assert expected in one_error_line(result.stderr), args
        assert result.stdout == "", args


def test_cli_arguments_follow_the_signature() -> None:
    def f(a: int, b: str, *rest: float, flag: bool = False, **extra: list[int]) -> None: ...

    signature = inspect.signature(f, eval_str=True)  # as the callable carries it
    args, kwargs = cli_arguments(signature, ["1", "2", "3", "4.5", "flag=true", "xs=[1, 2]"])
    assert args == [1, "2", 3, 4.5]  # b is a str: taken raw; *rest: JSON
    assert kwargs == {"flag": True, "xs": [1, 2]}
    assert cli_arguments(signature, ["x", "=y"]) == (["x", "=y"], {})  # not JSON: a string
    with pytest.raises(TypeError, match="given twice"):
        cli_arguments(signature, ["1", "2", "flag=true", "flag=false"])
    with pytest.raises(TypeError, match="follows a key=value argument"):
        cli_arguments(signature, ["flag=true", "1"])


# ---------------------------------------------------------------- errors without a node


def test_commands_without_a_node_fail_with_one_line() -> None:
    address = f"tcp://127.0.0.1:{free_port()}"
    for args in (["ls"], ["versions", "add"], ["call", "add", "1"], ["node", "status"]):
        result = cli(address, *args)
        assert result.exit_code == 1, (args, result.output)
        assert f"no node answered at {address}" in one_error_line(result.stderr)
    assert not port_open("127.0.0.1", int(address.rsplit(":", 1)[1]))  # nothing auto-started


def test_a_bad_address_is_one_line() -> None:
    result = cli("nonsense", "ls")
    assert result.exit_code == 1
    assert "bad node address 'nonsense'" in one_error_line(result.stderr)


def test_a_bad_scatter_address_variable_names_it() -> None:
    result = runner.invoke(app, ["ls"], env={"SCATTER_ADDRESS": "http://x"})
    assert result.exit_code == 1
    assert "SCATTER_ADDRESS" in one_error_line(result.stderr)


def test_node_start_refuses_a_non_loopback_address(tmp_path: Path) -> None:
    result = cli(
        None, "node", "start", "--address", "tcp://10.1.2.3:4242", "--data-dir", str(tmp_path)
    )
    assert result.exit_code == 1
    assert "refusing to listen on tcp://10.1.2.3:4242" in one_error_line(result.stderr)


# ---------------------------------------------------------------- node


@pytest.mark.timeout(60)
def test_node_status_describes_the_node(node: LocalNode, client: scatter.Client) -> None:
    publish(client, add)
    result = cli(node.address, "node", "status")
    assert result.exit_code == 0, result.output
    fields = dict(
        re.split(r"\s{2,}", line.strip(), maxsplit=1)
        for line in result.stdout.splitlines()
        if line.strip()
    )
    assert fields["pid"] == str(node.pid)
    assert fields["address"] == node.address
    assert fields["data dir"] == str(node.data_dir)
    assert fields["functions"] == "1 (1 changes applied)"
    assert fields["versions"] == "1"
    assert re.fullmatch(r"(\d+[dhm] )*\d+s", fields["uptime"])
    for key in ("node id", "workers", "leases"):
        assert fields[key]


@pytest.mark.timeout(60)
def test_the_cli_as_a_subprocess(node: LocalNode, client: scatter.Client) -> None:
    publish(client, add)
    called = cli_process(node.address, "call", "add", "2", "3")
    assert called.returncode == 0, called.stderr
    assert called.stdout == "5\n"

    listed = cli_process(node.address, "ls")
    assert listed.returncode == 0, listed.stderr
    assert "(a: int, b: int) -> int" in listed.stdout

    failed = cli_process(node.address, "call", "add", "2")
    assert failed.returncode == 1
    assert "missing 1 required positional argument: 'b'" in one_error_line(failed.stderr)
    assert "Traceback" not in failed.stderr


@pytest.mark.timeout(90)
def test_node_start_background_then_status_then_stop(tmp_path: Path) -> None:
    address = f"tcp://127.0.0.1:{free_port()}"
    data_dir = tmp_path / "background-node"
    started = cli_process(address, "node", "start", "--background", "--data-dir", str(data_dir))
    assert started.returncode == 0, started.stderr
    match = re.search(r"pid (\d+)", started.stdout)
    assert match, started.stdout
    pid = int(match.group(1))
    try:
        assert f"started a node at {address}" in started.stdout

        status = cli(address, "node", "status")
        assert status.exit_code == 0, status.output
        assert re.search(rf"^pid\s+{pid}\s*$", status.stdout, re.MULTILINE), status.stdout
        assert str(data_dir) in status.stdout

        twice = cli(address, "node", "start", "--background", "--data-dir", str(data_dir))
        assert twice.exit_code == 1
        assert f"a node already runs at {address} (pid {pid})" in one_error_line(twice.stderr)

        stopped = cli(address, "node", "stop")
        assert stopped.exit_code == 0, stopped.output
        assert f"(pid {pid})" in stopped.stdout
        wait_until(lambda: process_gone(pid), 15, f"node pid {pid} exits")
        assert not port_open("127.0.0.1", int(address.rsplit(":", 1)[1]))

        after = cli(address, "node", "stop")
        assert after.exit_code == 1
        assert "no node answered" in one_error_line(after.stderr)
    finally:
        kill_if_alive(pid)


@pytest.mark.timeout(90)
def test_node_start_in_the_foreground_serves_until_stopped(tmp_path: Path) -> None:
    address = f"tcp://127.0.0.1:{free_port()}"
    data_dir = tmp_path / "foreground-node"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "scatter",
            "node",
            "start",
            "--address",
            address,
            "--data-dir",
            str(data_dir),
        ],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        port = int(address.rsplit(":", 1)[1])
        wait_until(
            lambda: port_open("127.0.0.1", port) or process.poll() is not None,
            30,
            "the foreground node listens",
        )
        assert process.poll() is None, process.communicate()

        status = cli(address, "node", "status")
        assert status.exit_code == 0, status.output
        assert re.search(rf"^pid\s+{process.pid}\s*$", status.stdout, re.MULTILINE)

        stopped = cli(address, "node", "stop")
        assert stopped.exit_code == 0, stopped.output
        _out, err = process.communicate(timeout=15)
        assert process.returncode == 0, err
        assert b"Traceback" not in err
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()
