"""The worker pool's decisions alone: leases, starts, deadlines, back-off."""

from __future__ import annotations

from hypothesis import given, settings, strategies as st

from scatter._core._pool import (
    RESTART_BACKOFF,
    KillWorker,
    LeaseGranted,
    LeaseRefused,
    PoolCore,
    StartWorker,
    StopWorker,
)

ENDPOINTS = ("tcp://127.0.0.1:1",)


def pool(**overrides: float) -> PoolCore:
    settings: dict[str, float] = {
        "min_workers": 2,
        "max_workers": 3,
        "kill_grace": 1.0,
        "idle_retire": 60.0,
    }
    settings.update(overrides)
    return PoolCore(**settings)  # type: ignore[arg-type]


def started(core: PoolCore, *slots: int, now: float = 0.0) -> list[object]:
    effects: list[object] = []
    for slot in slots:
        effects += core.started(slot, 100 + slot, (f"tcp://127.0.0.1:{slot}",), now)
    return effects


def test_each_connection_gets_a_worker_of_its_own_while_the_pool_may_grow() -> None:
    core = pool(max_workers=4)
    assert core.start(0.0) == [StartWorker(0), StartWorker(1)]
    started(core, 0, 1)
    first, second = core.lease("a", 0.0), core.lease("b", 0.0)
    assert isinstance(first[0], LeaseGranted) and isinstance(second[0], LeaseGranted)
    assert first[0].endpoints != second[0].endpoints
    assert second[1:] == [StartWorker(2)]  # a spare, kept warm
    # Both workers leased: the third connection waits for a process of its own...
    assert core.lease("c", 0.0) == [StartWorker(3)]
    # ...and takes the first one that comes up.
    (granted, *_) = started(core, 2)
    assert isinstance(granted, LeaseGranted) and granted.waiter == "c"


def test_past_max_workers_leases_share_the_least_loaded() -> None:
    core = pool(max_workers=2)
    core.start(0.0)
    started(core, 0, 1)
    core.lease("a", 0.0)
    core.lease("b", 0.0)
    (shared,) = core.lease("c", 0.0)
    assert isinstance(shared, LeaseGranted)


def test_a_busy_worker_is_not_leased_while_an_idle_one_exists() -> None:
    core = pool()
    core.start(0.0)
    started(core, 0, 1)
    core.observe(0.0, {0: (1, 50.0)})  # slot 0 runs a call until t=50
    (granted,) = core.lease("a", 0.0)[:1]
    assert isinstance(granted, LeaseGranted) and granted.endpoints == ("tcp://127.0.0.1:1",)



def test_a_closed_connections_leases_end_with_it_and_its_waiting_ones_are_dropped() -> None:
    core = pool(max_workers=4)
    core.start(0.0)
    started(core, 0, 1)
    core.lease("a1", 0.0, holder="client-a")
    core.lease("b1", 0.0, holder="client-b")  # and a spare starts (slot 2)
    assert core.lease("a2", 0.0, holder="client-a") == [StartWorker(3)]  # waits
    assert core.statistics().leases == 2
    core.holder_gone("client-a")
    assert core.statistics().leases == 1  # b's remains
    assert started(core, 2, 3) == []  # nobody waits any more: a2's client is gone


def test_a_saturated_pool_says_so_and_queues_behind_the_call_that_began_last() -> None:
    core = pool(min_workers=2, max_workers=2)
    core.start(0.0)
    started(core, 0, 1)
    core.lease("a", 0.0)
    core.lease("b", 0.0)
    assert not core.statistics().saturated
    # Slot 0's call began at t=1 (hung?), slot 1's at t=9: both busy, no start allowed.
    core.observe(1.0, {0: (1, 31.0), 1: (0, 0.0)})
    core.observe(9.0, {0: (1, 31.0), 1: (1, 39.0)})
    (granted,) = core.lease("c", 9.0)
    assert isinstance(granted, LeaseGranted) and granted.slot == 1
    stats = core.statistics()
    assert (stats.saturated, stats.queued, stats.max_workers) == (True, 1, 2)
    core.tick(10.0, {0: (1, 31.0), 1: (1, 0.0)})  # slot 1 is done
    stats = core.statistics()
    assert (stats.saturated, stats.queued) == (False, 0)

def test_a_call_past_deadline_and_grace_gets_its_worker_killed_once() -> None:
    core = pool()
    core.start(0.0)
    started(core, 0, 1)
    assert core.tick(10.0, {0: (1, 10.5)}) == []
    assert core.tick(11.4, {0: (1, 10.5)}) == []  # within the grace: the worker's own job
    # Killed, and its replacement started at once (the floor counts it gone).
    assert core.tick(11.6, {0: (1, 10.5)}) == [KillWorker(0), StartWorker(2)]
    assert core.tick(11.7, {0: (1, 10.5)}) == []
    assert core.exited(0, 12.0) == []


def test_failed_starts_back_off_and_say_why() -> None:
    core = pool(min_workers=1)
    assert core.start(0.0) == [StartWorker(0)]
    core.start_failed(0, "ImportError: no module named x", 0.0)
    assert core.tick(RESTART_BACKOFF / 2, {}) == []
    assert core.tick(RESTART_BACKOFF, {}) == [StartWorker(0)]
    core.start_failed(0, "ImportError: no module named x", RESTART_BACKOFF)
    assert core.tick(RESTART_BACKOFF * 2, {}) == []  # doubled
    assert core.tick(RESTART_BACKOFF * 3, {}) == [StartWorker(0)]
    stats = core.statistics()
    assert stats.start_failures == 2 and "no module named x" in stats.last_start_error
    # While starts fail, one probe at a time: a lease waits for it, starts no other.
    assert core.lease("a", RESTART_BACKOFF * 3) == []


def test_a_lease_with_no_worker_at_all_is_refused_clearly() -> None:
    core = pool(min_workers=1, max_workers=1)
    core.start(0.0)
    assert core.lease("a", 0.0) == []  # waits for the start under way
    (refused,) = core.start_failed(0, "OSError: out of memory", 0.0)
    assert isinstance(refused, LeaseRefused) and refused.waiter == "a"
    assert "out of memory" in refused.message


def test_idle_workers_above_the_floor_retire() -> None:
    core = pool(min_workers=1, max_workers=4, idle_retire=60.0)
    core.start(0.0)
    started(core, 0)
    core.lease("a", 0.0)
    started(core, 1)  # the spare
    core.lease("b", 0.0)
    started(core, 2)
    assert core.tick(61.0, {}) == [StopWorker(0)]


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 6),
    st.lists(st.sampled_from(["lease", "start", "fail"]), max_size=60),
)
def test_every_lease_is_answered_once_whatever_the_order_of_starts(
    max_workers: int, steps: list[str]
) -> None:
    # Found on a real node: past max_workers, leases beyond the starts under way
    # waited forever (20 concurrent leases, 16 workers: 4 never answered).
    core = pool(min_workers=1, max_workers=max_workers)
    starting: list[int] = []
    answered: list[object] = []

    def perform(effects: list[object]) -> None:
        for effect in effects:
            if isinstance(effect, StartWorker):
                starting.append(effect.slot)
            elif isinstance(effect, LeaseGranted | LeaseRefused):
                answered.append(effect.waiter)

    perform(core.start(0.0))
    asked = 0
    now = 0.0
    for step in [*steps, *["start"] * 20]:
        now += 1.0  # past any back-off
        if step == "lease":
            perform(core.lease(asked, now))
            asked += 1
        elif starting:
            slot = starting.pop(0)
            if step == "fail":
                perform(core.start_failed(slot, "boom", now))
            else:
                perform(core.started(slot, 1, (f"e{slot}",), now))
        perform(core.tick(now, {}))
    assert sorted(answered) == list(range(asked))  # each once, none left waiting
