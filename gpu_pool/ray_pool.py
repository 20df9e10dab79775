"""Workers as Ray actors: one actor per device, every one the same class from the same image.

`RayPool` speaks pool.py's `WorkerPool` protocol. Each worker has a thread in the serving
process that sends the worker's jobs to its actor one at a time, in order, as Ray streaming
generators: the actor yields each engine step's `StepOutputs` as the step ends and the
`JobDone` last, and the thread hands each to the listener as it arrives, so tokens stream
while the job runs rather than when it ends.

Placement. A worker asks Ray for a GPU, or on CPU nodes for `cpus_per_worker` CPUs plus one
unit of `pool.worker_resource`, so Ray spreads workers over the nodes that declare it. An
actor fills its own node's host cache if the serving process has not (another node), and
says which node it is on (`/pool`'s `node`). Handed-off KV moves actor to actor through the
object store (ray_handoff.py). `add_workers` asks for workers that start when Ray places
them: pending actors are the resource demand Ray's autoscaler acts on.

Faults. When an actor dies, the job in flight is reported with `on_failure`, the worker is
down, and its thread waits for Ray to restart the actor (`max_restarts`), on any node with the
resources: a lost node's workers come back when a node joins. It then reports `on_joined`.
The constructor rebuilds the worker from the node's host cache, whose files outlive the
process, so a restart on the same node reads no checkpoint. Tasks are never retried
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
import threading
import time

from tokenpool.gpu_pool.pool import PoolListener, WorkerInfo
from tokenpool.gpu_pool.protocol import JobInput
from tokenpool.gpu_pool.ray_actor import WorkerActor
from tokenpool.gpu_pool.ray_link import WorkerLink, ray_module
from tokenpool.gpu_pool.pool_config import PoolConfig

log = logging.getLogger(__name__)

CLOSE_GRACE_S = 30.0  # how long close() lets queued jobs finish before killing actors
LOCAL_START_ATTEMPTS = 3  # tries at starting the pool's own Ray node


class RayPool:
    def __init__(self, config: PoolConfig, fleet, namespace: str, *,
                 restart_timeout_s: float | None = None, start_timeout_s: float = 600.0,
                 kv_by_ref: bool = True):
        """`restart_timeout_s`: how long a dead worker's actor may take to come back before
        the worker stays down (None: as long as Ray restarts it, e.g. until a lost node's
        replacement joins). `start_timeout_s` bounds start(), not a grown worker's start.
        `kv_by_ref=False` sends handed-off KV through this process, as before ray_handoff.py
        (kept to measure the two side by side)."""
        self.config = config
        self.fleet = fleet
        self.namespace = namespace
        self.restart_timeout_s = restart_timeout_s
        self.start_timeout_s = start_timeout_s
        self.kv_by_ref = kv_by_ref
        self._links: dict[int, WorkerLink] = {}
        self._listener: PoolListener | None = None
        self._owns_connection = False  # connected by start(), so close() disconnects

    @property
    def on_gpu(self) -> bool:
        return self.fleet.engine.device.startswith("cuda")

    def start(self, listener: PoolListener) -> None:
        ray = ray_module()
        self._listener = listener
        self._owns_connection = _connect(ray, self.config, self._cpus_needed())
        ids = range(self.config.num_workers)
        actors = []
        try:
            actors = [self._create_actor(ray, i) for i in ids]
            described = self._await_ready(ray, actors)
        except BaseException:
            for actor in actors:
                ray.kill(actor, no_restart=True)
            self._disconnect(ray)
            raise
        for i, actor, (pid, device, node) in zip(ids, actors, described):
            info = WorkerInfo(i, self.config.role(i), device, pid, node=node)
            self._start_link(self._link(info, actor))

    def add_workers(self, ids) -> None:
        """Ask Ray for more workers; returns at once. Each reports `on_joined` once Ray has
        placed and built it. Until then its actor is a pending resource request, which is
        what Ray's autoscaler (or KubeRay's) acts on by adding a node."""
        ray = ray_module()
        for i in ids:
            if i in self._links:
                raise ValueError(f"worker {i} is in the pool already")
            info = WorkerInfo(i, self.config.role(i), "", 0, alive=False, starting=True)
            self._start_link(self._link(info, self._create_actor(ray, i)))

    def retire(self, worker: int) -> None:
        """Stop a worker the controller has drained (or one still starting): its actor is
        closed and killed, and its resources go back to the cluster."""
        link = self._links.pop(worker)
        link.inbox.put(None)
        link.stopping.set()
        threading.Thread(target=_close_actor, args=(ray_module(), link.actor, True),
                         daemon=True, name=f"tokenpool-retire-{worker}").start()

    def _link(self, info: WorkerInfo, actor) -> WorkerLink:
        return WorkerLink(info, actor, self._listener, self.restart_timeout_s, self.kv_by_ref)

    def _start_link(self, link: WorkerLink) -> None:
        self._links[link.id] = link
        link.thread.start()

    def profile(self, plan):
        """A short profile of worker 0 (all workers are alike).

        Called before any job, so worker 0's actor is idle.
        """
        return ray_module().get(self._links[0].actor.profile.remote(plan))

    def run(self, worker: int, job: JobInput) -> None:
        self._links[worker].inbox.put(job)

    def workers(self) -> list[WorkerInfo]:
        return [link.info for link in list(self._links.values())]

    def kill(self, worker: int) -> None:
        """Test hook: kill the worker's actor process as a crash would; Ray restarts it."""
        ray_module().kill(self._links[worker].actor, no_restart=False)

    def close(self) -> None:
        """Let queued jobs finish (bounded), then kill the actors and leave Ray."""
        ray = ray_module()
        links, self._links = list(self._links.values()), {}
        for link in links:
            link.inbox.put(None)
        deadline = time.monotonic() + CLOSE_GRACE_S
        for link in links:
            if not link.info.alive:
                link.stopping.set()  # a thread waiting on a (re)start gives up
            link.thread.join(timeout=max(0.0, deadline - time.monotonic()))
        for link in links:
            link.stopping.set()
            _close_actor(ray, link.actor, idle=not link.thread.is_alive())
        for link in links:
            link.thread.join(timeout=CLOSE_GRACE_S)
        self._disconnect(ray)

    def _disconnect(self, ray) -> None:
        if self._owns_connection and ray.is_initialized():
            ray.shutdown()  # stops the local cluster too, if start() started one
        self._owns_connection = False

    def _cpus_needed(self) -> int:
        """CPUs of the pool's own local cluster: room for the most workers it may grow to."""
        per_worker = 0 if self.on_gpu else self.config.cpus_per_worker
        return max(1, math.ceil(per_worker * self.config.workers_range[1]))

    def _create_actor(self, ray, worker: int):
        options = self._resources()
        actor_class = ray.remote(WorkerActor).options(
            max_restarts=self.config.max_restarts, max_task_retries=0, **options)
        return actor_class.remote(self._fleet_for_actors(), worker, self.namespace,
                                  self.config.torch_threads)

    def _resources(self) -> dict:
        """What one worker asks Ray for: a GPU, or CPU slots plus one unit of the pool's
        custom resource, so workers land only on nodes that declare it."""
        if self.on_gpu:
            return {"num_gpus": 1, "num_cpus": 0}
        options: dict = {"num_cpus": self.config.cpus_per_worker}
        if self.config.worker_resource:
            options["resources"] = {self.config.worker_resource: 1}
        return options

    def _fleet_for_actors(self):
        """Ray shows a GPU actor only its own GPU, as cuda:0, whatever index the file names."""
        if not self.on_gpu:
            return self.fleet
        engine = dataclasses.replace(self.fleet.engine, device="cuda")
        return dataclasses.replace(self.fleet, engine=engine)

    def _await_ready(self, ray, actors) -> list[tuple[int, str, str]]:
        refs = [actor.describe.remote() for actor in actors]
        try:
            return ray.get(refs, timeout=self.start_timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise TimeoutError(
                f"{self.config.num_workers} worker actors not ready within "
                f"{self.start_timeout_s:g} s; each needs "
                f"{self._resources()}, the cluster has {ray.cluster_resources()}") from None


def _connect(ray, config: PoolConfig, cpus_needed: int) -> bool:
    """Join or start Ray; True when this call connected (so the pool disconnects later)."""
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no prompt, nothing sent home
    quiet = dict(logging_level=logging.WARNING, log_to_driver=True)
    if config.ray_address is not None:
        _join(ray, config.ray_address, quiet)
        return True
    # "local", not None: None would join a cluster found through RAY_ADDRESS or /tmp/ray,
    # and this pool is meant to own its cluster. The pool's own node declares its worker resource, so a fleet file written for a
    # cluster also runs on one machine.
    resources = {config.worker_resource: config.workers_range[1]} \
        if config.worker_resource else None
    local = dict(address="local", num_cpus=config.num_cpus or cpus_needed, resources=resources,
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


def _join(ray, address: str, options: dict) -> None:
    try:
        ray.init(address=address, **options)
    except Exception as exc:
        if not any("auth" in str(e).lower() for e in _chain(exc)):
            raise
        # Ray 2.60 clusters run token authentication: a driver needs it turned on too.
        raise RuntimeError(
            f"joining the Ray cluster at {address!r} failed authentication ({exc}); set "
            "RAY_AUTH_MODE=token and give this process the cluster's token "
            "(RAY_AUTH_TOKEN, or the head's ~/.ray/auth_token)") from exc


def _chain(exc: BaseException) -> list[BaseException]:
    """`exc` and what caused it: Ray wraps an authentication failure in a ConnectionError."""
    chain = [exc]
    while (cause := chain[-1].__cause__ or chain[-1].__context__) is not None \
            and cause not in chain:
        chain.append(cause)
    return chain


def _close_actor(ray, actor, idle: bool) -> None:
    """Close an idle actor's runner (it unmaps the host cache), then kill the actor."""
    try:
        if idle:  # a busy one would answer only after its job
            ray.get(actor.close.remote(), timeout=10)
    except Exception:  # dead or restarting: killing it is all that is left
        pass
    ray.kill(actor, no_restart=True)
