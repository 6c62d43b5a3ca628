"""What a call prints comes back to its caller, behind "(name pid=N)", and never into the
node's files (scatter/_node/_worker.py, ``CallOutput``)."""

from __future__ import annotations

import logging
import os
import sys
import time

import pytest

import scatter
from cluster.launch import LocalNode

SECRET_ARGUMENT = "card-4111-1111"  # a value that must never reach the node's log


def shout(text: str) -> int:
    print("hello", text)
    print("no newline at the end", end="")
    sys.stderr.write(f"warning about {text}\n")
    logging.getLogger("bank").warning("logged %s", text)
    return len(text)


def fail_loudly(text: str) -> int:
    print("about to fail with", text)
    raise ValueError("failed")


def slow_and_loud(text: str) -> int:
    print("starting", text, flush=True)
    time.sleep(600)
    return 0


def c_level(text: str) -> int:
    os.write(1, f"fd one {text}\n".encode())  # what C code would write: not captured
    return 1


def _node_files_text(node: LocalNode) -> str:
    texts = []
    for path in node.data_dir.rglob("*"):
        if path.is_file():
            texts.append(path.read_bytes().decode("utf-8", "replace"))
    return "\n".join(texts)


@pytest.mark.timeout(90)
def test_what_a_call_prints_is_printed_on_its_caller_and_not_logged(
    client: scatter.Client, node: LocalNode, capsys: pytest.CaptureFixture[str]
) -> None:
    for fn in (shout, fail_loudly, slow_and_loud, c_level):
        client.publish(fn)
    capsys.readouterr()

    assert client.make_callable("shout")(SECRET_ARGUMENT) == len(SECRET_ARGUMENT)
    printed = capsys.readouterr()
    lines = printed.out.splitlines()
    assert len(lines) == 2, printed.out
    assert lines[0].startswith("(shout pid=") and lines[0].endswith(f") hello {SECRET_ARGUMENT}")
    pid = lines[0].split("pid=", 1)[1].split(")", 1)[0]
    assert pid.isdigit() and int(pid) != os.getpid()
    assert lines[1] == f"(shout pid={pid}) no newline at the end"
    assert printed.err.splitlines() == [
        f"(shout pid={pid}) warning about {SECRET_ARGUMENT}",
        f"(shout pid={pid}) logged {SECRET_ARGUMENT}",  # logging's last resort: stderr
    ]

    # Output written before a failure or a timeout still comes back, before the error.
    with pytest.raises(ValueError, match="failed"):
        client.make_callable("fail_loudly")(SECRET_ARGUMENT)
    assert capsys.readouterr().out.endswith(f") about to fail with {SECRET_ARGUMENT}\n")
    with pytest.raises(scatter.CallTimeout):
        client.make_callable("slow_and_loud").call(SECRET_ARGUMENT, timeout=1)
    assert capsys.readouterr().out.endswith(f") starting {SECRET_ARGUMENT}\n")

    assert client.make_callable("c_level")(SECRET_ARGUMENT) == 1
    assert capsys.readouterr().out == ""  # fd 1 goes nowhere: not captured, not logged

    assert SECRET_ARGUMENT not in _node_files_text(node), "an argument reached the node's files"


@pytest.mark.timeout(60)
def test_capture_output_false_drops_what_a_call_prints(
    client: scatter.Client, node: LocalNode, capsys: pytest.CaptureFixture[str]
) -> None:
    client.publish(shout, name="quiet", capture_output=False)
    client.publish(shout, name="loud")
    capsys.readouterr()
    assert client.make_callable("quiet")(SECRET_ARGUMENT) == len(SECRET_ARGUMENT)
    assert capsys.readouterr() == ("", "")
    assert client.make_callable("loud")("x") == 1
    assert "(loud pid=" in capsys.readouterr().out
    assert SECRET_ARGUMENT not in _node_files_text(node)
    assert not hasattr(shout, "__scatter_capture_output__")  # the caller's function untouched
    with pytest.raises(scatter.ConfigError, match="capture_output must be True or False"):
        client.publish(shout, capture_output="no")  # type: ignore[arg-type]
