"""Pinned-plus-pooled fleets: what pinning the hot models costs in devices.

A pinned fleet is `pins` devices of their own (`SimConfig.pins`: one model each, which they
prefill and decode and never switch away from) beside a pooled cluster that serves every
other model and is sized as usual. `tokenpool simulate capacity --pin-top K` finds the fewest
devices at which that fleet reaches 90% attainment (pinned plus pooled) and sets it against
the all-pooled fleet's count.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

from tokenpool.schedulers.types import SLO
from tokenpool.sim.run import devices_needed, simulated
from tokenpool.sim.timelines import summarize
from tokenpool.sim.workload import WorkloadRequest


def hottest(workload: list[WorkloadRequest], k: int) -> list[str]:
    """The `k` models with the most requests, most first (ties by name)."""
    counts = Counter(r.model for r in workload)
    return sorted(counts, key=lambda m: (-counts[m], m))[:k]


def pins_for(config, workload: list[WorkloadRequest], top: int, workers: int) -> dict[str, int]:
    """The config's own pins, then `workers` devices for each of the `top` hottest models
    not pinned there."""
    pins = dict(config.pins)
    for model in hottest(workload, top):
        pins.setdefault(model, workers)
    return {m: n for m, n in pins.items() if n}


def pinned_capacity(config, workload: list[WorkloadRequest], scheduler_name: str, slo: SLO,
                    pins: dict[str, int], target: float = 0.9) -> dict:
    """Devices the pinned-plus-pooled fleet needs for `target` attainment: the pinned ones
    (fixed) plus the fewest pooled ones that get there; at that size, how the pinned
    models' requests (`hot`) and the others' (`rest`) fared, and the switches."""
    pinned = sum(pins.values())
    config = dataclasses.replace(config, pins=dict(pins))
    found = devices_needed(config, workload, scheduler_name, slo, target=target)
    pooled = found["devices"]
    out = {"pins": dict(pins), "pinned_devices": pinned, "pooled_devices": pooled,
           "devices": None if pooled is None else pinned + pooled,
           "tried": [{"num_devices": pinned + t["num_devices"], "pooled_devices": t["num_devices"],
                      "slo_attainment": t["slo_attainment"]} for t in found["tried"]]}
    if pooled is not None:
        out.update(split_report(config.with_num_devices(pooled), workload, scheduler_name,
                                slo, set(pins)))
    return out


def split_report(config, workload: list[WorkloadRequest], scheduler_name: str, slo: SLO,
                 hot: set[str]) -> dict:
    """One run: the metrics of the `hot` models' requests and of the rest's, and the
    switches of the pinned devices (each) and of the pooled ones (in all)."""
    outcome, duration = simulated(config, workload, scheduler_name, slo)
    sides: dict[str, list] = {"hot": [], "rest": []}
    for request, timeline in zip(workload, outcome.timelines):  # both in workload order
        sides["hot" if request.model in hot else "rest"].append(timeline)
    keys = ("requests", "slo_attainment", "ttft_p50_s", "ttft_p99_s", "tbt_p99_s")
    out = {side: {k: v for k, v in summarize(tls, duration, slo.ttft_s, slo.tbt_s).items()
                  if k in keys} for side, tls in sides.items()}
    num_pinned = sum(config.pins.values())
    return {**out, "pinned_switches": [w.switches for w in outcome.workers[:num_pinned]],
            "pooled_switches": sum(w.switches for w in outcome.workers[num_pinned:])}


def versus_all_pooled(config, workload: list[WorkloadRequest], scheduler_name: str,
                      slo: SLO, all_pooled: dict, pinned: dict) -> dict:
    """The all-pooled fleet at the size it needed, split the same way (what the models we
    would pin get when they pool), and how many devices pinning adds."""
    a, p = all_pooled.get("devices"), pinned.get("devices")
    if not (a and p):
        return {}
    split = split_report(without_pins(config).with_num_devices(a), workload, scheduler_name,
                         slo, set(pinned["pins"]))
    del split["pinned_switches"]
    return {"all_pooled": {"devices": a, **split}, "extra_devices": p - a}


def without_pins(config):
    """The all-pooled fleet of a config that pins models."""
    return dataclasses.replace(config, pins={}) if config.pins else config


def pinned_reports(config, workload: list[WorkloadRequest], names: list[str], slo: SLO,
                   pins: dict[str, int], all_pooled: dict) -> dict:
    """`NAME+pins` entries for `capacity`, one per policy that pools (static pins every
    model already), each set against the all-pooled result in `all_pooled[NAME]`."""
    out: dict = {}
    for name in names if pins else ():
        if name != "static":
            found = pinned_capacity(config, workload, name, slo, pins)
            out[f"{name}+pins"] = {**found, **versus_all_pooled(
                config, workload, name, slo, all_pooled.get(name, {}), found)}
    return out


def line(key: str, found: dict) -> str:
    return (f"{key}: {found['devices']} devices ({found['pinned_devices']} pinned + "
            f"{found['pooled_devices']} pooled)\n")
