"""Live updates, signature changes, pins, rollbacks and the version numbering rules."""

from __future__ import annotations

import threading

import pytest

import scatter
from cluster.launch import LocalNode
from tests.waiting import wait_until


def _publish(body: str, *, name: str = "calc") -> None:
    """Scatter a freshly defined function under ``name`` (same name, another body)."""
    namespace: dict[str, object] = {}
    exec(body, namespace)
    function = namespace[name]
    function.__module__ = "__main__"  # type: ignore[attr-defined]
    scatter.scatter(function)  # type: ignore[arg-type]


V1 = "def calc(a: int, b: int) -> int:\n    return a + b\n"
V2_BODY = "def calc(a: int, b: int) -> int:\n    return a + b + 100\n"
V3_SIGNATURE = "def calc(a: int, b: int, c: int) -> int:\n    return a + b + c\n"


@pytest.mark.timeout(60)
def test_versions_start_at_one_and_identical_rescatter_changes_nothing(
    connected: LocalNode,
) -> None:
    _publish(V1)
    assert scatter.current_version("calc") == 1
    _publish(V1)
    assert scatter.current_version("calc") == 1
    assert [v.version for v in scatter.versions("calc")] == [1]
    _publish(V2_BODY)
    history = scatter.versions("calc")
    assert [(v.version, v.current) for v in history] == [(1, False), (2, True)]
    assert history[0].content_id != history[1].content_id
    assert history[1].signature_text == "(a: int, b: int) -> int"
    assert [f.name for f in scatter.functions()] == ["calc"]


@pytest.mark.timeout(60)
def test_body_only_update_is_seamless_for_callers_in_a_loop(
    connected: LocalNode,
) -> None:
    _publish(V1)
    remote = scatter.make_callable("calc")
    results: list[int] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def call_in_a_loop() -> None:
        while not stop.is_set():
            try:
                results.append(remote(1, 2))
            except BaseException as exc:
                errors.append(exc)
                return

    thread = threading.Thread(target=call_in_a_loop)
    thread.start()
    try:
        wait_until(lambda: len(results) >= 50 or errors, 20, "50 calls ran on version 1")
        _publish(V2_BODY)
        # At most the call in flight while publishing ran the old body: a client that
        # scattered then calls finds its version.
        published_at = len(results)
        wait_until(
            lambda: len(results) >= published_at + 6 or errors, 20, "5 calls ran after the update"
        )
    finally:
        stop.set()
        thread.join(10)
    assert errors == []
    assert not thread.is_alive()
    assert results[:50] == [3] * 50
    assert set(results[published_at + 1 :]) == {103}
    assert results == sorted(results)  # never back to the old body once the new one answered
    assert remote.version == 2


@pytest.mark.timeout(60)
def test_signature_change_errors_once_then_the_callable_follows(connected: LocalNode) -> None:
    _publish(V1)
    remote = scatter.make_callable("calc")
    assert remote(1, 2) == 3
    _publish(V3_SIGNATURE)
    with pytest.raises(scatter.SignatureChanged) as caught:
        remote(1, 2)
    error = caught.value
    assert (error.old_version, error.new_version) == (1, 2)
    assert "version 1" in str(error) and "version 2" in str(error)
    assert remote.version == 2
    assert str(remote.__signature__) == "(a: int, b: int, c: int) -> int"
    assert remote(1, 2, 3) == 6
    with pytest.raises(TypeError, match="missing 1 required positional argument: 'c'"):
        remote(1, 2)


@pytest.mark.timeout(60)
def test_pinned_callable_keeps_its_version(connected: LocalNode) -> None:
    _publish(V1)
    pinned = scatter.make_callable("calc", version=1)
    _publish(V2_BODY)
    _publish(V3_SIGNATURE)
    assert pinned(1, 2) == 3
    assert pinned.version == 1 and pinned.pinned
    assert scatter.make_callable("calc", version=2)(1, 2) == 103
    assert scatter.make_callable("calc")(1, 2, 3) == 6


@pytest.mark.timeout(60)
def test_rollback_and_numbers_never_reused_after_vaporize(connected: LocalNode) -> None:
    _publish(V1)
    _publish(V2_BODY)
    _publish(V3_SIGNATURE)
    assert scatter.rollback("calc") == 2
    assert scatter.make_callable("calc")(1, 2) == 103
    assert scatter.rollback("calc", to=1) == 1
    assert scatter.make_callable("calc")(1, 2) == 3
    with pytest.raises(scatter.VersionNotFound):
        scatter.rollback("calc")  # nothing before version 1
    _publish(V2_BODY)
    assert scatter.current_version("calc") == 4  # the next free number, after a rollback
    scatter.vaporize("calc")
    with pytest.raises(scatter.FunctionNotFound):
        scatter.current_version("calc")
    with pytest.raises(scatter.FunctionNotFound):
        scatter.make_callable("calc")
    _publish(V1)
    assert scatter.current_version("calc") == 5
    assert [v.version for v in scatter.versions("calc")] == [5]


@pytest.mark.timeout(60)
def test_decorated_function_still_works_locally(connected: LocalNode) -> None:
    @scatter.scatter
    def greet(name: str) -> str:
        """Say hello."""
        return f"hello {name}"

    assert greet("you") == "hello you"
    remote = scatter.make_callable("greet")
    assert remote.__name__ == "greet"
    assert remote.__doc__ == "Say hello."
    assert str(remote.__signature__) == "(name: str) -> str"
    import inspect

    assert inspect.signature(remote) == inspect.signature(greet, eval_str=True)


RESCATTER = """
import dataclasses, sys
import scatter

@dataclasses.dataclass
class Point:
    x: float
    y: float

scatter.connect(sys.argv[1], autostart=False)

@scatter.scatter
def norm(p: Point) -> float:
    return (p.x ** 2 + p.y ** 2) ** 0.5

print(scatter.current_version("norm"))
"""


@pytest.mark.timeout(60)
def test_rescattering_same_code_from_another_process_changes_nothing(node: LocalNode) -> None:
    import subprocess
    import sys

    runs = [
        subprocess.run(
            [sys.executable, "-c", RESCATTER, node.address],
            capture_output=True,
            text=True,
            timeout=50,
        )
        for _ in range(2)
    ]
    assert [r.returncode for r in runs] == [0, 0], runs[0].stderr + runs[1].stderr
    assert [r.stdout.strip() for r in runs] == ["1", "1"]


@pytest.mark.timeout(60)
def test_the_same_code_with_another_timeout_is_a_new_version(client: scatter.Client) -> None:
    def slowish(x: int) -> int:
        return x

    assert client.publish(slowish).version == 1
    assert client.publish(slowish).unchanged  # the same code, the same timeout: a no-op
    changed = client.publish(slowish, timeout=7.0)
    assert (changed.version, changed.unchanged) == (2, False)
    assert client.describe("slowish").timeout == 7.0
