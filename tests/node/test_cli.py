"""The command line over real node processes.

Every command runs through typer's CliRunner (in this process, against the ``node``
fixture); a few also run as ``python -m scatter`` subprocesses, the way a user runs them.
A node started in the background by the CLI is stopped by the CLI, and killed by its pid
in a ``finally`` if it is still there.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import msgspec
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


def configure(
    point: Point,
    scale: float = 1.0,
    *,
    labels: dict[str, list[float]] | None = None,
    note: str = "a, b",
    strict: bool = False,
) -> dict[str, float]:
    return {"scale": scale}


def size(data: bytes, *, factor: float = 1.0) -> float:
    return len(data) * factor


def same(x: float) -> list[float]:
    return [x, x]


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
    lines = {
        line.split()[0]: line
        for line in result.stdout.splitlines()
        if re.match(r"\w+\s+v\d", line)
    }
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
    rows = [line for line in result.stdout.splitlines() if re.match(r"[* ]\s+v\d", line)]
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


def cli_at(address: str, columns: int, *args: str) -> Result:
    """``scatter --address ADDRESS ARGS...`` as piped to a console ``columns`` wide."""
    return runner.invoke(app, ["--address", address, *args], env={"COLUMNS": str(columns)})


@pytest.mark.timeout(60)
@pytest.mark.parametrize("columns", [80, 60])
def test_ls_and_versions_fit_the_width_and_wrap_signatures_whole(
    node: LocalNode, client: scatter.Client, columns: int
) -> None:
    publish(client, add, greet, configure)
    publish(client, add3, name="add")
    node_id = client.status().node_id
    signature = (
        "(point: tests.node.test_cli.Point, scale: float = 1.0, *, "
        "labels: dict[str, list[float]] | None = None, note: str = 'a, b', "
        "strict: bool = False) -> dict[str, float]"
    )
    for args in (["ls"], ["versions", "add"], ["versions", "configure"]):
        result = cli_at(node.address, columns, *args)
        assert result.exit_code == 0, result.output
        lines = result.stdout.splitlines()
        assert max(len(line) for line in lines) <= columns, result.stdout
        assert "…" not in result.stdout  # nothing cut short
        # The origin is the same on every row: said once, under the table.
        assert result.stdout.count(node_id) == 1, result.stdout
        assert lines[-1].endswith(f"all published through node {node_id}")
    listing = cli_at(node.address, columns, "ls").stdout
    # Wrapped between parameters: the lines of the signature joined with a space.
    start = listing.index("(point:")
    wrapped = " ".join(
        line.strip() for line in listing[start:].splitlines()[:-1] if not re.match(r"\w", line)
    )
    assert wrapped.startswith(signature), listing
    lines = listing.splitlines()
    row = next(i for i, line in enumerate(lines) if line.startswith("configure "))
    if columns == 80:  # on its row, wrapped
        assert lines[row].endswith("  (point: tests.node.test_cli.Point,"), listing
    else:  # too narrow for a signature column: under its row
        assert lines[row + 1].startswith("    (point: tests.node.test_cli.Point,"), listing
    history = cli_at(node.address, columns, "versions", "add").stdout
    assert "(a: int, b: int, c: int) -> int" in history
    assert re.search(r"^\*\s+v2\s", history, re.MULTILINE), history


def test_versions_keeps_a_conflict_readable_at_60_columns(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rows = [
        {"name": "add", "version": v, "current": v == 2, "change_id": f"{o}:1", "origin": o,
         "created_at": 1.7e9, "proposed_version": 1, "conflict": v == 2,
         "content_id": f"{v}" * 32, "signature_text": "(a: int, b: int) -> int"}
        for v, o in ((1, "n1aaaaaaaaaa"), (2, "n2bbbbbbbbbb"))
    ]
    monkeypatch.setattr(scatter.Client, "versions", lambda self, name: rows)
    address = f"tcp://127.0.0.1:{free_port()}"  # never asked: versions() is replaced
    for columns in (200, 60):
        result = cli_at(address, columns, "versions", "add")
        assert result.exit_code == 0, result.output
        assert "proposed as v1, renumbered" in result.stdout
        assert max(len(line) for line in result.stdout.splitlines()) <= columns
        assert "n1aaaaaaaaaa" in result.stdout and "n2bbbbbbbbbb" in result.stdout  # they differ
    assert "    conflict: proposed as v1, renumbered" in result.stdout  # under its row at 60


@pytest.mark.timeout(60)
def test_json_gives_the_records_of_the_python_api(node: LocalNode, client: scatter.Client) -> None:
    publish(client, add, greet)
    publish(client, add3, name="add")

    listed = cli_at(node.address, 60, "ls", "--json")
    assert listed.exit_code == 0, listed.output
    functions = scatter.functions(address=node.address)
    assert json.loads(listed.stdout) == msgspec.to_builtins(functions)

    history = cli_at(node.address, 60, "versions", "add", "--json")
    assert history.exit_code == 0, history.output
    assert json.loads(history.stdout) == msgspec.to_builtins(
        scatter.versions("add", address=node.address)
    )
    newest = json.loads(cli_at(node.address, 60, "versions", "add", "--json", "--limit", "1").stdout)
    assert [row["version"] for row in newest] == [2]

    shown = json.loads(cli_at(node.address, 60, "show", "add", "--json", "-v", "1").stdout)
    assert (shown["name"], shown["version"], shown["current_version"]) == ("add", 1, 2)
    assert shown["signature_text"] == "(a: int, b: int) -> int"
    assert "return a + b\n" in shown["source"]

    status = json.loads(cli_at(node.address, 60, "node", "status", "--json").stdout)
    assert status["pid"] == node.pid and status["address"] == node.address
    assert status["functions"] == 2 and status["members"][0]["state"] == "alive"


@pytest.mark.timeout(60)
def test_versions_limit_shows_the_newest(node: LocalNode, client: scatter.Client) -> None:
    publish(client, add)
    publish(client, add3, name="add")
    publish(client, add, name="add")  # v3: add's body again
    result = cli(node.address, "versions", "add", "--limit", "2")
    assert result.exit_code == 0, result.output
    rows = re.findall(r"^[* ]\s+(v\d)\s", result.stdout, re.MULTILINE)
    assert rows == ["v2", "v3"], result.stdout
    assert "newest 2 of 3 versions" in result.stdout
    assert cli(node.address, "versions", "add", "--limit", "0").exit_code == 2  # usage error


def test_version_flag_prints_scatters_version() -> None:
    result = cli(None, "--version")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"scatter {scatter.__version__} (Python ")


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
def test_call_takes_bytes_as_base64_or_a_file_and_non_finite_floats(
    node: LocalNode, client: scatter.Client, tmp_path: Path
) -> None:
    publish(client, size, same, norm)
    data = tmp_path / "data.bin"
    data.write_bytes(b"\x00\xffhello")
    cases = [
        (["size", "b64:aGVsbG8="], "5.0"),  # base64
        (["size", f"@{data}", "factor=2"], "14.0"),  # a file, and a keyword-only key=value
        (["size", "data=b64:", "factor=-inf"], "NaN"),  # 0 * -inf
        (["same", "nan"], "[NaN,NaN]"),  # printed as Python's json writes them
        (["same", "x=-inf"], "[-Infinity,-Infinity]"),
        (["same", "Infinity"], "[Infinity,Infinity]"),
        (["norm", '{"x": 3, "y": 4}', "scale=inf"], "Infinity"),
    ]
    for args, expected in cases:
        result = cli(node.address, "call", *args)
        assert result.exit_code == 0, (args, result.output)
        assert result.stdout == expected + "\n", args
    stdin = runner.invoke(
        app, ["--address", node.address, "call", "size", "@-"], input=b"abc", env={"COLUMNS": "200"}
    )
    assert stdin.exit_code == 0, stdin.output
    assert stdin.stdout == "3.0\n"
    errors = [
        (["size", "hello"], "argument 'data' takes bytes: give b64:BASE64, @FILE or @- (stdin)"),
        (["size", "b64:not base64!"], "argument 'data': 'b64:not base64!' is not base64"),
        (["size", f"@{tmp_path / 'missing'}"], "cannot read"),
        (["same", "nanx"], "Expected `float`, got `str`"),
    ]
    for args, expected in errors:
        result = cli(node.address, "call", *args)
        assert result.exit_code == 1, (args, result.output)
        assert expected in one_error_line(result.stderr), args


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


def test_status_history_line_counts_bodies_still_to_receive() -> None:
    from scatter import _wire
    from scatter._cli import _history

    status = _wire.NodeStatus(
        1, "n1", "tcp://127.0.0.1:1", 1, "/d", 0.0, 1, 1, 1, 0, 0, "3.11", "0", changes=3
    )
    assert "bodies" not in _history(status)
    missing = msgspec.structs.replace(status, missing_bodies=2)
    assert _history(missing).endswith(", 2 bodies still to receive from the members")


def test_status_history_line_says_how_to_stop_keeping_history_for_the_gone() -> None:
    from scatter import _wire
    from scatter._cli import _history

    status = _wire.NodeStatus(
        1, "n1", "tcp://127.0.0.1:1", 1, "/d", 0.0, 1, 1, 1, 0, 0, "3.11", "0", changes=3
    )
    assert "forget" not in _history(status)
    kept = msgspec.structs.replace(status, unconfirmed_changes=4, forgotten=["n9"])
    line = _history(kept)
    assert "4 compacted kept for members that lack them" in line
    assert "`scatter node forget` one whose data is gone" in line
    assert line.endswith("; forgotten for good: n9")
