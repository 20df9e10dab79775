"""The simulator's prediction of a real sweep: the same requests, the same policy objects, the
cost model the server fitted at start-up (its cached profile), on simulated workers.

This is the fidelity check of issue 6: if the simulator, fed the real engine's fitted costs,
predicts the real sustainable rate, its GPU-scale results (docs/sim.md) rest on a model that
has been held against a real system.
"""

from __future__ import annotations

from tokenpool.sim.timelines import max_at_90, summarize
from tokenpool.sim.simulator import simulate
from tokenpool.controller.stack import pool_roles, scheduler_for


def fleet_cost(fleet):
    """The cost model the server uses: the profile cached by its last start on this machine.

    Raises LookupError when no server of this fleet has started here yet.
    """
    from tokenpool.controller.profile_cache import cache_path, load_profile, profile_key
    from tokenpool.controller.stack import SERVE_PROFILE
    from tokenpool.gpu_pool.fleet_weights import FleetModels

    path = cache_path(fleet, profile_key(fleet, FleetModels(fleet), SERVE_PROFILE))
    cost = load_profile(path)
    if cost is None:
        raise LookupError(f"no cost profile at {path}: start `tokenpool serve` on this fleet "
                          "once (the sweep does) so it profiles the engine")
    return cost


def simulate_point(fleet, cost, requests, duration_s: float,
                   step_ratio: float | None = None) -> dict:
    """One sweep point in simulation: attainment, goodput and switches. `step_ratio`: run the
    workers that much slower than `cost` (what the real point's workers measured)."""
    if step_ratio:
        cost = cost.slowed(step_ratio)
    scheduler = scheduler_for(fleet, cost)
    workers = len(pool_roles(fleet).all)
    outcome = simulate(requests, scheduler, workers, cost, fleet.slo_of)
    summary = summarize(outcome.timelines, duration_s)
    return {"slo_attainment": summary["slo_attainment"],
            "slo_met_fraction": summary["slo_met_fraction"],
            "request_goodput": summary["goodput_rps"],
            "switches": sum(w.switches for w in outcome.workers),
            "p50_ttft_ms": _ms(summary["ttft_p50_s"]), "p99_ttft_ms": _ms(summary["ttft_p99_s"]),
            "p99_tbt_ms": _ms(summary["tbt_p99_s"])}


def predicted_sweep(fleet, cost, schedulers: list[str], rates: list[float],
                    requests_at, duration_s: float, step_ratio_at=None) -> dict:
    """{scheduler: {max_rate_at_90, points}} as the real sweep reports it, simulated.

    `requests_at(rate)` gives the workload of one point (the real sweep's own);
    `step_ratio_at(scheduler, rate)`, if given, how much slower than `cost` to run it.
    """
    import dataclasses

    out = {}
    for name in schedulers:
        policy = dataclasses.replace(fleet, scheduler=dataclasses.replace(fleet.scheduler,
                                                                          name=name))
        points = [{"rate": rate, **simulate_point(
            policy, cost, requests_at(rate), duration_s,
            step_ratio_at and step_ratio_at(name, rate))} for rate in rates]
        out[name] = {"max_rate_at_90": max_at_90(points, "rate"), "points": points}
    return out


def _ms(seconds):
    return None if seconds is None else seconds * 1e3


GPU_REFERENCE = ("qwen2_5_7b", "H800")  # the paper's most common model, on its testbed
REFERENCE_BATCH = 8


def step_ratio(fleet, cost) -> dict:
    """r of the CPU SLO rule (configs/bench/cpu-8models.yaml): this fleet's fitted decode
    step over Qwen2.5-7B's on H800 (the GPU profiles configs/sim/aegaeon-h800.yaml reads),
    both at batch 8 with 512-token contexts."""
    from pathlib import Path

    from tokenpool.controller.cost_fit import fit_gpu_profile
    from tokenpool.sim.config import load_sim_config

    sim = Path(__file__).resolve().parents[1] / "configs" / "sim" / "aegaeon-h800.yaml"
    profile_dir = load_sim_config(sim).device.profile_dir

    context = REFERENCE_BATCH * 512
    gpu = fit_gpu_profile(Path(profile_dir), *GPU_REFERENCE).decode(REFERENCE_BATCH, context)
    ours = cost.decode_step_time(fleet.models[0].id, REFERENCE_BATCH, context)
    return {"cpu_step_ms": ours * 1e3, "gpu_step_ms": gpu * 1e3, "r": ours / gpu}
