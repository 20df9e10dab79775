"""The worker pool: where jobs run, behind one interface for every backend.

`run(worker, job_input)` returns at once. While the job runs, the pool calls the listener's
`on_step` with each engine step's outputs, then `on_done` with the job's results; if the
worker dies instead, `on_failure`. Calls come from the pool's own threads.

Backends: `LocalPool` runs each worker in a thread of this process (tests, small set-ups);
`gpu_pool.ray_pool.RayPool` runs one Ray actor per device.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
from dataclasses import dataclass
from typing import Protocol

from tokenpool.gpu_pool.protocol import JobDone, JobInput, StepOutputs
from tokenpool.gpu_pool.pool_config import PoolConfig
from tokenpool.gpu_pool.profiling import WorkerProfile, profile_worker

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    id: int
    role: str  # "prefill", "decode" or "prefill+decode"
    device: str
    pid: int
    alive: bool = True
    restarts: int = 0
    node: str = ""  # the Ray node id, or the host name for workers of this process
    starting: bool = False  # asked for, not placed and built yet (an elastic pool's growth)


class PoolListener(Protocol):
    def on_step(self, out: StepOutputs) -> None: ...

    def on_done(self, done: JobDone) -> None: ...

    def on_failure(self, worker: int, error: BaseException) -> None:
        """The worker died during a job: its job and every request it held are lost, and it
        takes no jobs until `on_joined`."""

    def on_joined(self, worker: int) -> None:
        """The worker is up again after a failure, or up for the first time after
        `add_workers`: it takes jobs from now on."""


class WorkerPool(Protocol):
    config: PoolConfig

    def start(self, listener: PoolListener) -> None:
        """Build the first `config.num_workers` workers; returns when all can take jobs."""

    def profile(self, plan) -> WorkerProfile:
        """A short profile of a worker's engines (`gpu_pool.profiling.EngineProfilePlan`);
        called once, before the first job."""

    def run(self, worker: int, job: JobInput) -> None: ...

    def add_workers(self, ids) -> None:
        """Start workers with these ids; returns at once, and each reports `on_joined`."""

    def retire(self, worker: int) -> None:
        """Stop a worker that holds nothing (drained, or still starting)."""

    def workers(self) -> list[WorkerInfo]: ...

    def close(self) -> None: ...


class LocalPool:
    """Workers as threads of this process, each with its own Worker over its own arena."""

    def __init__(self, config: PoolConfig, make_runner):
        """`make_runner(worker_id)` builds a worker and returns its `JobRunner`."""
        self.config = config
        self._make_runner = make_runner
        self._inboxes: dict[int, queue.SimpleQueue] = {}
        self._threads: dict[int, threading.Thread] = {}
        self._runners: dict = {}
        self._devices: dict[int, str] = {}
        self._restarts: dict[int, int] = {}
        self._listener: PoolListener | None = None

    def start(self, listener: PoolListener) -> None:
        import torch

        torch.set_num_threads(max(1, self.config.torch_threads * self.config.num_workers))
        self._listener = listener
        ids = range(self.config.num_workers)
        for i in ids:
            self._restarts[i] = -1  # its first build is no restart
            self._build(i)
        for i in ids:
            self._start_thread(i)

    def add_workers(self, ids) -> None:
        for i in ids:
            if i in self._threads:
                raise ValueError(f"worker {i} is in the pool already")
            self._restarts[i] = -1
            self._runners[i] = None
            self._start_thread(i, joining=True)

    def retire(self, worker: int) -> None:
        self._inboxes[worker].put(None)
        self._threads.pop(worker).join(timeout=30)
        for table in (self._inboxes, self._runners, self._devices, self._restarts):
            table.pop(worker, None)

    def _start_thread(self, worker: int, joining: bool = False) -> None:
        inbox = self._inboxes[worker] = queue.SimpleQueue()
        thread = threading.Thread(target=self._serve, args=(worker, inbox, joining),
                                  name=f"tokenpool-worker-{worker}", daemon=True)
        self._threads[worker] = thread
        thread.start()

    def _serve(self, worker: int, inbox: queue.SimpleQueue, joining: bool) -> None:
        listener = self._listener
        if joining:
            self._build(worker)
            listener.on_joined(worker)
        while (job := inbox.get()) is not None:
            try:
                runner = self._runners[worker] or self._build(worker)
                for item in runner.run(job):
                    if isinstance(item, StepOutputs):
                        listener.on_step(item)
                    else:
                        listener.on_done(item)
            except Exception as exc:
                # The worker's state is unknown after a failed job: start it afresh, as Ray
                # restarts a dead actor, and report everything it held as lost.
                self._restart(worker)
                listener.on_failure(worker, exc)
                listener.on_joined(worker)
        if self._runners.get(worker) is not None:
            self._runners[worker].close()

    def _restart(self, worker: int) -> None:
        broken, self._runners[worker] = self._runners[worker], None
        try:
            if broken is not None:
                broken.close()
        except Exception:  # closing a broken worker may fail too; it is replaced anyway
            pass
        try:
            self._build(worker)
        except Exception:  # its next job tries again, and fails (so is reported) if it cannot
            log.exception("worker %d could not be rebuilt", worker)

    def _build(self, worker: int):
        runner = self._runners[worker] = self._make_runner(worker)
        self._devices[worker] = str(runner.worker.device)
        self._restarts[worker] += 1
        return runner

    def profile(self, plan):
        """A short profile of worker 0 (all workers are alike).

        Runs before any job: worker 0's thread is idle.
        """
        return profile_worker(self._runners[0].worker, plan)

    def run(self, worker: int, job: JobInput) -> None:
        self._inboxes[worker].put(job)

    def workers(self) -> list[WorkerInfo]:
        host = socket.gethostname()
        infos = []
        for i, thread in sorted(list(self._threads.items())):
            runner = self._runners.get(i)
            infos.append(WorkerInfo(i, self.config.role(i), self._devices.get(i, ""),
                                    os.getpid(), thread.is_alive() and runner is not None,
                                    max(0, self._restarts.get(i, 0)), host,
                                    starting=i not in self._devices))
        return infos

    def close(self) -> None:
        for inbox in list(self._inboxes.values()):
            inbox.put(None)
        for thread in list(self._threads.values()):
            thread.join(timeout=30)
