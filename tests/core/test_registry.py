"""The registry's rules: a plain test for each, then property tests over random histories."""

from __future__ import annotations

import random
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from scatter._core._registry import (
    Change,
    FunctionInfo,
    FunctionView,
    PublishOp,
    PublishSetOp,
    Registry,
    RegistryStatistics,
    RollbackOp,
    VaporizeOp,
    VersionInfo,
    VersionRecord,
    check_name,
    order_key,
)
from scatter._core._vclock import VectorClock
from scatter._exceptions import ConfigError, FunctionNotFound, ProtocolError, VersionNotFound


def record(name: str, body: str = "v1", *, signature: str = "(a: int) -> int") -> VersionRecord:
    """A record whose content id is readable in assertions: ``"name:body"``."""
    return VersionRecord(
        content_id=f"{name}:{body}|{signature}",
        name=name,
        signature_text=signature,
        signature_id=signature,
        origin="test",
        python="3.11.7",
        created_at=1.0,
    )


def body_of(registry: Registry, name: str, version: int | None = None) -> str:
    # The body stands in the content id: "name:body|signature".
    return registry.resolve(name, version)[1].content_id.split("|")[0].split(":", 1)[1]


def numbers(registry: Registry, name: str) -> list[int]:
    return [info.version for info in registry.versions(name)]


def exchange(*registries: Registry) -> None:
    """Give every registry every change the others hold (full anti-entropy)."""
    for source in registries:
        for target in registries:
            if target is not source:
                target.apply_many(source.changes_since(target.clock))


# -- numbering and the current pointer ---------------------------------------


def test_versions_are_numbered_from_one_and_the_newest_is_current() -> None:
    reg = Registry("n1")
    reg.publish([record("add", "v1")], now=1.0)
    reg.publish([record("add", "v2")], now=2.0)
    assert numbers(reg, "add") == [1, 2]
    assert reg.current_version("add") == 2
    assert body_of(reg, "add") == "v2"
    assert body_of(reg, "add", 1) == "v1"
    assert [info.current for info in reg.versions("add")] == [False, True]


def test_republishing_the_current_body_is_a_no_op() -> None:
    reg = Registry("n1")
    reg.publish([record("add", "v1")], now=1.0)
    clock = reg.clock
    assert reg.publish([record("add", "v1")], now=2.0) is None
    assert reg.current_version("add") == 1
    assert reg.clock == clock  # no change was made


def test_republishing_an_older_body_takes_a_new_number() -> None:
    reg = Registry("n1")
    for body in ("v1", "v2", "v1"):
        reg.publish([record("add", body)], now=1.0)
    assert numbers(reg, "add") == [1, 2, 3]
    assert body_of(reg, "add") == "v1"


def test_publishing_several_functions_is_one_change() -> None:
    reg = Registry("n1")
    change = reg.publish([record("a"), record("b")], now=1.0)
    assert change is not None and len(change.ops) == 2
    assert reg.current_version("a") == reg.current_version("b") == 1


def test_publish_refuses_two_versions_of_one_name_in_one_change() -> None:
    with pytest.raises(ConfigError, match="several versions of 'a'"):
        Registry("n1").publish([record("a", "v1"), record("a", "v2")], now=1.0)


# -- rollback ------------------------------------------------------------------


def test_rollback_without_a_target_goes_to_the_previous_version() -> None:
    reg = Registry("n1")
    for body in ("v1", "v2", "v3"):
        reg.publish([record("add", body)], now=1.0)
    reg.rollback("add", now=2.0)
    assert reg.current_version("add") == 2
    reg.rollback("add", now=3.0)
    assert reg.current_version("add") == 1


def test_rollback_to_a_given_version_also_rolls_forward() -> None:
    reg = Registry("n1")
    for body in ("v1", "v2", "v3"):
        reg.publish([record("add", body)], now=1.0)
    reg.rollback("add", to=1, now=2.0)
    assert body_of(reg, "add") == "v1"
    reg.rollback("add", to=3, now=3.0)
    assert body_of(reg, "add") == "v3"


def test_the_next_publish_after_a_rollback_takes_the_next_free_number() -> None:
    reg = Registry("n1")
    for body in ("v1", "v2", "v3"):
        reg.publish([record("add", body)], now=1.0)
    reg.rollback("add", to=1, now=2.0)
    reg.publish([record("add", "v4")], now=3.0)
    assert reg.current_version("add") == 4


def test_rollback_past_the_first_version_says_there_is_nothing_to_roll_back_to() -> None:
    reg = Registry("n1")
    reg.publish([record("add")], now=1.0)
    with pytest.raises(VersionNotFound, match="no version before 1; nothing to roll back to"):
        reg.rollback("add", now=2.0)


def test_rollback_to_a_missing_version_lists_the_versions_there_are() -> None:
    reg = Registry("n1")
    reg.publish([record("add", "v1")], now=1.0)
    reg.publish([record("add", "v2")], now=1.0)
    with pytest.raises(VersionNotFound, match="no version 7; roll back to one of 1, 2"):
        reg.rollback("add", to=7, now=2.0)


def test_rollback_of_an_unknown_name_says_how_to_create_it() -> None:
    with pytest.raises(FunctionNotFound, match=r"scatter it first or check functions\(\)"):
        Registry("n1").rollback("nope", now=1.0)


# -- vaporize ------------------------------------------------------------------


def test_vaporize_removes_the_function_and_every_version() -> None:
    reg = Registry("n1")
    reg.publish([record("add", "v1")], now=1.0)
    reg.publish([record("add", "v2")], now=1.0)
    reg.vaporize("add", now=2.0)
    for lookup in (
        lambda: reg.resolve("add"),
        lambda: reg.resolve("add", 1),
        lambda: reg.current_version("add"),
        lambda: reg.versions("add"),
    ):
        with pytest.raises(FunctionNotFound, match="'add' was vaporized; scatter it again"):
            lookup()
    assert reg.view("add") is None
    assert reg.functions() == []
    assert reg.statistics().tombstones == 1


def test_a_publish_after_vaporize_continues_the_numbering() -> None:
    # A number names one body forever: version 1 and 2 died with the vaporize.
    reg = Registry("n1")
    reg.publish([record("add", "v1")], now=1.0)
    reg.publish([record("add", "v2")], now=1.0)
    reg.vaporize("add", now=2.0)
    reg.publish([record("add", "v1")], now=3.0)
    assert numbers(reg, "add") == [3]
    assert reg.statistics().tombstones == 0
    with pytest.raises(VersionNotFound, match="no version 1"):
        reg.resolve("add", 1)


def test_vaporize_of_an_unknown_name_raises() -> None:
    with pytest.raises(FunctionNotFound):
        Registry("n1").vaporize("nope", now=1.0)


# -- lookups -------------------------------------------------------------------


def test_view_lists_live_versions_and_follows_the_current_pointer() -> None:
    reg = Registry("n1")
    reg.publish([record("add", "v1")], now=1.0)
    reg.publish([record("add", "v2", signature="(a: int, b: int) -> int")], now=1.0)
    first = reg.view("add")
    assert first == FunctionView(
        name="add",
        current=2,
        content_ids={1: "add:v1|(a: int) -> int", 2: "add:v2|(a: int, b: int) -> int"},
        signature_ids={1: "(a: int) -> int", 2: "(a: int, b: int) -> int"},
    )
    assert reg.view("add") is first  # cached: the node calls this on every request
    reg.rollback("add", now=2.0)
    view = reg.view("add")
    assert view is not None and view.current == 1
    assert reg.view("nope") is None


def test_resolve_content_pins_a_body_whatever_its_number() -> None:
    reg = Registry("n1")
    reg.publish([record("add", "v1")], now=1.0)
    reg.publish([record("add", "v2")], now=1.0)
    number, found = reg.resolve_content("add", "add:v1|(a: int) -> int")
    assert (number, found.content_id) == (1, "add:v1|(a: int) -> int")
    with pytest.raises(VersionNotFound, match="content id"):
        reg.resolve_content("add", "other")


def test_resolve_of_a_missing_version_says_which_exist() -> None:
    reg = Registry("n1")
    reg.publish([record("add")], now=1.0)
    with pytest.raises(VersionNotFound, match="no version 5; its versions are 1"):
        reg.resolve("add", 5)


def test_functions_lists_who_made_the_current_version() -> None:
    reg = Registry("n1")
    reg.publish([record("b"), record("a")], now=1.0)
    infos = reg.functions()
    assert [info.name for info in infos] == ["a", "b"]
    assert infos[0].version == 1 and infos[0].origin == "test"
    assert infos[0].signature_text == "(a: int) -> int"


def test_statistics_count_what_is_held() -> None:
    reg = Registry("n1")
    reg.publish([record("a", "v1")], now=1.0)
    reg.publish([record("a", "v2"), record("b")], now=1.0)
    reg.vaporize("b", now=1.0)
    assert reg.statistics() == RegistryStatistics(
        functions=1, sets=0, versions=2, tombstones=1, changes=3, pending=0, rebuilds=0
    )


# -- concurrency: THE ONE CONFLICT RULE ---------------------------------------


def test_concurrent_publishes_of_one_number_keep_both_and_show_the_conflict() -> None:
    a, b = Registry("a"), Registry("b")
    a.publish([record("add", "from-a")], now=1.0)
    b.publish([record("add", "from-b")], now=1.0)
    exchange(a, b)
    # Equal clock totals: origin "a" sorts first and keeps version 1.
    for reg in (a, b):
        infos = reg.versions("add")
        assert [(i.version, i.proposed_version, i.conflict) for i in infos] == [
            (1, 1, False),
            (2, 1, True),
        ]
        assert body_of(reg, "add", 1) == "from-a"
        assert body_of(reg, "add") == "from-b"  # the later change moved the pointer last
    assert a.functions() == b.functions()


def test_state_does_not_depend_on_delivery_order() -> None:
    a, b, c = Registry("a"), Registry("b"), Registry("c")
    a.publish([record("f", "a1")], now=1.0)
    b.publish([record("f", "b1")], now=1.0)
    c.publish([record("f", "c1")], now=1.0)
    changes = [*a.changes_since(VectorClock()), *b.changes_since(VectorClock())]
    changes += c.changes_since(VectorClock())
    forward = Registry.from_changes("x", changes)
    backward = Registry("y")
    for change in reversed(changes):
        backward.apply(change)
    assert forward.versions("f") == backward.versions("f")
    assert [i.content_id.split("|")[0] for i in forward.versions("f")] == ["f:a1", "f:b1", "f:c1"]


def test_replica_hash_is_equal_exactly_when_replicas_hold_the_same_changes() -> None:
    a, b = Registry("a"), Registry("b")
    a.publish([record("f", "a1")], now=1.0)
    b.publish([record("f", "b1")], now=1.0)
    assert a.replica_hash() != b.replica_hash()
    exchange(a, b)  # each got the other's change in another order
    assert a.replica_hash() == b.replica_hash()
    assert Registry("c").replica_hash() != a.replica_hash()
    held_back = Registry("d")
    later = a.publish([record("f", "a2")], now=2.0)
    assert later is not None
    held_back.apply(later)  # its causal past is missing: held, not applied
    assert held_back.statistics().pending == 1
    assert held_back.replica_hash() == Registry("e").replica_hash()


def test_rollback_targets_a_body_even_after_its_number_moved() -> None:
    a, b = Registry("a"), Registry("b")
    a.publish([record("f", "base")], now=1.0)
    exchange(a, b)
    a.publish([record("f", "a2")], now=2.0)  # proposes 2, keeps it: "a" sorts first
    b.publish([record("f", "b2")], now=2.0)  # proposes 2, becomes 3 after the merge
    b.publish([record("f", "b3")], now=3.0)
    b.rollback("f", to=2, now=4.0)  # b means its own "b2"
    exchange(a, b)
    for reg in (a, b):
        assert body_of(reg, "f") == "b2"
        assert reg.current_version("f") == 3


def test_vaporize_sorting_after_a_concurrent_publish_wins() -> None:
    a, b = Registry("a"), Registry("b")
    a.publish([record("f", "v1")], now=1.0)
    exchange(a, b)
    a.publish([record("f", "a2")], now=2.0)  # sorts first (same total, origin "a")
    b.vaporize("f", now=2.0)
    exchange(a, b)
    for reg in (a, b):
        with pytest.raises(FunctionNotFound, match="vaporized"):
            reg.resolve("f")


def test_publish_sorting_after_a_concurrent_vaporize_brings_the_function_back() -> None:
    a, b = Registry("a"), Registry("b")
    a.publish([record("f", "v1")], now=1.0)
    exchange(a, b)
    a.vaporize("f", now=2.0)  # sorts first
    b.publish([record("f", "b2")], now=2.0)
    exchange(a, b)
    for reg in (a, b):
        # Only b's version survives, numbered after the high-water mark: no number reused.
        assert numbers(reg, "f") == [2]
        assert body_of(reg, "f") == "b2"


def test_rollback_to_a_version_vaporized_by_an_earlier_change_does_nothing() -> None:
    a, b = Registry("a"), Registry("b")
    a.publish([record("f", "v1")], now=1.0)
    a.publish([record("f", "v2")], now=1.0)
    exchange(a, b)
    a.vaporize("f", now=2.0)  # sorts first
    b.rollback("f", now=2.0)
    exchange(a, b)
    for reg in (a, b):
        with pytest.raises(FunctionNotFound):
            reg.current_version("f")


def test_a_function_and_a_set_published_concurrently_under_one_name_the_later_wins() -> None:
    a, b = Registry("a"), Registry("b")
    a.publish([record("m")], now=1.0, set_name="x")  # sorts first: set "x" owning "m"
    b.publish([record("x")], now=1.0)  # function "x": takes the name
    exchange(a, b)
    for reg in (a, b):
        assert [(i.name, i.kind) for i in reg.functions()] == [("x", "function")]
        assert numbers(reg, "x") == [2]  # the set held number 1 under this name
        with pytest.raises(FunctionNotFound, match="vaporized"):
            reg.resolve("m")


# -- apply and the log ---------------------------------------------------------


def test_apply_reports_the_names_whose_lookups_changed() -> None:
    a, b = Registry("a"), Registry("b")
    change = a.publish([record("f"), record("g")], now=1.0)
    assert change is not None
    assert b.apply(change) == {"f", "g"}
    rollback = a.publish([record("f", "v2")], now=1.0)
    assert rollback is not None and b.apply(rollback) == {"f"}


def test_apply_ignores_a_change_it_holds() -> None:
    a, b = Registry("a"), Registry("b")
    change = a.publish([record("f")], now=1.0)
    assert change is not None
    b.apply(change)
    assert b.apply(change) == set()
    assert a.apply(change) == set()
    assert numbers(b, "f") == [1] and b.statistics().changes == 1


def test_a_local_change_never_replays_the_log() -> None:
    a, b = Registry("a"), Registry("b")
    b.publish([record("f", "b")], now=1.0)
    b.publish([record("f", "b2")], now=1.0)
    exchange(a, b)
    a.publish([record("f", "a")], now=1.0)
    a.rollback("f", now=1.0)
    assert a.statistics().rebuilds == 0


def test_a_change_sorting_before_applied_ones_replays_the_log() -> None:
    a, b = Registry("a"), Registry("b")
    first = a.publish([record("f", "a")], now=1.0)
    b.publish([record("f", "b")], now=1.0)
    b.publish([record("f", "b2")], now=1.0)
    assert first is not None
    assert b.apply(first) == {"f"}  # numbers moved: b's versions are 2 and 3 now
    assert b.statistics().rebuilds == 1
    assert numbers(b, "f") == [1, 2, 3] and body_of(b, "f", 1) == "a"


def test_restart_from_the_persisted_log_gives_the_same_state() -> None:
    a, b = Registry("a"), Registry("b")
    a.publish([record("f", "v1")], now=1.0)
    b.publish([record("f", "b1"), record("g")], now=1.0)
    exchange(a, b)
    a.publish([record("m1"), record("m2")], now=2.0, set_name="s")
    a.rollback("f", to=1, now=3.0)
    b.vaporize("g", now=3.0)
    exchange(a, b)
    log = a.changes_since(VectorClock())
    restarted = Registry.from_changes("a", reversed(log))
    assert restarted.functions() == a.functions()
    for name in ("f", "s", "m1", "m2"):
        assert restarted.versions(name) == a.versions(name)
    assert restarted.clock == a.clock
    # And the restarted node goes on numbering its own changes where it stopped.
    change = restarted.publish([record("f", "v9")], now=4.0)
    assert change is not None and change.change_id == f"a:{a.clock.get('a') + 1}"


def test_changes_since_returns_what_a_peer_lacks_in_apply_order() -> None:
    a, b = Registry("a"), Registry("b")
    a.publish([record("f", "v1")], now=1.0)
    exchange(a, b)
    a.publish([record("f", "v2")], now=2.0)
    b.publish([record("g")], now=2.0)
    missing = a.changes_since(b.clock)
    assert [c.change_id for c in missing] == ["a:2"]
    both = Registry("c").changes_since(VectorClock())
    assert both == []
    everything = a.changes_since(VectorClock())
    assert everything == sorted(everything, key=order_key)


def test_a_change_waits_for_its_causal_past_and_anti_entropy_fills_the_gap() -> None:
    a, b = Registry("a"), Registry("b")
    first = a.publish([record("f", "v1")], now=1.0)
    second = a.publish([record("f", "v2")], now=2.0)
    assert first is not None and second is not None
    assert b.apply(second) == set()  # the push of `first` was lost: `second` waits
    assert b.pending() == [second] and b.statistics().pending == 1
    with pytest.raises(FunctionNotFound):
        b.resolve("f")  # never an effect without its cause
    assert b.clock.get("a") == 0
    assert a.changes_since(b.clock) == [first, second]
    assert b.changes_since(VectorClock()) == [second]  # held changes are gossiped on
    assert b.apply_many(a.changes_since(b.clock)) == {"f"}
    assert b.clock == a.clock and b.pending() == []
    assert b.versions("f") == a.versions("f")


def test_a_malformed_change_is_refused_and_changes_nothing() -> None:
    reg = Registry("n1")
    good = dict(origin="x", clock=VectorClock({"x": 1}), at=1.0)
    bad = [
        Change(change_id="x:7", ops=(VaporizeOp(name="f"),), **good),  # id does not match clock
        Change(change_id="x:1", ops=(), **good),
        Change(
            change_id="x:1",
            ops=(VaporizeOp(name="f"), RollbackOp(name="f", target="x:0", target_version=1)),
            **good,
        ),
        Change(
            change_id="x:1",
            ops=(PublishOp(record=record("m"), proposed_version=1, set_name="s"),),
            **good,
        ),
        Change(
            change_id="x:1",
            ops=(PublishSetOp(name="s", proposed_version=1, members={"s": "x:1"}),),
            **good,
        ),
    ]
    for change in bad:
        with pytest.raises(ProtocolError):
            reg.apply(change)
    assert reg.statistics().changes == 0 and reg.clock == VectorClock()


def test_every_persisted_and_reported_value_round_trips_through_msgpack() -> None:
    reg = Registry("n1")
    reg.publish([record("m1"), record("m2")], now=1.0, set_name="s")
    reg.publish([record("m1", "v2"), record("m2")], now=2.0, set_name="s")
    reg.rollback("s", now=3.0)
    reg.publish([record("f")], now=4.0)
    reg.vaporize("f", now=5.0)
    values: list[tuple[type, object]] = [(Change, c) for c in reg.changes_since(VectorClock())]
    values += [(VersionInfo, i) for i in reg.versions("s") + reg.versions("m1")]
    values += [(FunctionInfo, i) for i in reg.functions()]
    values += [(FunctionView, reg.view("m1")), (RegistryStatistics, reg.statistics())]
    values += [(VersionRecord, record("x")), (VectorClock, reg.clock)]
    kinds = {type(op) for _, c in values if isinstance(c, Change) for op in c.ops}
    assert kinds == {PublishOp, PublishSetOp, RollbackOp, VaporizeOp}
    for kind, value in values:
        decoded = msgspec.msgpack.Decoder(kind).decode(msgspec.msgpack.encode(value))
        assert decoded == value


# -- sets ----------------------------------------------------------------------


def test_publishing_a_set_is_one_change_with_its_own_version() -> None:
    reg = Registry("n1")
    change = reg.publish([record("charge"), record("refund")], now=1.0, set_name="billing")
    assert change is not None
    assert [type(op) for op in change.ops] == [PublishOp, PublishOp, PublishSetOp]
    (info,) = reg.versions("billing")
    assert (info.kind, info.version, info.members) == ("set", 1, {"charge": 1, "refund": 1})
    assert reg.current_version("billing") == 1
    assert {(i.name, i.kind, i.set_name) for i in reg.functions()} == {
        ("billing", "set", None),
        ("charge", "function", "billing"),
        ("refund", "function", "billing"),
    }
    assert reg.versions("charge")[0].set_name == "billing"


def test_a_set_update_publishes_only_the_members_that_changed() -> None:
    reg = Registry("n1")
    reg.publish([record("charge"), record("refund")], now=1.0, set_name="billing")
    change = reg.publish([record("charge", "v2"), record("refund")], now=2.0, set_name="billing")
    assert change is not None
    published = [op.record.name for op in change.ops if isinstance(op, PublishOp)]
    assert published == ["charge"]
    assert reg.versions("billing")[-1].members == {"charge": 2, "refund": 1}
    assert (
        reg.publish([record("charge", "v2"), record("refund")], now=3.0, set_name="billing") is None
    )


def test_rolling_back_a_set_moves_every_member_in_one_change() -> None:
    reg = Registry("n1")
    reg.publish([record("charge"), record("refund")], now=1.0, set_name="billing")
    reg.publish([record("charge", "v2"), record("refund", "v2")], now=2.0, set_name="billing")
    other = Registry("n2")
    other.apply_many(reg.changes_since(other.clock))
    change = reg.rollback("billing", now=3.0)
    assert len(change.ops) == 1
    assert other.apply(change) == {"billing", "charge", "refund"}
    for r in (reg, other):
        assert r.current_version("billing") == 1
        assert (r.current_version("charge"), r.current_version("refund")) == (1, 1)


def test_a_member_left_out_of_a_set_version_is_retired_until_a_rollback() -> None:
    reg = Registry("n1")
    reg.publish([record("charge"), record("legacy")], now=1.0, set_name="billing")
    reg.publish([record("charge", "v2")], now=2.0, set_name="billing")
    with pytest.raises(FunctionNotFound, match="not part of the current version of set 'billing'"):
        reg.resolve("legacy")
    assert body_of(reg, "legacy", 1) == "v1"  # a pinned caller keeps running it
    view = reg.view("legacy")
    assert view is not None and view.current is None and view.content_ids.keys() == {1}
    assert "legacy" not in {i.name for i in reg.functions()}
    reg.rollback("billing", now=3.0)
    assert reg.current_version("legacy") == 1 and reg.current_version("charge") == 1


def test_vaporizing_a_set_removes_it_and_its_members_in_one_change() -> None:
    reg = Registry("n1")
    reg.publish([record("charge"), record("refund")], now=1.0, set_name="billing")
    change = reg.vaporize("billing", now=2.0)
    assert len(change.ops) == 1
    assert reg.functions() == []
    for name in ("billing", "charge", "refund"):
        with pytest.raises(FunctionNotFound, match="vaporized"):
            reg.versions(name)
    assert reg.statistics().tombstones == 3
    reg.publish([record("charge")], now=3.0, set_name="billing")
    assert reg.current_version("billing") == 2 and reg.current_version("charge") == 2


def test_a_set_member_is_changed_only_through_its_set() -> None:
    reg = Registry("n1")
    reg.publish([record("charge", "v1")], now=1.0, set_name="billing")
    reg.publish([record("charge", "v2")], now=1.0, set_name="billing")
    with pytest.raises(ConfigError, match="belongs to set 'billing'; publish it with that set"):
        reg.publish([record("charge", "v3")], now=2.0)
    with pytest.raises(ConfigError, match=r"rollback\('billing'\)"):
        reg.rollback("charge", now=2.0)
    with pytest.raises(ConfigError, match=r"vaporize\('billing'\)"):
        reg.vaporize("charge", now=2.0)
    with pytest.raises(ConfigError, match="belongs to set 'billing'"):
        reg.publish([record("charge", "v3")], now=2.0, set_name="other")


def test_functions_and_sets_share_one_namespace() -> None:
    reg = Registry("n1")
    reg.publish([record("f")], now=1.0)
    reg.publish([record("m")], now=1.0, set_name="s")
    with pytest.raises(ConfigError, match="'f' is already a function"):
        reg.publish([record("m2")], now=2.0, set_name="f")
    with pytest.raises(ConfigError, match="'s' is a function set"):
        reg.publish([record("s")], now=2.0)
    with pytest.raises(FunctionNotFound, match="'s' is a function set, not a function"):
        reg.resolve("s")


def test_a_new_name_follows_the_name_rule_and_the_error_states_it() -> None:
    reg = Registry("n1")
    rule = r"function and set names are Python identifiers .* of 1 to 128 characters; got "
    for bad in ("", "my-func", "a b", "billing.charge", "1st", "class", "x" * 129, "ﬁle"):
        with pytest.raises(ConfigError, match=rule):
            reg.publish([record(bad)], now=1.0)
        with pytest.raises(ConfigError, match=rule):
            reg.publish([record("m")], now=1.0, set_name=bad)
    with pytest.raises(ConfigError, match=r"got 'xxxx.*\.\.\.' \(300 characters\)"):
        reg.publish([record("x" * 300)], now=1.0)
    with pytest.raises(TypeError, match=rule + "int 5"):
        check_name(5)
    for good in ("add", "_private", "größe", "x" * 128, "v2_add"):
        reg.publish([record(good)], now=1.0)
    assert len(reg.functions()) == 5


def test_a_name_made_before_the_rule_still_applies_and_can_be_vaporized() -> None:
    # Rule 6: changes already made are never judged again (a peer of another release
    # applied them), so an old name stays callable, listable and removable.
    old = Registry("old")
    change = old._local_change(
        [PublishOp(record=record("my-func"), proposed_version=1)], now=1.0
    )
    reg = Registry("n1")
    reg.apply(change)
    assert reg.current_version("my-func") == 1
    reg.vaporize("my-func", now=2.0)
    assert reg.functions() == []


def test_a_set_can_adopt_an_existing_function_without_a_new_version() -> None:
    reg = Registry("n1")
    reg.publish([record("charge")], now=1.0)
    change = reg.publish([record("charge")], now=2.0, set_name="billing")
    assert change is not None and [type(op) for op in change.ops] == [PublishSetOp]
    assert reg.versions("billing")[0].members == {"charge": 1}
    view = reg.view("charge")
    assert view is not None and view.set_name == "billing"


def test_a_set_rollback_never_takes_back_a_function_another_set_adopted() -> None:
    a, b = Registry("a"), Registry("b")
    a.publish([record("m"), record("n")], now=1.0, set_name="s")
    b.publish([record("m", "t")], now=1.0, set_name="t")  # concurrent: "t" adopts "m" later
    exchange(a, b)
    a.publish([record("n", "v2")], now=2.0, set_name="s")
    a.rollback("s", to=1, now=3.0)  # s version 1 lists "m", but "m" belongs to "t" now
    exchange(a, b)
    for reg in (a, b):
        assert reg.current_version("n") == 1
        assert body_of(reg, "m") == "t"
        view = reg.view("m")
        assert view is not None and view.set_name == "t"


# -- properties: random histories on a simulated cluster -----------------------
#
# Three registries make random local changes and exchange random subsets of their
# changes in random order (gaps included: a change may arrive before its causal
# past). After every step the local invariants hold; once every registry holds
# every change, they all answer every lookup alike, and alike a registry built
# from the shuffled log. "No record lost", precisely: every version a publish
# created is listed by versions() under its name, unless a change sorting after
# that publish could have vaporized it: vaporize(name), a set published under the
# function's name, or vaporize/function-publish of a set the function was ever
# listed in. Without vaporize and name clashes: every version is listed, always.

NODES = ["a", "b", "c"]
FUNCTIONS = ["f", "g"]
MEMBERS = ["m1", "m2", "m3"]
BODIES = ["v1", "v2", "v3"]
MODES = {
    # mode: (set names, whether vaporize is drawn)
    "no-vaporize": (["S", "T"], False),
    "vaporize": (["S", "T"], True),
    "name-clash": (["S", "f"], True),  # "f" may be a function and a set concurrently
}


def all_names(mode: str) -> list[str]:
    return sorted({*FUNCTIONS, *MEMBERS, *MODES[mode][0]})


def lookups(reg: Registry, names: list[str]) -> dict[str, object]:
    """Everything a lookup of each name can see, versions() and view() included."""
    seen: dict[str, object] = {}
    for name in names:
        try:
            history: object = reg.versions(name)
        except FunctionNotFound:
            history = None
        seen[name] = (history, reg.view(name))
    return seen


def resolutions(reg: Registry, names: list[str]) -> dict[str, object]:
    """What the node's hot path sees per name: view(), current_version(), resolve()."""
    seen: dict[str, object] = {}
    for name in names:
        try:
            current: object = reg.current_version(name)
        except FunctionNotFound:
            current = None
        try:
            number, found = reg.resolve(name)
            resolved: object = (number, found.content_id)
        except FunctionNotFound:
            resolved = None
        seen[name] = (reg.view(name), current, resolved)
    return seen


def snapshot(reg: Registry, names: list[str]) -> object:
    statistics = msgspec.structs.replace(reg.statistics(), rebuilds=0)
    return (reg.functions(), lookups(reg, names), reg.clock, statistics)


def check_local_invariants(reg: Registry, names: list[str]) -> None:
    for name in names:
        try:
            infos = reg.versions(name)
        except FunctionNotFound:
            assert reg.view(name) is None
            continue
        numbers_ = [i.version for i in infos]
        assert numbers_ == sorted(set(numbers_)), "numbers unique, oldest first"
        assert sum(i.current for i in infos) <= 1
        assert all(i.proposed_version <= i.version for i in infos)
        assert all(i.conflict == (i.proposed_version != i.version) for i in infos)
        if infos[0].kind == "set":
            assert reg.view(name) is None
            (current,) = [i for i in infos if i.current]
            assert reg.current_version(name) == current.version
            # Atomic sets: each function the set owns runs its version in the set's
            # current version, or is retired. No node serves a mix of two versions.
            for member in MEMBERS:
                view = reg.view(member)
                if view is not None and view.set_name == name and view.current is not None:
                    assert current.members.get(member) == view.current
            continue
        view = reg.view(name)
        assert view is not None
        assert view.content_ids == {i.version: i.content_id for i in infos}
        assert view.signature_ids == {i.version: i.signature_id for i in infos}
        live = [i.version for i in infos if i.current]
        assert view.current == (live[0] if live else None)
        if view.current is not None:
            assert reg.resolve(name)[0] == view.current


def check_history(reg: Registry, changes: list[Change], mode: str) -> None:
    """Numbering by the one rule, nothing invented, nothing lost (see above)."""
    ordered = sorted(changes, key=order_key)
    high_water: dict[str, int] = {}
    expected: dict[
        tuple[str, str], tuple[int, str, int]
    ] = {}  # {(name, change): (n, content, pos)}
    ever_members: dict[str, set[str]] = {}
    for position, change in enumerate(ordered):
        for op in change.ops:
            if isinstance(op, PublishOp):
                name, content = op.record.name, op.record.content_id
            elif isinstance(op, PublishSetOp):
                name, content = op.name, ""
                ever_members.setdefault(name, set()).update(op.members)
            else:
                continue
            high_water[name] = high_water.get(name, 0) + 1
            expected[(name, change.change_id)] = (high_water[name], content, position)

    listed: set[tuple[str, str]] = set()
    for name in all_names(mode):
        try:
            infos = reg.versions(name)
        except FunctionNotFound:
            continue
        for info in infos:
            key = (name, info.change_id)
            assert key in expected, f"{key} was never published"
            number, content, _ = expected[key]
            assert (info.version, info.content_id) == (number, content)
            listed.add(key)

    def could_vaporize(op: object, name: str, is_set: bool) -> bool:
        if isinstance(op, VaporizeOp) and op.name == name:
            return True
        if isinstance(op, PublishOp) and is_set and op.record.name == name:
            return True  # a function published under a set's name takes the name
        if isinstance(op, PublishSetOp) and not is_set and op.name == name:
            return True
        owners = {s for s, members in ever_members.items() if name in members}
        return not is_set and could_vaporize_set(op, owners)

    def could_vaporize_set(op: object, sets: set[str]) -> bool:
        return (isinstance(op, VaporizeOp) and op.name in sets) or (
            isinstance(op, PublishOp) and op.record.name in sets
        )

    set_names = {name for name, _ in expected if name in ever_members}
    for key, (_, _, position) in expected.items():
        if key in listed:
            continue
        assert mode != "no-vaporize", f"{key} lost in a history without vaporize"
        name = key[0]
        is_set = name in set_names and any(
            isinstance(op, PublishSetOp) and op.name == name
            for change in ordered
            if change.change_id == key[1]
            for op in change.ops
        )
        assert any(
            could_vaporize(op, name, is_set)
            for change in ordered[position + 1 :]
            for op in change.ops
        ), f"{key} lost, and no later change vaporized it"


# One move of a history. Names of sets and functions are indices into the mode's
# lists, so one plan runs in every mode; deliveries pick changes by index, modulo
# what the source holds, so a plan stays valid while hypothesis shrinks it.
node_ids = st.sampled_from(NODES)
bodies = st.sampled_from(BODIES)
moves = st.one_of(
    st.tuples(st.just("publish"), node_ids, st.sampled_from(FUNCTIONS), bodies),
    st.tuples(
        st.just("publish_set"),
        node_ids,
        st.integers(0, 1),
        st.lists(
            st.tuples(st.sampled_from(MEMBERS), bodies),
            min_size=1,
            max_size=3,
            unique_by=lambda member: member[0],
        ),
    ),
    st.tuples(st.just("rollback"), node_ids, st.integers(0, 3), st.none() | st.integers(1, 5)),
    st.tuples(st.just("vaporize"), node_ids, st.integers(0, 3)),
    st.tuples(
        st.just("deliver"),
        node_ids,
        node_ids,
        st.lists(st.integers(0, 30), max_size=6),
        st.booleans(),
    ),
)


class Simulation:
    """Registries running a plan of moves: local changes and partial exchanges."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.names = all_names(mode)
        self.set_names, self.vaporize_allowed = MODES[mode]
        self.targets = FUNCTIONS + self.set_names  # what rollback/vaporize aim at
        self.nodes = {node: Registry(node) for node in NODES}
        self.now = 0.0

    def run(self, move: tuple[Any, ...]) -> None:
        kind, node, *args = move
        if kind == "deliver":
            self.deliver(node, *args)
            return
        if kind == "vaporize" and not self.vaporize_allowed:
            return
        reg = self.nodes[node]
        self.now += 1.0
        try:
            if kind == "publish":
                name, body = args
                reg.publish([record(name, body)], now=self.now)
            elif kind == "publish_set":
                which, members = args
                records = [record(name, body) for name, body in members]
                reg.publish(records, now=self.now, set_name=self.set_names[which])
            elif kind == "rollback":
                which, to = args
                reg.rollback(self.targets[which], to, now=self.now)
            else:
                reg.vaporize(self.targets[args[0]], now=self.now)
        except (ConfigError, FunctionNotFound, VersionNotFound):
            pass  # refused locally, as a user would be
        check_local_invariants(reg, self.names)

    def deliver(self, source: str, target: str, picks: list[int], batch: bool) -> None:
        held = self.nodes[source].changes_since(VectorClock())
        if source == target or not held:
            return
        chosen = {c.change_id: c for c in (held[i % len(held)] for i in picks)}
        self.apply(self.nodes[target], list(chosen.values()), batch=batch)

    def apply(self, target: Registry, changes: list[Change], *, batch: bool) -> None:
        groups = [changes] if batch else [[c] for c in changes]
        for group in groups:
            before = resolutions(target, self.names)
            reported = target.apply_many(group)
            after = resolutions(target, self.names)
            changed = {name for name in self.names if before[name] != after[name]}
            assert changed <= reported, "apply() must report every name whose lookup changed"
            check_local_invariants(target, self.names)

    def converge(self, rnd: random.Random) -> list[Change]:
        """Give every registry every change, each in its own random order."""
        everything = {
            c.change_id: c for reg in self.nodes.values() for c in reg.changes_since(VectorClock())
        }
        for reg in self.nodes.values():
            order = sorted(everything)
            rnd.shuffle(order)
            self.apply(reg, [everything[i] for i in order], batch=False)
        return list(everything.values())


@pytest.mark.parametrize("mode", list(MODES))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plan=st.lists(moves, min_size=10, max_size=40), rnd=st.randoms(use_true_random=False))
def test_replicas_converge_whatever_the_history_and_delivery_order(
    mode: str, plan: list[tuple[Any, ...]], rnd: random.Random
) -> None:
    sim = Simulation(mode)
    for move in plan:
        sim.run(move)
    changes = sim.converge(rnd)

    first, *others = sim.nodes.values()
    expected = snapshot(first, sim.names)
    for reg in others:
        assert snapshot(reg, sim.names) == expected
    shuffled = list(changes)
    rnd.shuffle(shuffled)
    restarted = Registry.from_changes("fresh", shuffled)
    assert snapshot(restarted, sim.names) == expected
    assert restarted.pending() == []
    check_history(first, changes, mode)


# -- found by the fuzzer (cluster/fuzz.py) ----------------------------------------------


def test_a_replay_reports_a_name_published_and_vaporized_in_one_batch() -> None:
    """A replay (a batch sorting before what is applied) compared live names only: a
    name that went from unknown to a tombstone was not reported, so the node never
    wrote the view that makes a worker answer "was vaporized"."""
    mine = Registry("n1")
    mine.publish([record("f")], now=1.0)
    mine.publish([record("g")], now=1.0)
    other = Registry("n2")
    batch = [other.publish([record("z")], now=1.0), other.vaporize("z", now=2.0)]
    assert order_key(batch[0]) < order_key(mine.changes_since(VectorClock())[-1])
    moved = mine.apply_many([c for c in batch if c is not None])
    assert mine.statistics().rebuilds == 1
    assert "z" in moved
    assert mine.entry("z") is not None and "vaporized" in mine.entry("z").unavailable


def test_a_change_whose_clock_drops_its_predecessors_entry_never_applies() -> None:
    """A dishonest clock ({n2: 2} after a change that counted n1) sorted the change before
    its own predecessor: applied on arrival one at a time, left pending when both came in
    one batch. The state depended on arrival order (rule 3). Now it never applies."""
    n1 = Registry("n1")
    first = n1.publish([record("f")], now=1.0)
    n2 = Registry.from_changes("n2", [first])
    second = n2.publish([record("g")], now=1.0)
    assert first is not None and second is not None
    liar = Change(
        change_id="n2:2",
        origin="n2",
        clock=VectorClock({"n2": 2}),  # n2's first change counted n1:1; this one forgets
        at=2.0,
        ops=(VaporizeOp(name="g"),),
    )
    one_by_one = Registry("a")
    for change in (first, second, liar):
        one_by_one.apply(change)
    all_at_once = Registry.from_changes("b", [liar, second, first])
    for registry in (one_by_one, all_at_once):
        assert [c.change_id for c in registry.pending()] == ["n2:2"]
        assert registry.current_version("g") == 1
    assert one_by_one.clock == all_at_once.clock
