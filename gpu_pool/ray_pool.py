"""Workers as Ray actors: one actor per device, every one the same class from the same image.

`RayPool` speaks pool.py's `WorkerPool` protocol. Each worker has a thread in the serving
process that sends the worker's jobs to its actor one at a time, in order, as Ray streaming
generators: the actor yields each engine step's `StepOutputs` as the step ends and the
`JobDone` last, and the thread hands each to the listener as it arrives, so tokens stream
while the job runs rather than when it ends.

Faults. When an actor dies, the job in flight is reported with `on_failure` and the thread
waits (bounded) for Ray to restart the actor (`max_restarts`); the constructor rebuilds the
worker from the node's host cache, whose files outlive the process, so a restart reads no
checkpoint. Jobs queued meanwhile run once it is back. Tasks are never retried
(`max_task_retries=0`): a job that may have half run on a dead worker is the controller's to
replan, not ours to replay on a fresh worker that holds none of its requests' KV. An actor
that died between jobs may be back before the next one, with nothing it held: each job names
the process it expects, and a new one refuses it, so that death is reported like any other.
Every job ends exactly once: an actor that dies after a job's JobDone was handed on (its task
still finishing) fails the next job, which the controller may have sent already.

Ray is imported only when a pool starts, so installs that never use it import this fast.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time

from tokenpool.gpu_pool.pool import PoolListener, WorkerInfo
from tokenpool.gpu_pool.protocol import JobInput
from tokenpool.gpu_pool.ray_link import WorkerLink, WorkerRestarted, ray_module
from tokenpool.gpu_pool.pool_config import PoolConfig

log = logging.getLogger(__name__)

CLOSE_GRACE_S = 30.0  # how long close() lets queued jobs finish before killing actors
LOCAL_START_ATTEMPTS = 3  # tries at starting the pool's own Ray node


class WorkerActor:
    """The body of every worker actor. Building the worker in the constructor means a
    restart by Ray rebuilds it too."""

    def __init__(self, fleet, worker_id: int, namespace: str, torch_threads: int):
        import torch

        from tokenpool.gpu_pool.worker_factory import make_runner

        torch.set_num_threads(torch_threads)
        self.runner = make_runner(fleet, worker_id, namespace)

    def describe(self) -> tuple[int, str]:
        """(pid, device); a GPU is named by its index on the node, not the actor's cuda:0."""
        device = self.runner.worker.device
        if device.type == "cuda":
            return os.getpid(), f"cuda:{ray_module().get_gpu_ids()[0]}"
        return os.getpid(), str(device)

    def profile(self, plan):
        from tokenpool.gpu_pool.profiling import profile_worker

        return profile_worker(self.runner.worker, plan)

    def run(self, job_input: JobInput, expected_pid: int):
        if os.getpid() != expected_pid:
            raise WorkerRestarted(f"worker actor restarted (pid {expected_pid} -> "
                                  f"{os.getpid()}): everything it held is gone")
        yield from self.runner.run(job_input)

    def close(self) -> None:
        self.runner.close()


class RayPool:
    def __init__(self, config: PoolConfig, fleet, namespace: str, *,
                 restart_timeout_s: float = 300.0, start_timeout_s: float = 600.0):
        self.config = config
        self.fleet = fleet
        self.namespace = namespace
        self.restart_timeout_s = restart_timeout_s
        self.start_timeout_s = start_timeout_s
        self._links: list[WorkerLink] = []
        self._owns_connection = False  # connected by start(), so close() disconnects

    @property
    def on_gpu(self) -> bool:
        return self.fleet.engine.device.startswith("cuda")

    def start(self, listener: PoolListener) -> None:
        ray = ray_module()
        self._owns_connection = _connect(ray, self.config, self._cpus_needed())
        actors = []
        try:
            actors = self._create_actors(ray)
            described = self._await_ready(ray, actors)
        except BaseException:
            for actor in actors:
                ray.kill(actor, no_restart=True)
            self._disconnect(ray)
            raise
        self._links = [WorkerLink(i, self.config.role(i), actor, *described[i], listener,
                                   self.restart_timeout_s)
                       for i, actor in enumerate(actors)]
        for link in self._links:
            link.thread.start()

    def profile(self, plan):
        """A short profile of worker 0 (all workers are alike).

        Called before any job, so worker 0's actor is idle.
        """
        return ray_module().get(self._links[0].actor.profile.remote(plan))

    def run(self, worker: int, job: JobInput) -> None:
        self._links[worker].inbox.put(job)

    def workers(self) -> list[WorkerInfo]:
        return [link.info for link in self._links]

    def kill(self, worker: int) -> None:
        """Test hook: kill the worker's actor process as a crash would; Ray restarts it."""
        ray_module().kill(self._links[worker].actor, no_restart=False)

    def close(self) -> None:
        """Let queued jobs finish (bounded), then kill the actors and leave Ray."""
        ray = ray_module()
        for link in self._links:
            link.inbox.put(None)
        deadline = time.monotonic() + CLOSE_GRACE_S
        for link in self._links:
            link.thread.join(timeout=max(0.0, deadline - time.monotonic()))
        for link in self._links:
            link.stopping.set()  # a thread still waiting on a restart gives up
            _close_actor(ray, link.actor, idle=not link.thread.is_alive())
        for link in self._links:
            link.thread.join(timeout=CLOSE_GRACE_S)
        self._links = []
        self._disconnect(ray)

    def _disconnect(self, ray) -> None:
        if self._owns_connection and ray.is_initialized():
            ray.shutdown()  # stops the local cluster too, if start() started one
        self._owns_connection = False

    def _cpus_needed(self) -> int:
        per_worker = 0 if self.on_gpu else self.config.cpus_per_worker
        return max(1, math.ceil(per_worker * self.config.num_workers))

    def _create_actors(self, ray) -> list:
        resources = {"num_gpus": 1, "num_cpus": 0} if self.on_gpu else \
            {"num_cpus": self.config.cpus_per_worker}
        actor_class = ray.remote(WorkerActor).options(
            max_restarts=self.config.max_restarts, max_task_retries=0, **resources)
        fleet = self._fleet_for_actors()
        return [actor_class.remote(fleet, i, self.namespace, self.config.torch_threads)
                for i in range(self.config.num_workers)]

    def _fleet_for_actors(self):
        """Ray shows a GPU actor only its own GPU, as cuda:0, whatever index the file names."""
        if not self.on_gpu:
            return self.fleet
        engine = dataclasses.replace(self.fleet.engine, device="cuda")
        return dataclasses.replace(self.fleet, engine=engine)

    def _await_ready(self, ray, actors) -> list[tuple[int, str]]:
        refs = [actor.describe.remote() for actor in actors]
        try:
            return ray.get(refs, timeout=self.start_timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise TimeoutError(
                f"{self.config.num_workers} worker actors not ready within "
                f"{self.start_timeout_s:g} s; each needs "
                f"{'1 GPU' if self.on_gpu else f'{self.config.cpus_per_worker:g} CPU'}, the "
                f"cluster has {ray.cluster_resources()}") from None


def _connect(ray, config: PoolConfig, cpus_needed: int) -> bool:
    """Join or start Ray; True when this call connected (so the pool disconnects later)."""
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no prompt, nothing sent home
    quiet = dict(logging_level=logging.WARNING, log_to_driver=True)
    if config.ray_address is not None:
        ray.init(address=config.ray_address, **quiet)
        return True
    # "local", not None: None would join a cluster found through RAY_ADDRESS or /tmp/ray,
    # and this pool is meant to own its cluster.
    local = dict(address="local", num_cpus=config.num_cpus or cpus_needed,
                 include_dashboard=False, object_store_memory=config.object_store_bytes,
                 _system_config={"task_events_max_num_task_in_gcs": config.ray_task_events},
                 **quiet)
    for _ in range(LOCAL_START_ATTEMPTS - 1):
        try:
            ray.init(**local)
            return True
        except Exception as exc:
            # Ray gives a new raylet a fixed 30 s to register; on a loaded host it can miss
            # that once and start fine the next time.
            if "timed out during startup" not in str(exc):
                raise
            log.warning("the pool's Ray node timed out starting (%s); starting it again", exc)
            ray.shutdown()
    ray.init(**local)
    return True


def _close_actor(ray, actor, idle: bool) -> None:
    """Close an idle actor's runner (it unmaps the host cache), then kill the actor."""
    try:
        if idle:  # a busy one would answer only after its job
            ray.get(actor.close.remote(), timeout=10)
    except Exception:  # dead or restarting: killing it is all that is left
        pass
    ray.kill(actor, no_restart=True)
