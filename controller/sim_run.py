"""`tokenpool simulate`: one workload through one scheduler, or a sweep, as JSON and a plot."""

from __future__ import annotations

import re
from pathlib import Path

from tokenpool.controller.metrics import max_at_90, summarize
from tokenpool.controller.simulator import simulate
from tokenpool.controller.workload import WorkloadRequest
from tokenpool.schedulers.registry import Roles, make_scheduler
from tokenpool.schedulers.types import SLO

_SYNTH_NAME = re.compile(r"synth-(\d+)-([\d.]+)-")


def roles_of(config) -> Roles:
    """Disaggregated roles from the cluster shape: per node, prefill workers first."""
    c = config.cluster
    prefill, decode = [], []
    for node in range(c.nodes):
        base = node * (c.prefill_per_node + c.decode_per_node)
        prefill += range(base, base + c.prefill_per_node)
        decode += range(base + c.prefill_per_node, base + c.prefill_per_node + c.decode_per_node)
    return Roles(tuple(prefill), tuple(decode))


def model_load(workload: list[WorkloadRequest]) -> dict[str, float]:
    load: dict[str, float] = {}
    for r in workload:
        load[r.model] = load.get(r.model, 0.0) + 1.0
    return load


def run_one(config, workload: list[WorkloadRequest], scheduler_name: str, slo: SLO) -> dict:
    cost = config.cost_model({r.model for r in workload})
    roles = roles_of(config)
    scheduler = make_scheduler(scheduler_name, roles, cost, lambda _model: slo,
                               model_load=model_load(workload),
                               max_group_size=config.scheduler.max_group_size,
                               q_max_s=config.scheduler.q_max_s)
    outcome = simulate(workload, scheduler, len(roles.all), cost, lambda _model: slo)
    # Goodput per second of the workload's arrival window (at least a second).
    duration = max(1.0, max((r.arrival_s for r in workload), default=0.0))
    summary = summarize(outcome.timelines, duration, slo.ttft_s, slo.tbt_s)
    return {
        "scheduler": scheduler_name,
        "num_models": len({r.model for r in workload}),
        "num_devices": len(roles.all),
        **summary,
        "switches": sum(w.switches for w in outcome.workers),
        "busy_s": [round(w.busy_s, 6) for w in outcome.workers],
        "switches_per_device": [w.switches for w in outcome.workers],
        "simulated_s": outcome.end_time,
    }


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
