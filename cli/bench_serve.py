"""`tokenpool bench serve` (load a running server) and `tokenpool bench sweep` (schedulers x
rates, each on a fresh server)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from tokenpool.cli import _args

SERVE_DESCRIPTION = """\
Drive a running server with an open-loop load and report what its clients saw. Requests are
sent at their arrival times whatever happened to earlier ones, and streamed (prompt token
ids, greedy, ignore_eos, so each generates exactly its output length). The run stops when
the arrivals end (--duration) and every request has finished.

The workload is --workload CSV: an Aegaeon artifact workload (`synth_model_K` maps onto the
server's model ids as K mod n, or by --models-map) or the Azure trace (requests spread over
the model ids by Zipf popularity). With --rate R, arrivals are Poisson at R req/s over the
fleet instead, and the file only supplies the length pairs. --rate-scale X replays a trace X
times faster. Lengths are scaled by --length-scale and clamped to --max-lens.

JSON keys follow vLLM's bench (request_throughput, request_goodput, output_throughput,
mean/median/p95/p99 of ttft, tpot, itl, e2el in ms), plus slo_attainment (Aegaeon's, DESIGN
§8), shed and failed counts, and per_model. SLOs are the server's (GET /pool, or gRPC ListModels) unless --slo."""

SWEEP_DESCRIPTION = """\
Find each scheduler's sustainable rate on this machine. For every scheduler and rate, start
`tokenpool serve --config FILE --scheduler NAME` afresh, drive the fleet's `bench:` workload
at that rate (requests per second over the fleet) for --duration seconds, and stop it. The
sustainable rate is the highest rate whose SLO attainment, and every lower rate's, is >= 90%.
The simulator's prediction of the same sweep, from the cost model the servers fitted, is
reported beside it. Writes the JSON, a plot and a markdown report."""


def add_parsers(kinds: argparse._SubParsersAction) -> None:
    _add_serve(kinds)
    _add_sweep(kinds)


def _floats(text: str) -> list[float]:
    values = [float(v) for v in text.split(",") if v.strip()]
    if not values or min(values) <= 0:
        raise ValueError(f"expected positive numbers separated by commas, got {text!r}")
    return values


def _pair(cast):
    def parse(text: str):
        parts = text.split(",")
        if len(parts) != 2:
            raise ValueError(f"expected two values A,B, got {text!r}")
        return tuple(cast(p) for p in parts)
    return parse


def _add_serve(kinds) -> None:
    p = kinds.add_parser("serve", help="open-loop load against a running server",
                         description=SERVE_DESCRIPTION, formatter_class=_args.HelpFormatter)
    p.add_argument("--url", required=True,
                   help="the server: http://HOST:PORT, or HOST:PORT of its gRPC port with --grpc")
    p.add_argument("--grpc", action="store_true", help="send over gRPC instead of HTTP")
    p.add_argument("--workload", metavar="CSV", type=Path, required=True,
                   help="an Aegaeon workload CSV or the Azure trace")
    p.add_argument("--models-map", metavar="FILE", type=Path,
                   help="YAML/JSON mapping of the workload's model names to server model ids")
    p.add_argument("--rate", metavar="R", type=float,
                   help="Poisson arrivals at R req/s over the fleet (lengths from --workload)")
    p.add_argument("--rate-scale", metavar="X", type=float, default=1.0,
                   help="replay the trace X times faster (default: 1)")
    p.add_argument("--duration", metavar="S", type=float, default=60.0,
                   help="send arrivals of the first S seconds (default: 60)")
    p.add_argument("--length-scale", metavar="IN,OUT", default=(1.0, 1.0),
                   type=_args.checked(_pair(float), "length scale"),
                   help="multiply prompt and output lengths (default: 1,1)")
    p.add_argument("--max-lens", metavar="IN,OUT", default=(2048, 512),
                   type=_args.checked(_pair(int), "max lengths"),
                   help="clamp prompt and output lengths (default: 2048,512)")
    p.add_argument("--zipf", metavar="S", type=float, default=1.0,
                   help="Zipf exponent of model popularity for the Azure trace and --rate")
    p.add_argument("--slo", metavar="TTFT,TBT", type=_args.checked(_pair(float), "SLO"),
                   help="SLOs in seconds for every model (default: the server's, from /pool)")
    p.add_argument("--api-key", help="sent as a bearer token (default: none)")
    p.add_argument("--warmup", metavar="N", type=int, default=8,
                   help="short requests sent first and not reported (default: 8)")
    p.add_argument("--seed", metavar="N", type=_args.any_int, default=0)
    _args.add_json_out(p)
    p.add_argument("--plot", metavar="OUT.png", type=Path, help="TTFT and TPOT per model")
    p.set_defaults(func=_run_serve)


def _serve_requests(args, model_ids: list[str]):
    from tokenpool.bench.bench_workload import (BenchWorkload, LengthScale, load_models_map,
                                                poisson_requests, trace_requests)

    lengths = LengthScale(*args.length_scale, max_input=args.max_lens[0],
                          max_output=args.max_lens[1])
    kind = "poisson" if args.rate else "trace"
    spec = BenchWorkload(kind, str(args.workload), lengths, zipf_s=args.zipf)
    if args.rate:
        return poisson_requests(spec, model_ids, args.rate, args.duration, args.seed)
    mapping = load_models_map(args.models_map) if args.models_map else None
    return trace_requests(spec, model_ids, rate_scale=args.rate_scale,
                          duration_s=args.duration, seed=args.seed, models_map=mapping)


def _run_serve(args) -> int:
    from tokenpool.bench import report, serve_bench, serve_report
    from tokenpool.schedulers.types import SLO

    model_ids, slo_of = _server_view(args)
    requests = _serve_requests(args, model_ids)
    if args.slo:
        slo_of = lambda _model, slo=SLO(*args.slo): slo  # noqa: E731
    result = serve_bench.run(
        serve_bench.Target(args.url, args.grpc, args.api_key), requests, slo_of,
        seed=args.seed, warmup=serve_bench.warmup_requests(model_ids, args.warmup),
        workload=str(args.workload), rate=args.rate, rate_scale=args.rate_scale,
        command=_args.command_line(args))
    report.write_json(args.json, result)
    if args.plot:
        serve_bench.plot(result, args.plot)
    sys.stdout.write(serve_report.table(result))
    return 0


def _server_view(args):
    from tokenpool.bench import serve_bench

    if args.grpc:
        from tokenpool.bench.load_client import list_models_grpc
        from tokenpool.schedulers.types import SLO

        slos = {m: SLO(*pair) for m, pair in list_models_grpc(args.url, args.api_key).items()}
        return list(slos), slos.__getitem__
    facts = serve_bench.server_facts(args.url, args.api_key)
    return facts["models"], facts["slo"].__getitem__


def _add_sweep(kinds) -> None:
    p = kinds.add_parser("sweep", help="schedulers x rates, each point on a fresh server",
                         description=SWEEP_DESCRIPTION, formatter_class=_args.HelpFormatter)
    _args.add_config(p)
    p.add_argument("--schedulers", metavar="A,B,...", default="token-level,request-level,"
                   "request-level-plus", help="comma-separated scheduler names")
    p.add_argument("--rates", metavar="R1,R2,...", type=_args.checked(_floats, "rates"),
                   help="arrival rates, req/s over the fleet (default: the config's bench.rates)")
    p.add_argument("--duration", metavar="S", type=float,
                   help="seconds of arrivals per point (default: the config's bench.duration_s)")
    p.add_argument("--no-simulate", action="store_true",
                   help="skip the simulator's prediction of the same sweep")
    p.add_argument("--report", metavar="FILE.md", type=Path,
                   help="markdown report (default: docs/bench/sweep-<config name>.md)")
    p.add_argument("--logs", metavar="DIR", type=Path, help="keep each server's stderr here")
    p.add_argument("--baseline-switch-overhead", metavar="S", type=_args.non_negative_float,
                   help="seconds the request-level baselines hold a worker after each switch, "
                        "on the servers and in the simulator: the paper's ServerlessLLM "
                        "baseline re-initialises its engine (default: the config's "
                        "scheduler.baseline_switch_overhead_s)")
    _args.add_json_out(p)
    p.add_argument("--plot", metavar="OUT.png", type=Path, help="attainment against rate")
    p.set_defaults(func=_run_sweep)


def _run_sweep(args) -> int:
    from tokenpool.bench import report, sim_predict, sweep, sweep_report
    from tokenpool.fleet import load_fleet
    from tokenpool.schedulers.registry import SCHEDULERS

    fleet = load_fleet(args.config)
    if args.baseline_switch_overhead is not None:
        fleet = dataclasses.replace(fleet, scheduler=dataclasses.replace(
            fleet.scheduler, baseline_switch_overhead_s=args.baseline_switch_overhead))
    if fleet.bench is None:
        raise _usage(f"{args.config}: no bench: block (workload, rates) to sweep")
    names = [n.strip() for n in args.schedulers.split(",") if n.strip()]
    unknown = [n for n in names if n not in SCHEDULERS]
    if unknown or not names:
        raise _usage(f"--schedulers: unknown {unknown[0]!r} (expected some of "
                     f"{', '.join(SCHEDULERS)})" if unknown else "--schedulers: none given")
    if args.logs:
        args.logs.mkdir(parents=True, exist_ok=True)
    result = sweep.sweep(str(args.config), fleet, names, args.rates or fleet.bench.rates,
                         args.duration or fleet.bench.duration_s, log_dir=args.logs,
                         simulate=not args.no_simulate)
    report.write_json(args.json, result)
    title = f"Sweep of {Path(args.config).name} on this machine"
    if args.plot:
        sweep_report.plot(result, args.plot, title)
    path = args.report or Path("docs/bench") / f"sweep-{Path(args.config).stem}.md"
    plot_ref = None if not args.plot else _relative(args.plot, path.parent)
    slo = fleet.slo_of(fleet.models[0].id)
    rule = None if args.no_simulate else sim_predict.step_ratio(fleet,
                                                                sim_predict.fleet_cost(fleet))
    sweep_report.write(path, sweep_report.markdown(
        result, title=title, command=_args.command_line(args), config=str(args.config),
        slo={"ttft_s": slo.ttft_s, "tbt_s": slo.tbt_s}, plot_path=plot_ref, rule=rule))
    print(json.dumps({n: e["max_rate_at_90"] for n, e in result.items()}))
    return 0


def _relative(target: Path, base: Path) -> str:
    import os

    return os.path.relpath(target.resolve(), base.resolve())


def _usage(message: str):
    from tokenpool.errors import ConfigError

    return ConfigError(message)
