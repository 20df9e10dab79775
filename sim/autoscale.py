"""The elastic pool in simulation: one workload through the scaling rule, set against a fixed
pool, in device-hours and SLO attainment (`tokenpool simulate capacity --autoscale`,
docs/elastic.md)."""

from __future__ import annotations

from collections.abc import Callable

from tokenpool.schedulers.registry import Roles, scheduler_from_config
from tokenpool.schedulers.scaling import ScalingConfig, ScalingRule, interleaved_role
from tokenpool.schedulers.types import SLO
from tokenpool.sim.run import model_load, run_one
from tokenpool.sim.simulator import Elastic, simulate
from tokenpool.sim.timelines import summarize
from tokenpool.sim.workload import WorkloadRequest

MIN_DEVICES = 2  # one per role: the default floor of a simulated elastic pool
GOLDEN = 0.6180339887498949  # i * GOLDEN mod 1 spreads evenly over [0, 1) for any run of i


def elastic_role_of(config, scheduler_name: str) -> Callable[[int], str]:
    """Worker i's role: token-level's disaggregated pool keeps the cluster's prefill share
    in every prefix of ids (worker 0 prefills, and of the first k, ceil(k * share) do), so
    a pool grown or shrunk by lowest free id keeps its shape; the baselines' workers do
    both."""
    if scheduler_name != "token-level":
        return lambda worker: "prefill+decode"
    p, d = config.cluster.prefill_per_node, config.cluster.devices_per_node
    return lambda worker: interleaved_role(worker, p, d)


def scaling_of(config, scaling: ScalingConfig | None = None) -> ScalingConfig:
    """The rule's tuning (the config's `scaling:` block, else the defaults) between
    MIN_DEVICES and the cluster's devices, unless it sets its own bounds."""
    scaling = scaling or config.scaling or ScalingConfig()
    return scaling.bounded(MIN_DEVICES, config.cluster.num_devices)


def run_elastic(config, workload: list[WorkloadRequest], scheduler_name: str, slo: SLO,
                scaling: ScalingConfig | None = None) -> dict:
    """`workload` on a pool that starts at min_workers and moves by the scaling rule."""
    scaling = scaling_of(config, scaling)
    role = elastic_role_of(config, scheduler_name)
    start = range(scaling.min_workers)
    roles = Roles(tuple(w for w in start if "prefill" in role(w)),
                  tuple(w for w in start if "decode" in role(w)))
    cost = config.cost_model({r.model for r in workload})
    scheduler = scheduler_from_config(config.scheduler, roles, cost, lambda _model: slo,
                                      name=scheduler_name, model_load=model_load(workload))
    elastic = Elastic(ScalingRule(scaling), scaling.max_workers, role, scaling.start_s)
    outcome = simulate(workload, scheduler, scaling.min_workers, cost, lambda _model: slo,
                       elastic)
    duration = max(1.0, max((r.arrival_s for r in workload), default=0.0))
    sizes = outcome.pool_sizes
    return {
        "scheduler": scheduler_name, "min_workers": scaling.min_workers,
        "max_workers": scaling.max_workers, "start_s": scaling.start_s,
        **summarize(outcome.timelines, duration, slo.ttft_s, slo.tbt_s),
        "device_hours": outcome.device_s / 3600,
        "mean_devices": outcome.device_s / outcome.end_time if outcome.end_time else 0.0,
        "peak_devices": max(n for _, n in sizes),
        "grown": sum(b > a for (_, a), (_, b) in zip(sizes, sizes[1:])),
        "simulated_s": outcome.end_time,
        "pool_sizes": [[round(t, 3), n] for t, n in sizes],
    }


def fixed_pool(config, workload: list[WorkloadRequest], scheduler_name: str, slo: SLO,
               devices: int) -> dict:
    """The same workload on `devices` devices for the whole run."""
    result = run_one(config.with_num_devices(devices), workload, scheduler_name, slo)
    return {"devices": devices, "requests": result["requests"],
            "finished": result["finished"], "slo_attainment": result["slo_attainment"],
            "device_hours": devices * result["simulated_s"] / 3600,
            "simulated_s": result["simulated_s"]}


def shaped(workload: list[WorkloadRequest], shares: list[float]) -> list[WorkloadRequest]:
    """`workload` thinned to a load that changes over time: its arrival window cut into
    len(shares) equal stretches, each keeping that share of its requests (every model
    alike). Deterministic: request i stays when i * GOLDEN mod 1 < the share."""
    if not shares or min(shares) < 0 or max(shares) > 1:
        raise ValueError(f"shares must lie in [0, 1], got {shares}")
    span = max((r.arrival_s for r in workload), default=0.0) or 1.0
    kept = []
    for i, r in enumerate(workload):
        stretch = min(int(r.arrival_s / span * len(shares)), len(shares) - 1)
        if (i * GOLDEN) % 1.0 < shares[stretch]:
            kept.append(r)
    return kept


def compare(config, workload: list[WorkloadRequest], scheduler_name: str, slo: SLO,
            fixed_devices: int | None) -> dict:
    """The elastic pool against a fixed one of `fixed_devices` (None: none was found)."""
    elastic = run_elastic(config, workload, scheduler_name, slo)
    fixed = None if fixed_devices is None else \
        fixed_pool(config, workload, scheduler_name, slo, fixed_devices)
    saving = None if fixed is None or not fixed["device_hours"] else \
        1 - elastic["device_hours"] / fixed["device_hours"]
    return {"elastic": elastic, "fixed": fixed, "device_hours_saving": saving}
