"""One Ray worker's link: its actor, its queue of jobs, and the thread that feeds them to it.

Every job ends exactly once, as a JobDone or as a failure: an actor that dies after a job's
JobDone was handed on (its task still finishing) fails the next job instead, which the
controller may have sent already. After a reported failure the worker is down: the thread
waits for Ray to restart the actor (on any node that has the resources, for as long as it
takes; a lost node's workers come back when a node joins) and then tells the listener
`on_joined`. A worker the pool grew starts the same way: down until its actor is placed.
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

    def __init__(self, info: WorkerInfo, actor, listener: PoolListener,
                 restart_timeout_s: float | None = None, kv_by_ref: bool = True):
        """`info`: the worker as described when ready, or `starting` for one still being
        placed. `restart_timeout_s`: how long a dead actor may take to come back before its
        worker stays down for good (None: as long as Ray keeps restarting it)."""
        self.id = info.id
        self.actor = actor
        self.listener = listener
        self.restart_timeout_s = restart_timeout_s
        self.kv_by_ref = kv_by_ref  # handed-off KV travels actor to actor (ray_handoff.py)
        # Replaced whole, never mutated: workers() reads it from other threads.
        self.info = info
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.stopping = threading.Event()
        self.lost: BaseException | None = None  # why the actor is not back, while it is not
        self.lost_after_end: BaseException | None = None  # a death the next job must report
        self.thread = threading.Thread(target=self._serve, daemon=True,
                                       name=f"tokenpool-ray-worker-{self.id}")

    def _serve(self) -> None:
        ray = ray_module()
        if self.info.starting:
            if not self._await_restart(ray):
                return  # stopped before it was placed, or its actor could not be built
            self.listener.on_joined(self.id)
        while (job := self.inbox.get()) is not None:
            if self.lost_after_end is not None:
                # The actor died after its last job had ended: this job's requests were held
                # there and are gone. Failing this job tells the controller once, for one job.
                error, self.lost_after_end = self.lost_after_end, None
                self.listener.on_failure(self.id, error)
                self._rejoin(ray)
                continue
            if not self.info.alive:  # the controller sends nothing to a down worker
                self.listener.on_failure(self.id, self.lost or RuntimeError("worker is down"))
                continue
            self._run(ray, job)
            # Waiting for the next job must not keep this one's handed-off KV (object store
            # references, or arrays mapped from the store) alive.
            job = None

    def _rejoin(self, ray, new_process: bool = False) -> None:
        """After a reported failure: once the actor is back, the worker takes jobs again."""
        if self.info.alive or self._await_restart(ray, new_process):
            self.listener.on_joined(self.id)

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
            self._await_restart(ray, new_process=killed)
        else:
            self.listener.on_failure(self.id, error)
            self._rejoin(ray, new_process=killed)

    def _stream(self, ray, job: JobInput, ended: _Ended) -> None:
        for ref in self.actor.run.options(num_returns="streaming").remote(
                job, self.info.pid, self.kv_by_ref):
            item = ray.get(ref)
            if isinstance(item, StepOutputs):
                self.listener.on_step(item)
            else:
                ended.done = True
                self.listener.on_done(item)
        if not ended.done:
            raise RuntimeError(f"worker {self.id}: job ended without a JobDone")

    def _await_restart(self, ray, new_process: bool = False) -> bool:
        """Wait for Ray to bring the actor back (or place a new one); True once it answers.

        With `new_process`, only an answer from a new process counts: ray.kill returns
        before the old one is gone, and the old one may still answer. A loss not reported
        yet stops the wait as soon as a job comes to report it on.
        """
        timeout = self.restart_timeout_s
        deadline = None if timeout is None else time.monotonic() + timeout
        pending = None  # one question at a time, so a slow restart does not pile them up
        while not self.stopping.is_set() and (deadline is None or time.monotonic() < deadline):
            if self.lost_after_end is not None and not self.inbox.empty():
                return False
            pending = pending or self.actor.describe.remote()
            # Short waits, so close() is never held up for long by a restart.
            if not ray.wait([pending], timeout=RESTART_POLL_S)[0]:
                continue
            answered, pending = pending, None
            try:
                pid, device, node = ray.get(answered)
            except ray.exceptions.ActorUnavailableError:  # restarting: calls are refused
                self.stopping.wait(RESTART_POLL_S)
                continue
            except Exception as exc:
                # A call in flight when the actor died fails even though Ray restarts it
                # (placed anew once a node has room): only a dead actor is gone for good.
                self.lost = exc
                if _gone_for_good(ray, self.actor, exc):
                    return False
                self.stopping.wait(RESTART_POLL_S)
                continue
            if new_process and pid == self.info.pid:
                self.stopping.wait(RESTART_POLL_S)
                continue
            self._came_back(pid, device, node)
            return True
        if not self.stopping.is_set() and deadline is not None:
            self.lost = TimeoutError(f"worker {self.id}'s actor did not come back within "
                                     f"{timeout:g} s")
        return False

    def _came_back(self, pid: int, device: str, node: str) -> None:
        # Unavailable is also raised for a network blip: only a new process is a restart,
        # and a worker's first start is none.
        restarts = self.info.restarts + (pid != self.info.pid and not self.info.starting)
        self.info = dataclasses.replace(self.info, device=device, pid=pid, alive=True,
                                        restarts=restarts, node=node, starting=False)
        self.lost = None


class _Ended:
    """Whether a job's JobDone has been handed on: a death after it is not the job's."""

    done = False


def _gone_for_good(ray, actor, error: BaseException) -> bool:
    """Whether the actor will never answer again: its constructor raised, or Ray's record
    says DEAD (out of restarts, or killed for good)."""
    if getattr(error, "actor_init_failed", False):
        return True
    try:
        from ray._private.state import actors  # the GCS's record; no dashboard needed

        return actors(actor._actor_id.hex()).get("State") == "DEAD"
    except Exception:  # the record could not be read: assume it may come back
        return False


def _refused_as_restarted(exc: BaseException) -> bool:
    # Ray wraps what the actor raised in a RayTaskError whose cause is the original.
    return isinstance(exc, WorkerRestarted) or \
        isinstance(getattr(exc, "cause", None), WorkerRestarted)
