"""Build one worker of a fleet, in whatever process it runs (a thread's or a Ray actor's).

Every worker on a node maps the same host cache (`namespace`): whoever comes first packs the
fleet into it (the serving process on its own node; on another node, that node's first
worker, under the cache's file locks), and a worker only copies from it into its own arena.
"""

from __future__ import annotations

from tokenpool.gpu_pool.fleet_weights import FleetModels, FleetWeights
from tokenpool.gpu_pool.worker import Worker
from tokenpool.memory.host_cache import HostModelCache


def open_host_cache(fleet, namespace: str) -> HostModelCache:
    return HostModelCache(fleet.memory.host_cache_bytes, namespace,
                          root=fleet.memory.host_cache_dir)


def build_worker(fleet, namespace: str, models: FleetModels | None = None,
                 fill_cache: bool = False) -> tuple[Worker, HostModelCache]:
    """A Worker with an engine per fleet model over one arena, fed from the host cache.

    `fill_cache`: pack what the node's cache lacks first (a worker on a node the serving
    process is not on), so its first switches do not read checkpoints."""
    models = models or FleetModels(fleet)
    cache = open_host_cache(fleet, namespace)
    weights = FleetWeights(models, cache)
    if fill_cache:
        weights.populate(progress=False)
    worker = Worker(list(models.layouts.values()), weights.host_bytes, fleet.engine,
                    fleet.memory, models.tokenizers)
    return worker, cache


def make_runner(fleet, worker_id: int, namespace: str, models: FleetModels | None = None,
                fill_cache: bool = False):
    """The JobRunner of worker `worker_id`; closing the runner closes the worker's cache."""
    from tokenpool.gpu_pool.job_runner import JobRunner

    worker, cache = build_worker(fleet, namespace, models, fill_cache)
    return JobRunner(worker, worker_id, on_close=cache.close)
