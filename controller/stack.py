"""Everything behind the proxy, built from one fleet file: host cache, pool, policy, controller.

Start-up order: read every model's header (the fleet check), pack the fleet into the node's
host cache (once per node; later starts of the same fleet find it there), start the workers,
profile one engine per model shape for the cost model, then start the controller's loop over
a core whose policy runs on that cost model.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tokenpool.controller.catalog import ModelCard, build_catalog
from tokenpool.controller.cost_fit import cost_model_of
from tokenpool.controller.profile_cache import (cache_path, load_profile, profile_key,
                                                save_profile)
from tokenpool.controller.core import ControllerCore, CoreConfig
from tokenpool.controller.page_names import PageNamer
from tokenpool.controller.pool_stats import PoolStats
from tokenpool.controller.service import ServingController
from tokenpool.gpu_pool.fleet_weights import FleetModels, FleetWeights
from tokenpool.gpu_pool.profiling import EngineProfilePlan
from tokenpool.gpu_pool.worker_factory import make_runner, open_host_cache
from tokenpool.schedulers.admission import SLOAdmission
from tokenpool.schedulers.registry import Roles, scheduler_from_config
from tokenpool.schedulers.partitioned import PartitionedScheduler
from tokenpool.schedulers.scaling import ScalingRule

# Short enough for start-up, long enough for a fit within ~10% on a small CPU model.
SERVE_PROFILE = EngineProfilePlan(prompt_lens=(16, 128), prefill_batches=(1, 4),
                                  decode_batches=(1, 8), decode_prompt_lens=(16, 128),
                                  decode_steps=3, repeats=2)


@dataclass(slots=True)
class ServingStack:
    fleet: object
    controller: ServingController
    catalog: dict[str, ModelCard]
    cost: object  # the CostModel the policy runs on

    def close(self) -> None:
        self.controller.close()


def cache_namespace(fleet, models: FleetModels) -> str:
    """The same fleet on the same node maps the same cache files: a restart finds them. The
    packed layout is part of the name, so a model served in another dtype or quantization
    never maps bytes packed for the old one."""
    digest = hashlib.sha1()
    for spec in fleet.models:
        path = Path(models.sources[spec.id])
        stat = path.stat()
        layout = models.layouts[spec.id]
        digest.update(f"{spec.id}|{path}|{stat.st_size}|{stat.st_mtime_ns}|{layout.dtype}|"
                      f"{json.dumps(layout.index.to_dict())}\n".encode())
    return f"serve_{digest.hexdigest()[:12]}"  # host cache namespaces are [A-Za-z0-9_]+


def make_pool(fleet, namespace: str, models: FleetModels):
    if fleet.pool.backend == "ray":
        from tokenpool.gpu_pool.ray_pool import RayPool

        return RayPool(fleet.pool, fleet, namespace)
    from tokenpool.gpu_pool.pool import LocalPool

    return LocalPool(fleet.pool, lambda i: make_runner(fleet, i, namespace, models))


def build_stack(fleet, *, progress: bool = True, log=None) -> ServingStack:
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    models = FleetModels(fleet)
    models.check_fits()
    namespace = cache_namespace(fleet, models)
    cache = open_host_cache(fleet, namespace)
    packed = FleetWeights(models, cache).populate(progress=progress)
    log(f"host cache {namespace}: {len(models.layouts)} models ({len(packed)} packed now)")
    pool = make_pool(fleet, namespace, models)
    controller = ServingController(pool, PageNamer.of_fleet(fleet))
    started = time.monotonic()
    pool.start(controller)
    cost = _profile(fleet, models, pool)
    log(f"{fleet.pool.num_workers} {fleet.pool.backend} workers up and profiled in "
        f"{time.monotonic() - started:.1f} s")
    controller.start(make_core(fleet, cost))
    cache.close()
    return ServingStack(fleet, controller, build_catalog(fleet, models, int(time.time())), cost)


def make_core(fleet, cost) -> ControllerCore:
    """The controller core that serves `fleet` with the policy run on `cost`; an elastic
    pool (pool.min_workers / max_workers) with the fleet's scaling rule."""
    s, pool = fleet.scheduler, fleet.pool
    roles = pool_roles(fleet)
    low, high = pool.workers_range
    rule = ScalingRule(fleet.scaling.bounded(low, high)) if pool.elastic else None
    scheduler = scheduler_for(fleet, cost)
    pinned = scheduler.pinned if isinstance(scheduler, PartitionedScheduler) else {}
    config = CoreConfig(pool.num_workers, frozenset(roles.prefill) - set(roles.decode),
                        SLOAdmission(s.shed_ttft_factor, s.max_alpha, s.max_waiting),
                        PageNamer.of_fleet(fleet), max_workers=high, scaling=rule,
                        role_of=pool.role, unscaled=frozenset(pinned))
    stats = PoolStats(fleet.pool.num_workers, {m.id: fleet.slo_of(m.id) for m in fleet.models})
    return ControllerCore(scheduler, config, stats, cost)


def _profile(fleet, models: FleetModels, pool):
    """The policy's cost model: from an earlier start on this machine, else profiled now."""
    path = cache_path(fleet, profile_key(fleet, models, SERVE_PROFILE))
    cost = load_profile(path)
    if cost is None:
        cost = cost_model_of(pool.profile(SERVE_PROFILE))
        save_profile(path, cost)
    return cost


def pool_roles(fleet) -> Roles:
    return Roles(fleet.pool.prefill_ids, fleet.pool.decode_ids)


def scheduler_for(fleet, cost):
    """The fleet's policy over its pool; the simulator's predictions build the same one.
    Pinned models (`pin: N`) get the first workers, in fleet order."""
    return scheduler_from_config(fleet.scheduler, pool_roles(fleet), cost, fleet.slo_of,
                                 model_load={m.id: 1.0 for m in fleet.models},
                                 pins={m.id: m.pin for m in fleet.models if m.pin})
