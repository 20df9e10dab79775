"""`tokenpool simulate [sweep|workload]`: the schedulers on simulated GPUs, as JSON (and a
plot); `capacity` lives in cli/simulate_capacity.py."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tokenpool.cli import _args

DESCRIPTION = """\
Run a multi-model workload through a scheduler on simulated devices whose prefill, decode
and switch times come from least-squares fits to measured GPU profiles (DESIGN §3.4). The
policies are the very objects that drive real workers. Writes one JSON object to --json with
scheduler, num_models, num_devices, requests, slo_attainment (Aegaeon's metric), goodput_rps,
ttft_p50_s, ttft_p99_s, tbt_p99_s and switches; with a workload that names its prompts' KV
pages (workload kind `chat`), also prefix_cache_queried_tokens, prefix_cache_hit_tokens and
prefix_cache_hit_rate."""

EPILOG = """\
examples:
  tokenpool simulate --config configs/sim/aegaeon-h800.yaml \\
      --workload ../shared/data/aegaeon/workloads/synth-40-0.1-1.0-1.0.csv --json out.json
  tokenpool simulate --config configs/sim/aegaeon-h800.yaml --workload W.csv \\
      --scheduler request-level --ttft-slo 5 --tbt-slo 0.05 --num-devices 32 --json out.json
  tokenpool simulate sweep --config configs/sim/aegaeon-h800.yaml \\
      --workloads '../shared/data/aegaeon/workloads/synth-*-0.1-*.csv' \\
      --schedulers token-level,request-level --json sweep.json --plot sweep.png"""

SWEEP_DESCRIPTION = """\
Run every workload matching --workloads through every scheduler. The JSON maps each scheduler
to {max_models_at_90, max_rate_at_90, points: [{workload, num_models, rate, slo_attainment,
goodput_rps}]}; max_rate_at_90 is null unless the workloads vary the rate. The plot shows SLO
attainment against the number of models, or against the rate when only the rate varies
(the paper's Figure 11)."""


def add_parser(commands: argparse._SubParsersAction) -> None:
    # Not at the top: it builds on this module's options, so that import would be circular.
    from tokenpool.cli import simulate_capacity

    p = commands.add_parser("simulate", help="schedulers on simulated GPUs (JSON, sweeps)",
                            description=DESCRIPTION, epilog=EPILOG,
                            formatter_class=_args.HelpFormatter)
    _common(p, required=False)
    p.add_argument("--workload", metavar="CSV", type=Path,
                   help="requests: Request Time, Model Name, Input Length, Output Length "
                        "(default: the config's workload: block)")
    p.add_argument("--scheduler", metavar="NAME", default=None,
                   help="token-level, request-level, request-level-plus or static "
                        "(default: the config's scheduler.name)")
    p.add_argument("--json", metavar="OUT", type=Path, help="write the result here (required)")
    p.set_defaults(func=run_single)
    sub = p.add_subparsers(dest="simulate_command", metavar="sweep")
    _add_sweep(sub)
    _add_workload(sub)
    simulate_capacity.add_parser(sub)


def _add_sweep(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("sweep", help="many workloads x schedulers, with a plot",
                       description=SWEEP_DESCRIPTION, formatter_class=_args.HelpFormatter)
    _common(s, required=True)
    s.add_argument("--workloads", metavar="GLOB", required=True,
                   help="a glob of workload CSVs (quote it)")
    s.add_argument("--schedulers", metavar="A,B,...", default="token-level,request-level",
                   help="comma-separated scheduler names (default: token-level,request-level)")
    _args.add_json_out(s)
    s.add_argument("--plot", metavar="OUT.png", type=Path, default=None,
                   help="also draw SLO attainment against models (or rate) to this file")
    s.set_defaults(func=run_sweep)


def _add_workload(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser("workload", help="generate artifact-style workloads (Poisson per model)",
                       description=WORKLOAD_DESCRIPTION, formatter_class=_args.HelpFormatter)
    g.add_argument("--models", metavar="N[,N...]", required=True,
                   type=_args.checked(_int_list, "--models"), help="model counts")
    g.add_argument("--rates", metavar="R[,R...]", required=True,
                   type=_args.checked(_float_list, "--rates"), help="req/s per model")
    g.add_argument("--duration", metavar="S", type=_args.checked(_positive, "--duration"),
                   default=120.0, help="seconds of arrivals (default: 120, as the artifact)")
    g.add_argument("--lengths", metavar="GLOB", required=True,
                   help="CSVs (Aegaeon workloads or the Azure trace) to resample lengths from")
    g.add_argument("--seed", metavar="N", type=_args.any_int, default=0,
                   help="seed; each file also mixes in its model count and rate (default: 0)")
    g.add_argument("--out-dir", metavar="DIR", type=Path, required=True,
                   help="writes DIR/synth-N-R-1.0-1.0.csv for every N and R")
    g.set_defaults(func=run_workload)


def _common(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--config", metavar="FILE", type=Path, required=required,
                   help="simulation set-up (YAML), e.g. configs/sim/aegaeon-h800.yaml")
    p.add_argument("--ttft-slo", metavar="S", type=_args.checked(_positive, "--ttft-slo"),
                   default=None, help="TTFT SLO in seconds (default: the config's)")
    p.add_argument("--tbt-slo", metavar="S", type=_args.checked(_positive, "--tbt-slo"),
                   default=None, help="time-between-tokens SLO in seconds (default: the config's)")
    p.add_argument("--seed", metavar="N", type=_args.any_int, default=0,
                   help="seed for generated workloads (default: 0)")
    p.add_argument("--num-devices", metavar="N", type=_args.positive_int, default=None,
                   help="override the device count, keeping the prefill:decode ratio")


WORKLOAD_DESCRIPTION = """\
Write workloads in the artifact's CSV format: every model gets Poisson arrivals at the rate,
prompt and output lengths are resampled from --lengths. Use it to extend the artifact's
series past 80 models or rate 0.7 with the same length distribution."""


def _int_list(text: str) -> list[int]:
    values = [int(x) for x in text.split(",") if x]
    if not values or min(values) < 1:
        raise ValueError(f"expected positive integers, got {text!r}")
    return values


def _float_list(text: str) -> list[float]:
    values = [float(x) for x in text.split(",") if x]
    if not values or min(values) <= 0:
        raise ValueError(f"expected positive numbers, got {text!r}")
    return values


def run_workload(args: argparse.Namespace) -> int:
    import glob

    import numpy as np

    from tokenpool.sim.workload import (load_length_pairs, poisson_workload,
                                               write_aegaeon_csv)
    from tokenpool.errors import ConfigError

    sources = sorted(glob.glob(args.lengths))
    if not sources:
        raise ConfigError(f"--lengths: no file matches {args.lengths!r}")
    lengths = load_length_pairs(sources)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for n in args.models:
        for rate in args.rates:
            # Distinct, reproducible streams per file (hash() of a tuple is salted per run).
            seed = args.seed * 1_000_003 + n * 1009 + round(rate * 1000)
            requests = poisson_workload(np.full(n, rate), args.duration, seed, lengths)
            path = args.out_dir / f"synth-{n}-{rate:g}-1.0-1.0.csv"
            write_aegaeon_csv(requests, path)
            sys.stdout.write(f"{path}: {len(requests)} requests\n")
    return 0


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise ValueError(f"must be > 0, got {text}")
    return value


def _setup(args):
    from tokenpool.sim.config import load_sim_config
    from tokenpool.errors import ConfigError
    from tokenpool.schedulers.types import SLO

    config = load_sim_config(args.config)
    if args.num_devices:
        try:
            config = config.with_num_devices(args.num_devices)
        except ValueError as exc:
            raise ConfigError(f"--num-devices: {exc}") from exc
    slo = SLO(args.ttft_slo or config.slo.ttft_s, args.tbt_slo or config.slo.tbt_s)
    return config, slo


def run_single(args: argparse.Namespace) -> int:
    from tokenpool.bench.report import write_json
    from tokenpool.sim import run as sim_run
    from tokenpool.sim.workload import load_aegaeon_csv
    from tokenpool.errors import ConfigError
    from tokenpool.schedulers.registry import SCHEDULERS

    for flag, value in (("--config", args.config), ("--json", args.json)):
        if value is None:
            raise ConfigError(f"{flag} is required (or use `tokenpool simulate sweep`)")
    config, slo = _setup(args)
    name = args.scheduler or config.scheduler.name
    if name not in SCHEDULERS:
        raise ConfigError(f"--scheduler: unknown {name!r}; expected one of {', '.join(SCHEDULERS)}")
    if args.workload is not None:
        workload = load_aegaeon_csv(args.workload)
    elif config.workload is not None:  # e.g. `kind: chat`, which has no CSV form
        workload = config.workload.requests()
    else:
        raise ConfigError("--workload is required: the config has no workload: block")
    result = sim_run.run_one(config, workload, name, slo)
    write_json(args.json, result)
    sys.stdout.write(_line(result))
    return 0


def run_sweep(args: argparse.Namespace) -> int:
    import glob

    from tokenpool.bench.report import write_json
    from tokenpool.sim import run as sim_run
    from tokenpool.sim.workload import load_aegaeon_csv
    from tokenpool.errors import ConfigError

    paths = sorted(Path(p) for p in glob.glob(args.workloads))
    if not paths:
        raise ConfigError(f"--workloads: no file matches {args.workloads!r}")
    names = _scheduler_names(args.schedulers)
    config, slo = _setup(args)
    workloads = {p: load_aegaeon_csv(p) for p in paths}
    out = {}
    for name in names:
        points = [sim_run.workload_point(p, w, sim_run.run_one(config, w, name, slo))
                  for p, w in workloads.items()]
        out[name] = sim_run.sweep_summary(points)
        sys.stdout.write(f"{name}: max_models_at_90={out[name]['max_models_at_90']} "
                         f"max_rate_at_90={out[name]['max_rate_at_90']}\n")
    write_json(args.json, out)
    if args.plot:
        from tokenpool.sim.plot import plot_sweep

        plot_sweep(out, args.plot, f"TTFT {slo.ttft_s:g} s, TBT {slo.tbt_s * 1e3:g} ms")
    return 0


def _scheduler_names(text: str) -> list[str]:
    from tokenpool.errors import ConfigError
    from tokenpool.schedulers.registry import SCHEDULERS

    names = [n for n in text.split(",") if n]
    bad = [n for n in names if n not in SCHEDULERS]
    if bad or not names:
        raise ConfigError(f"--schedulers: unknown {bad or names!r}; expected "
                          f"{', '.join(SCHEDULERS)}")
    return names


def _line(r: dict) -> str:
    return (f"{r['scheduler']}: {r['num_models']} models on {r['num_devices']} devices, "
            f"{r['requests']} requests: SLO attainment {r['slo_attainment']:.3f}, goodput "
            f"{r['goodput_rps']:.3f} req/s, TTFT p50 {r['ttft_p50_s']:.2f} s / p99 "
            f"{r['ttft_p99_s']:.2f} s, TBT p99 {r['tbt_p99_s'] * 1e3:.0f} ms, "
            f"{r['switches']} switches\n")
