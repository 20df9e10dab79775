"""`tokenpool simulate`: one workload through one scheduler, or a sweep, as JSON and a plot."""

from __future__ import annotations

import re
from pathlib import Path

from tokenpool.sim.timelines import max_at_90, summarize
from tokenpool.sim.simulator import simulate
from tokenpool.sim.workload import WorkloadRequest
from tokenpool.schedulers.registry import Roles, scheduler_from_config
from tokenpool.schedulers.types import SLO

_SYNTH_NAME = re.compile(r"synth-(\d+)-([\d.]+)-")


def roles_of(config) -> Roles:
    """Disaggregated roles from the cluster shape: per node, prefill workers first. Pinned
    devices (`pins:`) come before the cluster's, each in both roles (sim/pinning.py)."""
    c = config.cluster
    pinned = list(range(sum(config.pins.values())))
    prefill, decode = list(pinned), list(pinned)
    for node in range(c.nodes):
        base = len(pinned) + node * (c.prefill_per_node + c.decode_per_node)
        prefill += range(base, base + c.prefill_per_node)
        decode += range(base + c.prefill_per_node, base + c.prefill_per_node + c.decode_per_node)
    return Roles(tuple(prefill), tuple(decode))


def model_load(workload: list[WorkloadRequest]) -> dict[str, float]:
    load: dict[str, float] = {}
    for r in workload:
        load[r.model] = load.get(r.model, 0.0) + 1.0
    return load


def simulated(config, workload: list[WorkloadRequest], scheduler_name: str, slo: SLO):
    """(outcome, duration): the workload served by `scheduler_name` on the config's fixed
    pool, and its arrival window (at least a second), what goodput is per second of."""
    cost = config.cost_model({r.model for r in workload})
    roles = roles_of(config)
    scheduler = scheduler_from_config(config.scheduler, roles, cost, lambda _model: slo,
                                      name=scheduler_name, model_load=model_load(workload),
                                      pins=config.pins)
    outcome = simulate(workload, scheduler, len(roles.all), cost, lambda _model: slo)
    return outcome, max(1.0, max((r.arrival_s for r in workload), default=0.0))


def run_one(config, workload: list[WorkloadRequest], scheduler_name: str, slo: SLO) -> dict:
    outcome, duration = simulated(config, workload, scheduler_name, slo)
    summary = summarize(outcome.timelines, duration, slo.ttft_s, slo.tbt_s)
    return {
        "scheduler": scheduler_name,
        "num_models": len({r.model for r in workload}),
        "num_devices": len(outcome.workers),
        **summary,
        "switches": sum(w.switches for w in outcome.workers),
        "busy_s": [round(w.busy_s, 6) for w in outcome.workers],
        "switches_per_device": [w.switches for w in outcome.workers],
        "simulated_s": outcome.end_time,
        **prefix_cache_stats(workload, outcome.workers),
    }


def prefix_cache_stats(workload: list[WorkloadRequest], workers) -> dict:
    """Prompt tokens the simulated prefix caches were asked for and served, when the
    workload names its pages (nothing otherwise: the keys would only say "off")."""
    if not any(r.page_hashes for r in workload):
        return {}
    queried = sum(w.prefix_queried_tokens for w in workers)
    hit = sum(w.prefix_hit_tokens for w in workers)
    return {"prefix_cache_queried_tokens": queried, "prefix_cache_hit_tokens": hit,
            "prefix_cache_hit_rate": hit / queried if queried else 0.0}


def workload_point(path: Path, workload: list[WorkloadRequest], result: dict) -> dict:
    match = _SYNTH_NAME.match(path.name)
    num_models = result["num_models"]
    if match:
        rate = float(match.group(2))
    else:
        duration = max((r.arrival_s for r in workload), default=0.0) or 1.0
        rate = len(workload) / duration / max(1, num_models)
    return {"workload": path.name, "num_models": int(match.group(1)) if match else num_models,
            "rate": rate, "slo_attainment": result["slo_attainment"],
            "goodput_rps": result["goodput_rps"], "slo_met_fraction": result["slo_met_fraction"]}


def sweep_summary(points: list[dict]) -> dict:
    rates = {p["rate"] for p in points}
    return {
        "max_models_at_90": max_at_90(points, "num_models"),
        "max_rate_at_90": max_at_90(points, "rate") if len(rates) > 1 else None,
        "points": points,
    }


def devices_needed(config, workload: list[WorkloadRequest], scheduler_name: str, slo: SLO,
                   fleet_models: int | None = None, target: float = 0.9,
                   limit: int = 4096) -> dict:
    """The fewest devices at which `scheduler_name` reaches `target` attainment.

    Attainment is taken as non-decreasing in the device count, so this doubles and then
    bisects. `static` starts at one device per model of the fleet (`fleet_models`, else the
    workload's): dedicating devices means every model gets one, however rarely it is used.
    """
    num_models = fleet_models or len({r.model for r in workload})
    low = max(2, num_models) if scheduler_name == "static" else 2
    tried: dict[int, float] = {}

    def passes(n: int) -> bool:
        if n not in tried:
            result = run_one(config.with_num_devices(n), workload, scheduler_name, slo)
            tried[n] = result["slo_attainment"]
        return tried[n] >= target

    high = low
    while not passes(high):
        if high >= limit:
            return {"devices": None, "tried": _tried(tried)}
        low, high = high + 1, min(limit, high * 2)
    while low < high:
        mid = (low + high) // 2
        if passes(mid):
            high = mid
        else:
            low = mid + 1
    return {"devices": high, "tried": _tried(tried)}


def _tried(tried: dict[int, float]) -> list[dict]:
    return [{"num_devices": n, "slo_attainment": a} for n, a in sorted(tried.items())]
