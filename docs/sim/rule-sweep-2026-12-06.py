"""Scaling-rule tuning sweep in the simulator (token-level, market workloads, config SLOs).
Each line: the tuning, then per workload (device-hours, attainment). From the repository root:
`.venv/bin/python docs/sim/rule-sweep-2026-12-06.py > rule-sweep.jsonl` (about 5 minutes)."""
import json, itertools, dataclasses
from tokenpool.sim.autoscale import run_elastic, shaped
from tokenpool.sim.config import load_sim_config
from tokenpool.schedulers.types import SLO
from tokenpool.schedulers.scaling import ScalingConfig

S = [0.25, 0.5, 1, 1, 0.5, 0.25]
loads = []
for name, path, shape in (("flat", "configs/sim/market.yaml", None),
                          ("shaped", "configs/sim/market.yaml", S),
                          ("day", "configs/sim/market-day.yaml", S)):
    c = load_sim_config(path)
    w = c.workload.requests()
    if shape: w = shaped(w, shape)
    loads.append((name, c, w))
for ga, tl, sl, gaf in itertools.product((1.0, 1.25, 1.5), (0.8, 1.0, 1.2), (0.6, 0.75, 0.9), (10.0, 30.0)):
    if sl >= tl:
        continue
    row = {"grow_alpha": ga, "target_load": tl, "shrink_load": sl, "grow_after_s": gaf}
    for name, c, w in loads:
        sc = dataclasses.replace(c.scaling or ScalingConfig(), grow_alpha=ga, target_load=tl,
                                 shrink_load=sl, grow_after_s=gaf)
        r = run_elastic(c, w, "token-level", SLO(c.slo.ttft_s, c.slo.tbt_s), sc)
        row[name] = [round(r["device_hours"], 3), round(r["slo_attainment"], 3)]
    print(json.dumps(row), flush=True)
