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


class PoolListener(Protocol):
    def on_step(self, out: StepOutputs) -> None: ...

    def on_done(self, done: JobDone) -> None: ...

    def on_failure(self, worker: int, error: BaseException) -> None:
        """The worker died during a job: its job and every request it held are lost."""


class WorkerPool(Protocol):
    config: PoolConfig

    def start(self, listener: PoolListener) -> None:
        """Build every worker; returns when all can take jobs."""

    def profile(self, plan) -> WorkerProfile:
        """A short profile of a worker's engines (`gpu_pool.profiling.EngineProfilePlan`);
        called once, before the first job."""

    def run(self, worker: int, job: JobInput) -> None: ...

    def workers(self) -> list[WorkerInfo]: ...

    def close(self) -> None: ...


class LocalPool:
    """Workers as threads of this process, each with its own Worker over its own arena."""

    def __init__(self, config: PoolConfig, make_runner):
        """`make_runner(worker_id)` builds a worker and returns its `JobRunner`."""
        self.config = config
        self._make_runner = make_runner
        self._inboxes = [queue.SimpleQueue() for _ in range(config.num_workers)]
        self._threads: list[threading.Thread] = []
        self._devices: list[str] = []

    def start(self, listener: PoolListener) -> None:
        import torch

        torch.set_num_threads(max(1, self.config.torch_threads * self.config.num_workers))
        runners = [self._make_runner(i) for i in range(self.config.num_workers)]
        self._runners = runners
        self._devices = [str(r.worker.device) for r in runners]
        self._restarts = [0] * len(runners)
        for i in range(len(runners)):
            thread = threading.Thread(target=self._serve, args=(i, self._inboxes[i], listener),
                                      name=f"tokenpool-worker-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def _serve(self, worker: int, inbox: queue.SimpleQueue, listener: PoolListener) -> None:
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
        if self._runners[worker] is not None:
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
        self._runners[worker] = self._make_runner(worker)
        self._restarts[worker] += 1
        return self._runners[worker]

    def profile(self, plan):
        """A short profile of worker 0 (all workers are alike).

        Runs before any job: worker 0's thread is idle.
        """
        return profile_worker(self._runners[0].worker, plan)

    def run(self, worker: int, job: JobInput) -> None:
        self._inboxes[worker].put(job)

    def workers(self) -> list[WorkerInfo]:
        return [WorkerInfo(i, self.config.role(i), self._devices[i], os.getpid(),
                           self._threads[i].is_alive() and self._runners[i] is not None,
                           self._restarts[i])
                for i in range(self.config.num_workers)]

    def close(self) -> None:
        for inbox in self._inboxes:
            inbox.put(None)
        for thread in self._threads:
            thread.join(timeout=30)
