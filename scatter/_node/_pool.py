"""The worker pool: spawns, leases, supervises and replaces worker processes.

Rules of the pool:

1. Each client connection leases one worker and sends its calls there directly. A lease
   goes to an idle worker with the fewest leases; when every worker already has one, a
   new worker is started (up to ``max_workers``; past that, leases share the least
   loaded). One spare unleased worker is kept warm so a new client rarely waits for a
   process to start.
2. Leases are advice, not locks: any worker answers any call. A client that dies without
   releasing its lease leaves it behind; a worker that has run no call for
   ``worker_idle_retire`` seconds forgets its leases, and above ``min_workers`` retires.
3. A call past its deadline gets SIGUSR1 (the worker raises inside the function); past
   ``deadline + kill_grace`` the worker gets SIGKILL. A worker that exits for any reason
   is replaced if the pool is below ``min_workers``; its clients see their connection drop.
   (Workers also enforce their own deadlines, which hold when the node is gone: see
   ``_worker.py``.)
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

import trio

from .._config import NodeConfig, parse_address
from .._exceptions import ScatterError
from ._slots import MAX_SLOTS, SharedSlots


@dataclass(eq=False)
class WorkerProcess:
    slot: int
    process: trio.Process
    endpoints: tuple[str, ...]  # (tcp endpoint, ipc endpoint for clients on this machine)
    leases: set[int] = field(default_factory=set)
    last_call_number: int = 0
    last_activity: float = field(default_factory=time.monotonic)
    interrupted_call: int = 0  # the call number already sent SIGUSR1


@dataclass(frozen=True)
class PoolStatistics:
    workers: int
    busy: int
    leases: int
    started: int
    replaced: int


class WorkerPool:
    """Resource handling: every worker is a child process owned by the pool's nursery; the
    pool kills them all when its nursery is cancelled. While the pool runs it holds the
    write end of a pipe whose read end every worker gets (``--parent-fd``): when the node
    dies, even by SIGKILL, the kernel closes it and the workers see EOF and exit.

    Error handling: a worker that fails to start raises from ``lease()`` as a ScatterError;
    a worker that dies later is replaced, never propagated.
    """

    def __init__(self, config: NodeConfig, slots: SharedSlots) -> None:
        self.config = config
        self.slots = slots
        self.host = parse_address(config.address)[0]
        self.workers: dict[int, WorkerProcess] = {}  # {slot: worker}
        self._lease_ids = itertools.count(1)
        self._starting: set[int] = set()  # slots of workers not READY yet
        self._started = 0
        self._replaced = 0
        self._nursery: trio.Nursery | None = None
        self._parent_fd = -1  # the read end of the lifetime pipe, passed to each worker

    # -- lifecycle --

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        # Worker sockets of an earlier start (a node killed with SIGKILL): never reused.
        for stale in self.slots.path.parent.glob("worker-*.sock"):
            with contextlib.suppress(OSError):
                stale.unlink()
        # Nobody writes to this pipe; its write end closes when the node dies (workers:
        # EOF). Both ends are close-on-exec; each worker gets the read end by pass_fds.
        self._parent_fd, lifetime = os.pipe()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                try:
                    async with trio.open_nursery() as starting:
                        for _ in range(self.config.min_workers):
                            starting.start_soon(self._spawn)
                    nursery.start_soon(self._supervise)
                    task_status.started()
                    await trio.sleep_forever()
                finally:
                    self._kill_all()
        finally:  # after the nursery: no spawn is using the read end any more
            os.close(lifetime)
            os.close(self._parent_fd)

    def _kill_all(self) -> None:
        for worker in list(self.workers.values()):
            if worker.process.returncode is None:
                worker.process.kill()

    def _free_slot(self) -> int:
        used = self.workers.keys() | self._starting
        for slot in range(MAX_SLOTS):
            if slot not in used:
                return slot
        raise ScatterError("no free worker slot")

    async def _spawn(self) -> WorkerProcess:
        slot = self._free_slot()
        self._starting.add(slot)
        try:
            self.slots.clear(slot)
            command = [
                sys.executable,
                "-m",
                "scatter._node._worker",
                "--data-dir",
                str(self.config.data_dir),
                "--run-dir",
                str(self.slots.path.parent),
                "--slot",
                str(slot),
                "--host",
                self.host,
                "--timeout",
                str(self.config.call_timeout),
                "--max-message-bytes",
                str(self.config.max_message_bytes),
                "--kill-grace",
                str(self.config.kill_grace),
                "--parent-fd",
                str(self._parent_fd),
            ]
            process = await trio.lowlevel.open_process(
                command, stdout=subprocess.PIPE, pass_fds=(self._parent_fd,)
            )
            try:
                endpoints = await self._read_ready(process)
            except BaseException:
                process.kill()
                raise
        finally:
            self._starting.discard(slot)
        worker = WorkerProcess(slot, process, endpoints)
        self.workers[slot] = worker
        self._started += 1
        assert self._nursery is not None
        self._nursery.start_soon(self._watch, worker)
        return worker

    async def _read_ready(self, process: trio.Process) -> tuple[str, ...]:
        assert process.stdout is not None
        buffer = b""
        with trio.fail_after(60):
            while b"\n" not in buffer:
                chunk = await process.stdout.receive_some(4096)
                if not chunk:
                    raise ScatterError(
                        f"a worker process exited while starting (exit code {process.returncode})"
                    )
                buffer += chunk
        line = buffer.split(b"\n", 1)[0].decode()
        if not line.startswith("READY "):
            raise ScatterError(f"a worker process said {line!r} instead of READY")
        await process.stdout.aclose()
        return tuple(line.split()[1:])

    async def _watch(self, worker: WorkerProcess) -> None:
        await worker.process.wait()
        for endpoint in worker.endpoints:  # its Unix socket path, unique to that process
            if endpoint.startswith("ipc://"):
                with contextlib.suppress(OSError):
                    os.unlink(endpoint[len("ipc://") :])
        if self.workers.get(worker.slot) is worker:
            del self.workers[worker.slot]
            self.slots.clear(worker.slot)
            self._replaced += 1
            if self._live_count() < self.config.min_workers:
                assert self._nursery is not None
                self._nursery.start_soon(self._spawn_quietly)

    async def _spawn_quietly(self) -> None:
        try:
            await self._spawn()
        except ScatterError as exc:
            print(f"scatter node: could not start a worker: {exc}", file=sys.stderr)

    def _live_count(self) -> int:
        """Workers running or starting: what the pool's bounds count."""
        return len(self.workers) + len(self._starting)

    # -- leases --

    async def lease(self) -> tuple[int, tuple[str, ...]]:
        """Pick (or start) a worker for a new client connection (rule 1)."""
        candidates = [w for w in self.workers.values() if not self._busy(w)]
        worker = min(candidates, key=lambda w: len(w.leases), default=None)
        if (worker is None or worker.leases) and self._live_count() < self.config.max_workers:
            worker = await self._spawn()
        if worker is None:
            live = list(self.workers.values())
            if not live:
                raise ScatterError("this node has no worker processes")
            worker = min(live, key=lambda w: len(w.leases))
        lease = next(self._lease_ids)
        worker.leases.add(lease)
        self._keep_a_spare()
        return lease, worker.endpoints

    def release(self, lease: int) -> None:
        # A scan, not an index: releases are rare and workers few, and one record of
        # who holds what cannot disagree with itself.
        for worker in self.workers.values():
            worker.leases.discard(lease)

    def _keep_a_spare(self) -> None:
        has_spare = any(not w.leases for w in self.workers.values()) or self._starting
        if not has_spare and self._live_count() < self.config.max_workers:
            assert self._nursery is not None
            self._nursery.start_soon(self._spawn_quietly)

    def _busy(self, worker: WorkerProcess) -> bool:
        return self.slots.read(worker.slot)[1] != 0.0

    # -- supervision --

    async def _supervise(self) -> None:
        interval = self.config.supervise_interval
        while True:
            await trio.sleep(interval)
            now = time.monotonic()
            for worker in list(self.workers.values()):
                number, deadline = self.slots.read(worker.slot)
                if number != worker.last_call_number or deadline:
                    worker.last_call_number = number
                    worker.last_activity = now
                if deadline and now > deadline:
                    self._enforce_deadline(worker, number, deadline, now)
                elif now - worker.last_activity > self.config.worker_idle_retire:
                    self._retire_idle(worker)

    def _enforce_deadline(
        self, worker: WorkerProcess, number: int, deadline: float, now: float
    ) -> None:
        if worker.process.returncode is not None:
            return
        if worker.interrupted_call != number:
            worker.interrupted_call = number
            worker.process.send_signal(signal.SIGUSR1)
        elif now > deadline + self.config.kill_grace:
            # The function ignored the interrupt (C code holding the GIL, a blocked
            # syscall): only a new process gets this slot back.
            worker.process.kill()

    def _retire_idle(self, worker: WorkerProcess) -> None:
        worker.leases.clear()
        if self._live_count() > self.config.min_workers + 1:
            worker.process.terminate()

    def statistics(self) -> PoolStatistics:
        live = list(self.workers.values())
        return PoolStatistics(
            workers=len(live),
            busy=sum(1 for w in live if self._busy(w)),
            leases=sum(len(w.leases) for w in live),
            started=self._started,
            replaced=self._replaced,
        )
