"""`tokenpool bench chat --rates`: the chat workload open loop, prefix caching on against off.

Sessions start as a Poisson process of `rate` sessions per second (seeded by the plan's seed)
for `duration_s`; each runs its turns back to back as in bench/chat_workload.py, session s
talking to model s mod M. Every (rate, caching) point runs on a fresh server, as
bench/chat_bench.py's runs do (its fleet variant, without shedding unless asked; sweep.py's
`served`). A point ends when every session has ended, or `grace_s` after the arrivals stop:
turns still in flight then count as failed, turns never sent are not counted.

Each turn is scored as `bench sweep` scores a request (bench/serve_report.py's
`summarize_records`): arrival when the turn was sent, its tokens when their SSE chunks came,
the model's TTFT and TBT SLOs from the server, so `slo_attainment` is DESIGN §8's token-level
attainment (TTFT deadline for the first token, TBT for each next; a failed turn scores what it
got, one with no token 0). Each setting's sustainable rate is `max_at_90` over its points
(sim/timelines.py), as the sweep's: the highest rate whose attainment, and every lower
rate's, is >= 90%; `max_rate_at_90_met` uses the goodput test (90% of turns meet TTFT and
mean TPOT) instead.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from tokenpool.bench import chat_bench
from tokenpool.bench.chat_workload import ChatPlan, TurnRecord, run_session, warm_up

SETTINGS = (("on", True), ("off", False))


@dataclass(frozen=True, slots=True)
class RatePlan:
    rates: tuple[float, ...]  # sessions started per second
    duration_s: float = 40.0  # sessions start for this long
    grace_s: float = 60.0  # then the point waits at most this long for them to end


def session_starts(rate: float, duration_s: float, seed: int) -> list[float]:
    """Poisson start times in [0, duration_s); the same seed at every rate."""
    rng = np.random.default_rng(seed)
    count = int(rng.poisson(rate * duration_s))
    return sorted(rng.uniform(0.0, duration_s, size=count).tolist())


async def drive(url: str, plan: ChatPlan, starts: list[float], deadline_s: float,
                timeout_s: float = 600.0) -> tuple[list[TurnRecord], float]:
    """Session s from starts[s] on, until all end or `deadline_s` after the start; the turns
    sent, and the start in perf_counter seconds."""
    import openai

    client = openai.AsyncOpenAI(base_url=url.rstrip("/") + "/v1", api_key="unused",
                                max_retries=0, timeout=timeout_s)
    records: list[TurnRecord] = []
    t0 = time.perf_counter()

    async def session(s: int, at: float) -> None:
        await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
        await run_session(client, plan, s, records)
    tasks = [asyncio.ensure_future(session(s, at)) for s, at in enumerate(starts)]
    try:
        pending = (await asyncio.wait(tasks, timeout=deadline_s))[1] if tasks else ()
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    finally:
        await client.close()
    for record in records:
        if record.error is None and record.e2e_s is None:
            record.error = "cut off: the grace time passed"
    return records, t0


def scored(records: list[TurnRecord], t0: float, slo_of) -> dict:
    """The sweep's request metrics of the turns (serve_report.summarize_records)."""
    from tokenpool.bench.load_client import RequestRecord
    from tokenpool.bench.serve_report import summarize_records
    from tokenpool.sim.workload import WorkloadRequest

    requests = [RequestRecord(
        WorkloadRequest(str(i), r.model, r.sent_at - t0, r.prompt_tokens, r.completion_tokens),
        sent_s=r.sent_at - t0, chunks=[(t - t0, n) for t, n in r.chunks],
        status="ok" if r.error is None else "error", error=r.error)
        for i, r in enumerate(records)]
    last = max((t for r in requests for t, _ in r.chunks), default=0.0)
    duration = max(last, max((r.sent_s for r in requests), default=0.0), 1e-9)
    return summarize_records(requests, slo_of, duration)


def point_summary(rate: float, sessions: int, records: list[TurnRecord], t0: float,
                  slo_of) -> dict:
    s = scored(records, t0, slo_of)
    ok = [r for r in records if r.error is None]
    prompt, cached = sum(r.prompt_tokens for r in ok), sum(r.cached_tokens for r in ok)
    ttft = chat_bench.ttft_stats(ok)
    return {"rate": rate, "sessions": sessions, "requests": len(records),
            "finished": s["completed"], "errors": len(records) - len(ok),
            "first_errors": [r.error for r in records if r.error][:3],
            "slo_attainment": s["slo_attainment"], "slo_met_fraction": s["slo_met_fraction"],
            "ttft_p50_s": ttft["ttft_p50_s"], "ttft_p90_s": ttft["ttft_p90_s"],
            "median_itl_ms": s["median_itl_ms"], "p99_itl_ms": s["p99_itl_ms"],
            "prompt_tokens": prompt, "cached_tokens": cached,
            "cached_fraction": cached / prompt if prompt else None,
            "turns_per_s": s["request_throughput"], "output_throughput": s["output_throughput"]}


def run_point(config: Path, scheduler: str, plan: ChatPlan, rates: RatePlan, rate: float,
              caching: bool, log_dir: Path | None = None, shed: bool = False) -> dict:
    """One fresh server, sessions at `rate` for the plan's duration; the point."""
    from tokenpool.bench.serve_bench import server_facts
    from tokenpool.bench.sweep import served

    starts = session_starts(rate, rates.duration_s, plan.seed)
    plan = replace(plan, sessions=len(starts))
    name = "on" if caching else "off"
    print(f"bench chat: caching {name} at {rate:g} sessions/s: {len(starts)} sessions x "
          f"{plan.turns} turns", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix="tokenpool-chat-") as tmp:
        variant = chat_bench.fleet_variant(config, plan.models, caching, Path(tmp), shed)
        log = log_dir / f"serve-chat-{name}-{rate:g}.log" if log_dir else None
        with served(str(variant), scheduler, log) as server:
            asyncio.run(warm_up(server.url, plan.models))
            slo = server_facts(server.url)["slo"]
            before = chat_bench.scrape(server.url)
            deadline = rates.duration_s + rates.grace_s
            records, t0 = asyncio.run(drive(server.url, plan, starts, deadline))
            after = chat_bench.scrape(server.url)
    point = point_summary(rate, len(starts), records, t0, slo.__getitem__)
    point["metrics"] = {k.split(":")[1]: after[k] - before[k] for k in chat_bench.METRICS}
    print(f"bench chat: caching {name} at {rate:g} sessions/s: attainment "
          f"{_num(point['slo_attainment'], '.3f')}, {point['errors']} errors",
          file=sys.stderr, flush=True)
    return point


def run(config: Path, fleet, plan: ChatPlan, rates: RatePlan, scheduler: str | None = None,
        log_dir: Path | None = None, shed: bool = False) -> dict:
    """Every rate, caching on then off at each; per setting its points and sustainable rate."""
    from datetime import datetime, timezone

    from tokenpool.bench.report import cpu_info
    from tokenpool.sim.timelines import max_at_90

    scheduler = scheduler or fleet.scheduler.name
    points = {name: [] for name, _ in SETTINGS}
    for rate in rates.rates:
        for name, flag in SETTINGS:
            points[name].append(run_point(config, scheduler, plan, rates, rate, flag,
                                          log_dir, shed))
    settings = {name: {"max_rate_at_90": max_at_90(p, "rate"),
                       "max_rate_at_90_met": max_at_90(p, "rate", "slo_met_fraction"),
                       "points": p} for name, p in points.items()}
    slo = {m: {"ttft_s": fleet.slo_of(m).ttft_s, "tbt_s": fleet.slo_of(m).tbt_s}
           for m in plan.models}
    return {
        "bench": "chat-rates", "config": str(config), "scheduler": scheduler,
        "models": list(plan.models), "rates": list(rates.rates), "rate_unit": "sessions/s",
        "duration_s": rates.duration_s, "grace_s": rates.grace_s, "turns": plan.turns,
        "shedding": shed, "system_prompt_tokens": plan.system_tokens,
        "user_tokens": plan.user_tokens, "max_tokens": plan.max_tokens, "seed": plan.seed,
        "slo": slo, "settings": settings,
        "sustainable_rate": {n: s["max_rate_at_90"] for n, s in settings.items()},
        "sustainable_rate_met": {n: s["max_rate_at_90_met"] for n, s in settings.items()},
        "num_workers": fleet.pool.num_workers, "engine": chat_bench._engine_facts(fleet),
        "cpu": cpu_info(), "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def table(result: dict) -> str:
    rows = [("caching", "rate", "sessions", "turns sent", "finished", "err", "attainment",
             "met", "TTFT p50", "p90", "cached/prompt", "turns/s")]
    for name, setting in result["settings"].items():
        for p in setting["points"]:
            frac = p["cached_fraction"]
            rows.append((name, f"{p['rate']:g}", str(p["sessions"]), str(p["requests"]),
                         str(p["finished"]), str(p["errors"]),
                         _num(p["slo_attainment"], ".3f"), _num(p["slo_met_fraction"], ".3f"),
                         chat_bench._ms(p["ttft_p50_s"]), chat_bench._ms(p["ttft_p90_s"]),
                         "-" if frac is None else f"{frac:.1%}", _num(p["turns_per_s"], ".2f")))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows]
    rate = result["sustainable_rate"]
    lines.append(f"sustainable rate (attainment >= 90% there and at every lower rate), "
                 f"sessions/s: on {_num(rate['on'], 'g')}, off {_num(rate['off'], 'g')}")
    return "TTFT in ms; rate in sessions started per second\n" + "\n".join(lines) + "\n"


def _num(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)
