"""Run here, or forward, in the pure cores: what a node cannot load, and why nobody can."""

from __future__ import annotations

from scatter import _wire
from scatter._core._forwarding import CannotLoad, nobody_can_run, python_problem
from tests.core.test_node_core import Disk, receive, request


def test_a_body_loads_only_on_its_own_python_major_minor() -> None:
    assert python_problem("3.11.2", "3.11.7") == ""
    assert python_problem("3.12.1", "3.11.7") == "Python 3.12 body on Python 3.11"
    assert python_problem("", "3.11.7") == ""  # an older publisher said nothing


def test_the_error_for_a_call_nobody_can_run_groups_members_by_reason() -> None:
    message = nobody_can_run(
        "add v3",
        {"b": "missing module `x`", "a": "missing module `x`", "c": "Python 3.12 body on Python 3.11"},
    )
    assert message == (
        "add v3 cannot run on any member: missing module `x` on nodes a, b; "
        "Python 3.12 body on Python 3.11 on node c"
    )


def test_the_cannot_load_table_is_bounded_and_says_the_latest_first() -> None:
    table = CannotLoad(limit=3)
    for n in range(5):
        assert table.learn(f"cid{n}", "missing module `x`")
    assert not table.learn("cid4", "missing module `x`")  # no news
    assert list(table.mine) == ["cid2", "cid3", "cid4"]
    assert list(table.recent(2)) == ["cid4", "cid3"]
    table.heard("b", {"cid9": "why"})
    assert table.reason("b", "cid9") == "why" and table.reason("c", "cid9") == ""


def _publish_from(python: str) -> bytes:
    return request(
        _wire.Publish(
            id=1,
            name="add",
            body=b"v1",
            signature=b"",
            signature_text="(a: int) -> int",
            signature_id="sig",
            content_id="code-add",
            python=python,
        )
    )


def test_a_route_to_a_body_of_another_python_fails_with_the_reason_when_alone() -> None:
    disk = Disk()
    core = disk.core()
    disk.run(core, core.start(0.0))
    disk.run(core, receive(core, _publish_from("3.0.1")))
    replies = disk.run(core, receive(core, request(_wire.Lease(7, name="add"))))
    assert [type(r) for r in replies] == [_wire.Failure]
    assert replies[0].kind == "load"
    assert "Python 3.0 body on Python" in replies[0].message
    assert core.facts.node_id in replies[0].message
    assert core.cannot_load.mine  # learned, and told to peers with the next digest


def test_a_route_to_a_body_this_node_runs_leases_its_own_worker() -> None:
    disk = Disk()
    core = disk.core()
    disk.run(core, core.start(0.0))
    disk.run(core, receive(core, _publish_from("")))
    effects = receive(core, request(_wire.Lease(7, name="add")))
    assert not any(isinstance(e, _wire.Failure) for e in disk.run(core, effects))
