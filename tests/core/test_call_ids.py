"""Call ids unique in the cluster (issue 10, item 3): (caller id, id) never repeats
across processes, forked children, or the clients of one process."""

from __future__ import annotations

import os
import subprocess
import sys

import msgspec

import scatter
from scatter import _wire
from scatter._client import _callid

_PRINT_CALLER = "from scatter._client import _callid; print(_callid.caller.hex())"


def test_every_process_draws_a_caller_id_of_its_own() -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    callers = {
        subprocess.run(
            [sys.executable, "-c", _PRINT_CALLER], capture_output=True, text=True, env=env, check=True
        ).stdout.strip()
        for _ in range(3)
    }
    assert len(callers) == 3 and _callid.caller.hex() not in callers
    assert all(len(bytes.fromhex(c)) == 8 for c in callers)


def test_a_forked_child_calls_under_a_caller_id_of_its_own() -> None:
    parent = _callid.caller
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its caller id, and the id its next call takes
        try:
            os.write(write, _callid.caller + next(_callid.ids).to_bytes(8, "big"))
        finally:
            os._exit(0)
    os.close(write)
    try:
        got = os.read(read, 16)
    finally:
        os.close(read)
        os.waitpid(pid, 0)
    child, child_id = got[:8], int.from_bytes(got[8:], "big")
    parent_id = next(_callid.ids)
    assert child != parent and _callid.caller == parent
    # The child continued the parent's counter: the same number may come up on both
    # sides, and the caller ids keep the pairs apart.
    assert (child, child_id) != (parent, parent_id)


def test_the_clients_of_one_process_never_share_a_call_id() -> None:
    with scatter.Client("tcp://127.0.0.1:9", autostart=False) as one, scatter.Client(
        "tcp://127.0.0.1:9", autostart=False
    ) as two:
        ids = [next(one._sender._ids), next(two._sender._ids), next(one._sender._ids)]
    assert len(set(ids)) == 3


def test_a_call_frame_carries_the_caller_id_and_start_by() -> None:
    call = _wire.Call(7, "add", 0, 1, "", 0.0, msgspec.Raw(b"\x80"), _callid.caller, 12.5)
    decoded = _wire.call_decoder.decode(_wire.encoder.encode(call))
    assert (decoded.caller, decoded.id, decoded.start_by) == (_callid.caller, 7, 12.5)
    # A protocol-4 caller's frame (no trailing fields) still decodes: no id, no bound.
    old = msgspec.msgpack.encode([1, 7, "add", 0, 1, "", 0.0, {}])
    assert _wire.call_decoder.decode(old).caller == b""
