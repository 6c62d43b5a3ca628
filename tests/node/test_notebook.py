"""The seed's notebook, run unchanged: as a script, in a real Jupyter kernel, and with a
node that it starts itself.

The kernel test is the one that proves the blocking client works inside a running event
loop (ipykernel runs cells on one). Every node started here is stopped by pid.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import nbformat
import pytest

import scatter
from cluster.launch import LocalNode, free_port, process_gone
from tests.waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]
SEED_SCRIPT = ROOT / "examples" / "seed_notebook.py"
SEED_NOTEBOOK = ROOT / "examples" / "seed_notebook.ipynb"

# What the seed's flow prints on a fresh node, in order.
SEED_OUTPUT = [
    "Current function version: 1",
    "Function call result: 1050",
    "Version after updating signature: 2",
    "TypeError: add() missing 1 required positional argument: 'c'",
    "Version after rollback: 1",
    "Rolled back function call result: 1050",
    "Deleting the function...",
]
NOT_FOUND = "FunctionNotFound: function 'add' was vaporized"


def assert_seed_flow(lines: list[str]) -> None:
    assert lines[: len(SEED_OUTPUT)] == SEED_OUTPUT, lines
    assert len(lines) == len(SEED_OUTPUT) + 1, lines
    assert lines[-1].startswith(NOT_FOUND), lines[-1]


def run_python(
    args: list[str], env: dict[str, str], cwd: Path, timeout: float = 90.0
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


# ---------------------------------------------------------------- the script


@pytest.mark.timeout(120)
def test_seed_script_runs_unchanged_against_a_node(node: LocalNode, tmp_path: Path) -> None:
    env = dict(os.environ, SCATTER_ADDRESS=node.address)  # SCATTER_AUTOSTART=0 from conftest
    result = run_python([str(SEED_SCRIPT)], env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert_seed_flow(result.stdout.splitlines())
    assert "started one in the background" not in result.stderr


@pytest.mark.timeout(120)
def test_quickstart_example_runs(node: LocalNode, tmp_path: Path) -> None:
    env = dict(os.environ, SCATTER_ADDRESS=node.address)
    result = run_python([str(ROOT / "examples" / "quickstart.py")], env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[:4] == ["13.5", "12.15", "16.2", "13.5"], lines
    assert "[5.4, 10.8, 16.2, 21.6, 27.0]" in lines
    assert lines[-1].startswith("gone: function 'order_total' was vaporized"), lines


def test_seed_script_keeps_the_seeds_import_line() -> None:
    source = SEED_SCRIPT.read_text()
    assert (
        "\nfrom scatter.brew.core import make_callable, current_version, rollback, scatter, "
        "vaporize\n" in source
    )


def script_cells() -> list[str]:
    """The code cells of examples/seed_notebook.py (the part before the first is its header)."""
    return [cell.strip("\n") for cell in SEED_SCRIPT.read_text().split("\n# %%\n")[1:]]


def test_notebook_has_the_scripts_cells() -> None:
    notebook = nbformat.read(SEED_NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    code = [cell.source for cell in notebook.cells if cell.cell_type == "code"]
    assert code == script_cells()
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None


# ---------------------------------------------------------------- a real Jupyter kernel


@pytest.mark.timeout(180)
def test_seed_notebook_runs_in_a_jupyter_kernel(node: LocalNode, tmp_path: Path) -> None:
    from nbclient import NotebookClient

    notebook = nbformat.read(SEED_NOTEBOOK, as_version=4)
    # The point of this test: ipykernel runs cells inside a running asyncio loop, and the
    # blocking client must work there without starting a loop of its own.
    notebook.cells.insert(
        0,
        nbformat.v4.new_code_cell(
            "import asyncio\nprint('running loop:', asyncio.get_running_loop() is not None)"
        ),
    )
    env = dict(os.environ, SCATTER_ADDRESS=node.address, SCATTER_AUTOSTART="0")
    client = NotebookClient(
        notebook,
        timeout=60,
        startup_timeout=60,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute(env=env)

    lines: list[str] = []
    for cell in notebook.cells:
        if cell.cell_type != "code":
            continue
        for output in cell.outputs:
            assert output.output_type == "stream", output
            if output.name == "stdout":
                lines += output.text.splitlines()
            else:
                assert "started one in the background" not in output.text
    assert lines[0] == "running loop: True"
    assert_seed_flow(lines[1:])


# ---------------------------------------------------------------- __main__ outlives its process


@pytest.mark.timeout(120)
def test_function_from_an_exited_processes_main_is_still_callable(
    node: LocalNode, client: scatter.Client, tmp_path: Path
) -> None:
    script = tmp_path / "publisher.py"
    script.write_text(
        textwrap.dedent(
            """
            from dataclasses import dataclass

            import scatter

            FACTOR = 3

            @dataclass
            class Pair:
                left: int
                right: int

            def helper(x: int) -> int:
                return FACTOR * x

            @scatter.scatter
            def triple(x: int) -> int:
                \"\"\"Three times x, by a helper of __main__.\"\"\"
                return helper(x)

            @scatter.scatter
            def swap(pair: Pair) -> Pair:
                return Pair(pair.right, pair.left)

            print(__name__, "published")
            """
        )
    )
    env = dict(os.environ, SCATTER_ADDRESS=node.address)
    result = run_python([str(script)], env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "__main__ published\n"

    triple = client.make_callable("triple")
    assert triple(14) == 42
    assert triple.__doc__ == "Three times x, by a helper of __main__."
    assert str(triple.__signature__) == "(x: int) -> int"

    # The dataclass came along by value: build an argument from the callable's signature.
    swap = client.make_callable("swap")
    pair_type = swap.__signature__.parameters["pair"].annotation
    swapped = swap(pair_type(1, 2))
    assert (swapped.left, swapped.right) == (2, 1)


# ---------------------------------------------------------------- auto-start


@pytest.mark.timeout(180)
def test_seed_script_starts_a_node_when_none_answers(tmp_path: Path) -> None:
    address = f"tcp://127.0.0.1:{free_port()}"
    env = dict(os.environ, SCATTER_ADDRESS=address, SCATTER_DATA_DIR=str(tmp_path / "auto"))
    env.pop("SCATTER_AUTOSTART", None)
    pid: int | None = None
    try:
        result = run_python([str(SEED_SCRIPT)], env, cwd=tmp_path)
        notices = [
            line for line in result.stderr.splitlines() if "started one in the background" in line
        ]
        match = re.search(r"\(pid (\d+)", notices[0]) if notices else None
        if match:
            pid = int(match.group(1))
        assert result.returncode == 0, result.stderr
        assert len(notices) == 1, result.stderr
        assert notices[0].startswith(f"scatter: no node answered at {address}")
        assert_seed_flow(result.stdout.splitlines())

        # The node outlived the script that started it.
        with scatter.Client(address, autostart=False) as client:
            pid = client.status().pid
            assert client.functions() == []
    finally:
        stop_node(address, pid)


def stop_node(address: str, pid: int | None) -> None:
    """Stop the node at ``address`` (pid ``pid``): Shutdown, then SIGKILL if it lingers."""
    try:
        with scatter.Client(address, autostart=False) as client:
            pid = client.status().pid
            client.shutdown()
    except scatter.ScatterError:
        pass  # not answering: the pid, if we know it, decides below
    if pid is None:
        return
    try:
        wait_until(lambda: process_gone(pid), 15, f"node pid {pid} exits")
    except AssertionError:
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: process_gone(pid), 10, f"node pid {pid} dies after SIGKILL")
