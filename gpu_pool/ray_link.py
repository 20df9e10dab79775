"""One Ray worker's link: its actor, its queue of jobs, and the thread that feeds them to it.

Every job ends exactly once, as a JobDone or as a failure: an actor that dies after a job's
JobDone was handed on (its task still finishing) fails the next job instead, which the
controller may have sent already. After a death the thread waits, bounded, for Ray to
restart the actor before it sends the next job.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time

from tokenpool.gpu_pool.pool import PoolListener, WorkerInfo
from tokenpool.gpu_pool.protocol import JobInput, StepOutputs

RESTART_POLL_S = 0.2  # how often to ask a restarting actor whether it is back


def ray_module():
    """Ray, imported only when a pool starts: installs that never use it import us fast."""
    import ray

    return ray


class WorkerRestarted(RuntimeError):
    """A job reached a restarted actor: the requests the job expects there are gone."""


class WorkerLink:
    """One worker's actor, its queue of jobs and the thread that feeds them to it."""

    def __init__(self, worker_id: int, role: str, actor, pid: int, device: str,
                 listener: PoolListener, restart_timeout_s: float):
        self.id = worker_id
        self.actor = actor
        self.listener = listener
        self.restart_timeout_s = restart_timeout_s
        # Replaced whole, never mutated: workers() reads it from other threads.
        self.info = WorkerInfo(worker_id, role, device, pid)
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.stopping = threading.Event()
        self.lost: BaseException | None = None  # why the actor is not back, while it is not
        self.lost_after_end: BaseException | None = None  # a death the next job must report
        self.thread = threading.Thread(target=self._serve, daemon=True,
                                       name=f"tokenpool-ray-worker-{worker_id}")

    def _serve(self) -> None:
        ray = ray_module()
        while (job := self.inbox.get()) is not None:
            if self.lost_after_end is not None:
                # The actor died after its last job had ended: this job's requests were held
                # there and are gone. Failing this job tells the controller once, for one job.
                error, self.lost_after_end = self.lost_after_end, None
                self.listener.on_failure(self.id, error)
                continue
            if not self.info.alive and not self._await_restart(ray):
                self.listener.on_failure(self.id, self.lost)
                continue
            self._run(ray, job)

    def _run(self, ray, job: JobInput) -> None:
        """Run one job; every job ends exactly once, as a JobDone or as an on_failure."""
        ended = _Ended()
        try:
            self._stream(ray, job, ended)
            return
        except ray.exceptions.RayActorError as exc:  # the actor died
            error, killed = exc, False
        except Exception as exc:
            # A failed job leaves the worker in an unknown state and on_failure tells the
            # controller that everything it held is lost: restarting the actor makes that
            # true, as LocalPool rebuilds its worker. A refusal by a restarted one is true
            # already.
            error, killed = exc, not _refused_as_restarted(exc)
            if killed:
                ray.kill(self.actor, no_restart=False)
        self.info = dataclasses.replace(self.info, alive=False)
        if ended.done:
            # Its JobDone is delivered and the controller may have sent the next job already:
            # a failure now would be charged to that one, which has not even started.
            self.lost_after_end = error
        else:
            self.listener.on_failure(self.id, error)
        self._await_restart(ray, new_process=killed)

    def _stream(self, ray, job: JobInput, ended: _Ended) -> None:
        for ref in self.actor.run.options(num_returns="streaming").remote(job, self.info.pid):
            item = ray.get(ref)
            if isinstance(item, StepOutputs):
                self.listener.on_step(item)
            else:
                ended.done = True
                self.listener.on_done(item)
        if not ended.done:
            raise RuntimeError(f"worker {self.id}: job ended without a JobDone")

    def _await_restart(self, ray, new_process: bool = False) -> bool:
        """Wait, bounded, for Ray to bring the actor back; True once it answers again.

        With `new_process`, only an answer from a new process counts: ray.kill returns
        before the old one is gone, and the old one may still answer.
        """
        deadline = time.monotonic() + self.restart_timeout_s
        pending = None  # one question at a time, so a slow restart does not pile them up
        while not self.stopping.is_set() and time.monotonic() < deadline:
            pending = pending or self.actor.describe.remote()
            # Short waits, so close() is never held up for long by a restart.
            if not ray.wait([pending], timeout=RESTART_POLL_S)[0]:
                continue
            answered, pending = pending, None
            try:
                pid, device = ray.get(answered)
            except ray.exceptions.ActorUnavailableError:  # restarting: calls are refused
                self.stopping.wait(RESTART_POLL_S)
                continue
            except Exception as exc:  # ActorDiedError: out of restarts, gone for good
                self.lost = exc
                return False
            if new_process and pid == self.info.pid:
                self.stopping.wait(RESTART_POLL_S)
                continue
            self._came_back(pid, device)
            return True
        self.lost = TimeoutError(f"worker {self.id}'s actor did not come back within "
                                 f"{self.restart_timeout_s:g} s")
        return False

    def _came_back(self, pid: int, device: str) -> None:
        # Unavailable is also raised for a network blip: only a new process is a restart.
        restarts = self.info.restarts + (pid != self.info.pid)
        self.info = dataclasses.replace(self.info, device=device, pid=pid, alive=True,
                                        restarts=restarts)
        self.lost = None


class _Ended:
    """Whether a job's JobDone has been handed on: a death after it is not the job's."""

    done = False


def _refused_as_restarted(exc: BaseException) -> bool:
    # Ray wraps what the actor raised in a RayTaskError whose cause is the original.
    return isinstance(exc, WorkerRestarted) or \
        isinstance(getattr(exc, "cause", None), WorkerRestarted)
