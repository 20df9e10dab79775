"""Build one worker of a fleet, in whatever process it runs (a thread's or a Ray actor's).

Every worker on a node maps the same host cache (`namespace`): the serving process packs the
fleet into it once at start-up, and a worker only copies from it into its own arena.
"""

from __future__ import annotations

from tokenpool.gpu_pool.fleet_weights import FleetModels, FleetWeights
from tokenpool.gpu_pool.worker import Worker
from tokenpool.memory.host_cache import HostModelCache


def open_host_cache(fleet, namespace: str) -> HostModelCache:
    return HostModelCache(fleet.memory.host_cache_bytes, namespace,
                          root=fleet.memory.host_cache_dir)


def build_worker(fleet, namespace: str, models: FleetModels | None = None
                 ) -> tuple[Worker, HostModelCache]:
    """A Worker with an engine per fleet model over one arena, fed from the host cache."""
    models = models or FleetModels(fleet)
    cache = open_host_cache(fleet, namespace)
    weights = FleetWeights(models, cache)
    worker = Worker(list(models.layouts.values()), weights.host_bytes, fleet.engine,
                    fleet.memory, models.tokenizers)
    return worker, cache


def make_runner(fleet, worker_id: int, namespace: str, models: FleetModels | None = None):
    """The JobRunner of worker `worker_id`; closing the runner closes the worker's cache."""
    from tokenpool.gpu_pool.job_runner import JobRunner

    worker, cache = build_worker(fleet, namespace, models)
    return JobRunner(worker, worker_id, on_close=cache.close)
