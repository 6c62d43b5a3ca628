################################################################
# The worker pool's decisions
################################################################
#
# Rule 1: this file decides which worker a client connection gets, when a worker
# starts, when one is killed and when one retires. The node's driver starts and
# kills processes and reads the shared slots; it never decides. No I/O, no clock
# reads: every input carries `now` (time.monotonic() seconds, the clock the
# workers write their deadlines in), every output is an effect.
#
# Rule 2: each client connection leases one worker and sends its calls there
# directly. A lease goes to an idle worker with the fewest leases; when every
# worker already has one, a new worker starts (up to max_workers; past that,
# leases share an idle worker, or, when every worker is busy (saturated), the one
# whose call began last: a call running long is the likeliest to be hung). One
# spare unleased worker is kept warm.
#
# Rule 2b: a lease lives as long as the connection that asked for it (its holder:
# the client's control connection). A client that exits or closes drops that
# connection, and `holder_gone` frees its leases at once; releases and the idle
# expiry in tick() are the other ways a lease ends.
#
# Rule 3: a worker interrupts its own call at the deadline (its own timer) and
# exits if the call is still running `kill_grace` later. The pool is the backstop
# for code that holds the interpreter (C code): at deadline + kill_grace, kill.
#
# Rule 4: a worker that fails to start is retried with exponential back-off
# (`RESTART_BACKOFF` to `RESTART_BACKOFF_MAX`), and the failure is reported in
# statistics(); it never ends the node. Leases waiting for it get a shared live
# worker, or a clear error when there is none.

"""The worker pool's decisions: leases, starts, deadlines, retirement; pure."""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = [
    "KillWorker",
    "LeaseGranted",
    "LeaseRefused",
    "PoolCore",
    "PoolStatistics",
    "StartWorker",
    "StopWorker",
]

RESTART_BACKOFF = 0.25  # seconds before the first retry of a failed worker start
RESTART_BACKOFF_MAX = 30.0  # seconds; the back-off doubles up to this

# A slot reading: (number of the call the worker runs or ran last, its deadline or 0.0).
SlotReading = tuple[int, float]


# -- effects ------------------------------------------------------------------


@dataclass(frozen=True)
class StartWorker:
    slot: int


@dataclass(frozen=True)
class KillWorker:
    """SIGKILL: the call ignored its own interrupt past the grace period."""

    slot: int


@dataclass(frozen=True)
class StopWorker:
    """SIGTERM: an idle worker above the pool's floor retires."""

    slot: int


@dataclass(frozen=True)
class LeaseGranted:
    waiter: object  # what the caller of lease() passed: the driver's reply address
    lease: int
    endpoints: tuple[str, ...]
    slot: int = -1  # the worker's slot: a client on this machine claims it there per call


@dataclass(frozen=True)
class LeaseRefused:
    waiter: object
    message: str


PoolEffect = StartWorker | KillWorker | StopWorker | LeaseGranted | LeaseRefused


@dataclass(frozen=True)
class PoolStatistics:
    workers: int
    busy: int
    leases: int
    started: int
    replaced: int
    start_failures: int  # failed starts in a row; 0 once a start succeeds
    last_start_error: str  # why the last failed start failed ("" if none did)
    max_workers: int = 0
    # Every worker busy and no more may start: a new connection's calls wait for one.
    saturated: bool = False
    # Leases given a busy worker (or waiting for one) since the pool became saturated.
    queued: int = 0


# -- state --------------------------------------------------------------------


@dataclass(eq=False)
class _Worker:
    slot: int
    pid: int
    endpoints: tuple[str, ...]
    last_activity: float
    leases: set[int] = field(default_factory=set)
    last_call_number: int = 0
    deadline: float = 0.0  # of the running call, 0.0 when idle (from the last reading)
    call_seen: float = 0.0  # when a reading first showed the last call's number
    killed: bool = False


class PoolCore:
    """Decisions for a pool of worker processes, driven by events with ``now``.

    Example (the driver)::

        pool = PoolCore(min_workers=2, max_workers=16, kill_grace=1.0, idle_retire=60.0)
        effects = pool.start(now)                 # StartWorker(0), StartWorker(1)
        effects = pool.started(0, pid, endpoints, now)
        effects = pool.lease(reply_to, now)       # LeaseGranted(reply_to, 1, endpoints)
        effects = pool.tick(now, {0: (n, deadline), ...})
    """

    def __init__(
        self, *, min_workers: int, max_workers: int, kill_grace: float, idle_retire: float
    ) -> None:
        self.min_workers = min_workers
        self.max_workers = max_workers
        self.kill_grace = kill_grace
        self.idle_retire = idle_retire
        self._workers: dict[int, _Worker] = {}  # {slot: worker}
        self._starting: set[int] = set()  # slots whose process is starting
        self._waiting: list[tuple[object, object]] = []  # (waiter, holder), oldest first
        self._holders: dict[int, object] = {}  # {lease: the connection it lives with}
        self._queued = 0  # see PoolStatistics.queued
        self._lease_ids = itertools.count(1)
        self._started = 0
        self._replaced = 0
        self._failures = 0
        self._last_error = ""
        self._retry_at = 0.0

    # -- events ---------------------------------------------------------------

    def start(self, now: float) -> list[PoolEffect]:
        return self._fill(now)

    def started(
        self, slot: int, pid: int, endpoints: tuple[str, ...], now: float
    ) -> list[PoolEffect]:
        self._starting.discard(slot)
        worker = self._workers[slot] = _Worker(slot, pid, endpoints, last_activity=now)
        self._started += 1
        self._failures = 0
        self._last_error = ""
        if not self._waiting:
            return []
        # The oldest waiter takes this process; the others wait for the starts under way.
        return [self._grant(*self._waiting.pop(0), worker), *self._settle(), *self._keep_a_spare(now)]

    def start_failed(self, slot: int, error: str, now: float) -> list[PoolEffect]:
        self._starting.discard(slot)
        self._failures += 1
        self._last_error = error
        backoff = min(RESTART_BACKOFF * 2 ** (self._failures - 1), RESTART_BACKOFF_MAX)
        self._retry_at = now + backoff
        return self._settle(
            f"this node could not start a worker process ({error}); it retries in "
            f"{backoff:g} s, see `scatter node status` and the node's log"
        )

    def exited(self, slot: int, now: float) -> list[PoolEffect]:
        worker = self._workers.pop(slot, None)
        if worker is None:
            return []
        for lease in worker.leases:
            self._holders.pop(lease, None)
        self._replaced += 1
        return self._fill(now) + self._settle()

    def tick(self, now: float, readings: Mapping[int, SlotReading]) -> list[PoolEffect]:
        """Look at every worker's slot: deadlines, activity, retirement; retry starts."""
        effects: list[PoolEffect] = []
        for worker in list(self._workers.values()):
            reading = readings.get(worker.slot)
            if reading is not None:
                self._observe(worker, reading, now)
            if worker.killed:
                continue
            if worker.deadline and now > worker.deadline + self.kill_grace:
                worker.killed = True
                effects.append(KillWorker(worker.slot))
            elif not worker.deadline and now - worker.last_activity > self.idle_retire:
                # A holder whose end this node cannot see (a client across a network
                # that vanished): its lease ends after the idle period.
                for lease in worker.leases:
                    self._holders.pop(lease, None)
                worker.leases.clear()
                if self._live() > self.min_workers + 1:
                    worker.killed = True
                    effects.append(StopWorker(worker.slot))
        if not self.saturated():
            self._queued = 0  # the count is of the saturation under way
        return effects + self._fill(now)

    def observe(self, now: float, readings: Mapping[int, SlotReading]) -> None:
        """Take fresh slot readings without deciding anything (before a lease)."""
        for slot, reading in readings.items():
            worker = self._workers.get(slot)
            if worker is not None:
                self._observe(worker, reading, now)

    def lease(self, waiter: object, now: float, holder: object = None) -> list[PoolEffect]:
        """Pick (or start) a worker for a new client connection (rule 2).

        ``holder`` is what the lease lives with (rule 2b): :meth:`holder_gone` with it
        frees the lease. None: only a release or the idle expiry ends it.
        """
        idle = [w for w in self._workers.values() if not w.deadline and not w.killed]
        worker = min(idle, key=lambda w: len(w.leases), default=None)
        if worker is not None and not worker.leases:
            return [self._grant(waiter, holder, worker), *self._keep_a_spare(now)]
        if self._live() < self.max_workers and self._may_start(now):
            # A new process of its own beats sharing a worker that may be busy.
            self._waiting.append((waiter, holder))
            return self._start_one(now)
        if worker is None and self.saturated():
            self._queued += 1
            worker = self._least_likely_hung()
        worker = worker or self._least_loaded()
        if worker is not None:
            return [self._grant(waiter, holder, worker)]
        self._waiting.append((waiter, holder))
        return self._settle()

    def release(self, lease: int) -> None:
        # A scan, not an index: releases are rare and workers few, and one record of
        # who holds what cannot disagree with itself.
        self._holders.pop(lease, None)
        for worker in self._workers.values():
            worker.leases.discard(lease)

    def holder_gone(self, holder: object) -> None:
        """The connection ``holder`` closed: free its leases, forget its waiting ones."""
        for lease in [lease for lease, held_by in self._holders.items() if held_by == holder]:
            self.release(lease)
        self._waiting = [(w, h) for w, h in self._waiting if h is None or h != holder]

    # -- answers --------------------------------------------------------------

    def slots(self) -> list[int]:
        """The slots of live workers: what the driver reads for :meth:`tick`."""
        return list(self._workers)

    def saturated(self) -> bool:
        """Every worker is busy and no other may start: new calls wait for one."""
        live = [w for w in self._workers.values() if not w.killed]
        full = self._live() >= self.max_workers or (self._failures > 0 and not self._starting)
        return bool(live) and full and all(w.deadline for w in live)

    def statistics(self) -> PoolStatistics:
        live = list(self._workers.values())
        saturated = self.saturated()
        return PoolStatistics(
            workers=len(live),
            busy=sum(1 for w in live if w.deadline),
            leases=sum(len(w.leases) for w in live),
            started=self._started,
            replaced=self._replaced,
            start_failures=self._failures,
            last_start_error=self._last_error,
            max_workers=self.max_workers,
            saturated=saturated,
            queued=self._queued + len(self._waiting) if saturated else len(self._waiting),
        )

    # -- internals ------------------------------------------------------------

    def _observe(self, worker: _Worker, reading: SlotReading, now: float) -> None:
        number, deadline = reading
        if number != worker.last_call_number:
            worker.call_seen = now
        if number != worker.last_call_number or deadline:
            worker.last_call_number = number
            worker.last_activity = now
        worker.deadline = deadline

    def _live(self) -> int:
        """Workers running (and not on their way out) or starting: what the bounds count."""
        return sum(not w.killed for w in self._workers.values()) + len(self._starting)

    def _fill(self, now: float) -> list[PoolEffect]:
        effects: list[PoolEffect] = []
        while self._live() < self.min_workers and self._may_start(now):
            effects += self._start_one(now)
        return effects

    def _may_start(self, now: float) -> bool:
        # While starts fail: one probe at a time, after the back-off.
        return not self._failures or (now >= self._retry_at and not self._starting)

    def _start_one(self, now: float) -> list[PoolEffect]:
        if not self._may_start(now):
            return []
        used = self._workers.keys() | self._starting
        slot = next(s for s in itertools.count() if s not in used)
        self._starting.add(slot)
        return [StartWorker(slot)]

    def _keep_a_spare(self, now: float) -> list[PoolEffect]:
        has_spare = any(not w.leases for w in self._workers.values()) or self._starting
        if not has_spare and self._live() < self.max_workers:
            return self._start_one(now)
        return []

    def _settle(self, why: str = "") -> list[PoolEffect]:
        """Keep no more waiters than starts under way: the rest share, or are refused.

        A start serves one waiter, so one beyond them would wait forever (a start failed,
        the pool is at max_workers, a client asked twice for one connection): it shares
        the least loaded worker, waits for the first one up if none is, and is refused
        only when none is running or starting.
        """
        effects: list[PoolEffect] = []
        while len(self._waiting) > len(self._starting):
            worker = self._least_loaded()
            if worker is None and self._starting:
                break  # nothing to share yet: the first start serves them (started())
            waiter, holder = self._waiting.pop()
            if worker is not None:
                effects.append(self._grant(waiter, holder, worker))
            else:
                effects.append(LeaseRefused(waiter, why or self._no_worker_message()))
        return effects

    def _least_loaded(self) -> _Worker | None:
        live = [w for w in self._workers.values() if not w.killed]
        return min(live, key=lambda w: len(w.leases), default=None)

    def _least_likely_hung(self) -> _Worker | None:
        """Of busy workers, the one whose call began last (fewest leases on a tie)."""
        live = [w for w in self._workers.values() if not w.killed]
        return max(live, key=lambda w: (w.call_seen, -len(w.leases)), default=None)

    def _grant(self, waiter: object, holder: object, worker: _Worker) -> LeaseGranted:
        lease = next(self._lease_ids)
        worker.leases.add(lease)
        if holder is not None:
            self._holders[lease] = holder
        return LeaseGranted(waiter, lease, worker.endpoints, worker.slot)

    def _no_worker_message(self) -> str:
        why = f" (the last start failed: {self._last_error})" if self._last_error else ""
        return (
            f"this node has no worker process{why}; it keeps retrying, see "
            "`scatter node status` and the node's log"
        )
