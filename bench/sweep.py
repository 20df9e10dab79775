"""`tokenpool bench sweep`: each scheduler at each rate, each point on a fresh server.

A point starts `tokenpool serve --scheduler NAME` in its own process (its own Ray cluster
when the fleet uses Ray), waits for its `ready` line, drives the fleet's `bench:` workload at
the rate with the open-loop client of `bench serve` (this process), and stops the server. A
fresh server per point keeps one point's queues, caches and switches out of the next.

Each scheduler's sustainable rate is `max_at_90` of its points (sim/timelines.py): the
highest rate whose SLO attainment, and every lower rate's, is at least 90%. Beside it,
`max_rate_at_90_met` is the same with DESIGN §8's goodput criterion: at least 90% of the
requests meet both their TTFT and their mean-TPOT SLO. The simulator's
prediction of the same sweep (bench/sim_predict.py) rides along in each entry.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tokenpool.bench import serve_bench
from tokenpool.bench.bench_workload import poisson_requests, trace_requests
from tokenpool.sim.timelines import max_at_90

READY_TIMEOUT_S = 600.0  # the first start packs the host cache and profiles the engines
POINT_KEYS = ("slo_attainment", "slo_met_fraction", "request_goodput", "request_throughput",
              "output_throughput", "completed", "shed", "failed", "num_requests",
              "median_ttft_ms", "p95_ttft_ms", "p99_ttft_ms", "median_itl_ms", "p95_itl_ms",
              "p99_itl_ms", "median_tpot_ms", "p99_tpot_ms", "shed_reasons")


@dataclass(frozen=True, slots=True)
class Server:
    url: str  # http://127.0.0.1:PORT
    grpc: str  # 127.0.0.1:PORT
    pid: int


@contextmanager
def served(config: str, scheduler: str, log_path: Path | None = None,
           baseline_switch_overhead_s: float | None = None):
    """A `tokenpool serve` process of `config` under `scheduler`; yields its Server.

    It binds port 0 for both edges and says which ports it got in its `ready` line: choosing
    free ports here and passing them would race with whatever else binds ports meanwhile."""
    command = [sys.executable, "-m", "tokenpool.cli.main", "serve", "--config", str(config),
               "--scheduler", scheduler, "--http-port", "0", "--grpc-port", "0"]
    if baseline_switch_overhead_s is not None:
        command += ["--baseline-switch-overhead", repr(baseline_switch_overhead_s)]
    log = open(log_path, "w") if log_path else subprocess.DEVNULL
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True,
                            start_new_session=True)
    try:
        http, grpc = _wait_ready(proc)
        yield Server(f"http://{http}", grpc, proc.pid)
    finally:
        _stop(proc)
        if log_path:
            log.close()


def _wait_ready(proc: subprocess.Popen) -> tuple[str, str]:
    """The HTTP and gRPC addresses of the `ready http=H:P grpc=H:P` line."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    for line in proc.stdout:  # the server prints nothing else on stdout
        if line.startswith("ready "):
            fields = dict(part.split("=", 1) for part in line.split()[1:])
            return fields["http"], fields["grpc"]
        if time.monotonic() > deadline:
            break
    code = proc.poll()
    raise RuntimeError(f"tokenpool serve did not become ready (exit code {code}); see its log")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def point_requests(fleet, rate: float, duration_s: float | None = None):
    """The fleet's `bench:` workload at `rate` requests per second over the fleet."""
    bench = fleet.bench
    spec = bench.workload.resolve(Path(fleet.base_dir))
    ids = [m.id for m in fleet.models]
    duration = duration_s or bench.duration_s
    if spec.kind == "poisson":
        return poisson_requests(spec, ids, rate, duration, bench.seed)
    # A trace runs at its own pace times `rate`: rate 2 replays it twice as fast.
    return trace_requests(spec, ids, rate_scale=rate, duration_s=duration, seed=bench.seed)


def run_point(config: str, fleet, scheduler: str, rate: float, duration_s: float,
              log_dir: Path | None = None) -> dict:
    requests = point_requests(fleet, rate, duration_s)
    log = log_dir / f"serve-{scheduler}-{rate:g}.log" if log_dir else None
    print(f"bench sweep: {scheduler} at {rate:g} req/s: {len(requests)} requests",
          file=sys.stderr, flush=True)
    overhead = fleet.scheduler.baseline_switch_overhead_s
    with served(config, scheduler, log, overhead) as server:
        url = server.url
        before = serve_bench.server_facts(url)
        warmup = serve_bench.warmup_requests(before["models"], 2 * len(before["models"]))
        result = serve_bench.run(serve_bench.Target(url), requests, before["slo"].__getitem__,
                                 seed=fleet.bench.seed, warmup=warmup, progress=False)
        after = serve_bench.server_facts(url)
    point = {"rate": rate, **{k: result[k] for k in POINT_KEYS},
             "switches": after["switches"] - before["switches"],
             "decode_step_ratio": after["decode_step_ratio"]}
    print(f"bench sweep: {scheduler} at {rate:g} req/s: attainment "
          f"{point['slo_attainment']:.3f}, goodput {point['request_goodput']:.2f} req/s",
          file=sys.stderr, flush=True)
    return point


def sweep(config: str, fleet, schedulers: list[str], rates: list[float], duration_s: float,
          *, log_dir: Path | None = None, simulate: bool = True) -> dict:
    """{scheduler: {max_rate_at_90, points, ..., simulated}}."""
    workers = fleet.pool.num_workers
    out = {}
    for name in schedulers:
        points = [run_point(config, fleet, name, rate, duration_s, log_dir) for rate in rates]
        best = max_at_90(points, "rate")
        out[name] = {"max_rate_at_90": best, "points": points, "num_workers": workers,
                     "max_rate_at_90_met": max_at_90(points, "rate", "slo_met_fraction"),
                     "num_models": len(fleet.models),
                     "baseline_switch_overhead_s": _overhead_of(fleet, name),
                     "max_rate_per_device": None if best is None else best / workers}
    if simulate:  # after the points: their servers left the fitted profile in the cache
        _predict(fleet, out, rates, duration_s)
    return out


def _predict(fleet, out: dict, rates: list[float], duration_s: float) -> None:
    """The simulator's prediction of every point twice: on the start-up profile, and on the
    profile slowed to what that point's workers measured (its decode_step_ratio)."""
    from tokenpool.bench import sim_predict

    cost = sim_predict.fleet_cost(fleet)
    schedulers = list(out)
    measured = {(name, p["rate"]): p["decode_step_ratio"]
                for name in schedulers for p in out[name]["points"]}
    for key, step_ratio_at in (("simulated", None),
                               ("simulated_measured_steps", lambda n, r: measured[n, r])):
        predicted = sim_predict.predicted_sweep(
            fleet, cost, schedulers, rates, lambda r: point_requests(fleet, r, duration_s),
            duration_s, step_ratio_at)
        for name in schedulers:
            out[name][key] = predicted[name]
            out[name][f"{key}_over_real"] = _ratio(predicted[name]["max_rate_at_90"],
                                                   out[name]["max_rate_at_90"])


def _overhead_of(fleet, scheduler: str) -> float:
    """What a switch of `scheduler` held its worker for, beyond the copy
    (`Switch.baseline_switch_overhead_s`)."""
    baseline = scheduler in ("request-level", "request-level-plus")
    return fleet.scheduler.baseline_switch_overhead_s if baseline else 0.0


def _ratio(a, b):
    return None if a is None or not b else a / b
