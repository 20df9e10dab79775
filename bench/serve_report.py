"""What `tokenpool bench serve` reports: vLLM's benchmark keys plus Aegaeon's SLO attainment.

Every number is measured on the client. TTFT runs from a request's scheduled arrival (the
open-loop client sends it then) to its first token; TPOT is a request's (last - first) /
(tokens - 1); ITL is the gap between successive chunks, as vLLM measures it. SLO attainment
is DESIGN §8's, from the same token times (sim/timelines.py). A request the server shed
or failed counts as a miss in attainment and goodput: it was not served.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable

from tokenpool.bench.load_client import RequestRecord
from tokenpool.sim.timelines import TokenTimeline, meets_slos, percentile
from tokenpool.schedulers.types import SLO


def timeline(record: RequestRecord, slo: SLO) -> TokenTimeline:
    tl = TokenTimeline(record.request.arrival_s, slo.ttft_s, slo.tbt_s)
    for at, count in record.chunks:
        for _ in range(count):
            tl.emit(at)
    if record.status == "ok":
        tl.finish()
    return tl


def _ms_stats(name: str, values: list[float]) -> dict:
    ms = [v * 1e3 for v in values]
    return {f"mean_{name}_ms": sum(ms) / len(ms) if ms else None,
            f"median_{name}_ms": percentile(ms, 50), f"p95_{name}_ms": percentile(ms, 95),
            f"p99_{name}_ms": percentile(ms, 99)}


def shed_reasons(records: Iterable[RequestRecord]) -> dict[str, int]:
    """How often the server gave each reason for shedding, numbers blanked out ("#"), so
    that an operator sees which admission signal fired."""
    return dict(Counter(_reason(r.error or "") for r in records if r.status == "shed"))


def _reason(error: str) -> str:
    _, _, body = error.partition(": ")  # "HTTP 429: {json}" or "RESOURCE_EXHAUSTED: text"
    try:
        body = json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        pass
    return re.sub(r"\d+(\.\d+)?", "#", str(body))[:120]


def summarize_records(records: list[RequestRecord], slo_of, duration_s: float) -> dict:
    """The keys for one set of requests (the whole run or one model)."""
    timelines = [timeline(r, slo_of(r.request.model)) for r in records]
    done = [(r, tl) for r, tl in zip(records, timelines) if r.status == "ok"]
    ttfts = [tl.ttft for _, tl in done if tl.num_tokens]
    tpots = [tl.mean_tpot for _, tl in done if tl.num_tokens > 1]
    itls = [b[0] - a[0] for r, _ in done for a, b in zip(r.chunks, r.chunks[1:])]
    e2e = [tl.last_time - tl.arrival for _, tl in done if tl.num_tokens]
    met = sum(meets_slos(tl) for tl in timelines)
    output_tokens = sum(r.num_tokens for r in records)
    return {
        "num_requests": len(records),
        "completed": len(done),
        "shed": sum(r.status == "shed" for r in records),
        "failed": sum(r.status == "error" for r in records),
        "shed_reasons": shed_reasons(records),
        "total_input_tokens": sum(r.request.prompt_len for r, _ in done),
        "total_output_tokens": output_tokens,
        "request_throughput": len(done) / duration_s,
        "request_goodput": met / duration_s,
        "output_throughput": output_tokens / duration_s,
        "slo_attainment": (sum(tl.attainment for tl in timelines) / len(timelines)
                           if timelines else None),
        "slo_met_fraction": met / len(records) if records else None,
        **_ms_stats("ttft", ttfts), **_ms_stats("tpot", tpots), **_ms_stats("itl", itls),
        **_ms_stats("e2el", e2e),
    }


def bench_report(records: list[RequestRecord], slo_of, duration_s: float,
                 **facts) -> dict:
    """The run's JSON: the keys over every request, then `per_model`."""
    by_model: dict[str, list[RequestRecord]] = {}
    for r in records:
        by_model.setdefault(r.request.model, []).append(r)
    slos = {m: slo_of(m) for m in by_model}
    return {
        **facts,
        "duration": duration_s,
        **summarize_records(records, slo_of, duration_s),
        "slo": {m: {"ttft_s": s.ttft_s, "tbt_s": s.tbt_s} for m, s in sorted(slos.items())},
        "per_model": {m: summarize_records(rs, slo_of, duration_s)
                      for m, rs in sorted(by_model.items())},
        "errors": _first_errors(records),
    }


def _first_errors(records: Iterable[RequestRecord], limit: int = 5) -> list[str]:
    seen: list[str] = []
    for r in records:
        if r.error and r.error not in seen:
            seen.append(r.error)
        if len(seen) >= limit:
            break
    return seen


def table(result: dict) -> str:
    rows = [("requests (completed / shed / failed)",
             f"{result['num_requests']} ({result['completed']} / {result['shed']} / "
             f"{result['failed']})"),
            ("request throughput (req/s)", fmt(result["request_throughput"])),
            ("request goodput (req/s)", fmt(result["request_goodput"])),
            ("output throughput (tok/s)", fmt(result["output_throughput"])),
            ("SLO attainment", fmt(result["slo_attainment"])),
            ("TTFT mean / p50 / p99 (ms)", _trio(result, "ttft")),
            ("TPOT mean / p50 / p99 (ms)", _trio(result, "tpot")),
            ("ITL mean / p50 / p99 (ms)", _trio(result, "itl"))]
    width = max(len(k) for k, _ in rows)
    return "".join(f"{k:<{width}}  {v}\n" for k, v in rows)


def _trio(result: dict, name: str) -> str:
    return " / ".join(fmt(result[f"{p}_{name}_ms"], 1) for p in ("mean", "median", "p99"))


def fmt(value, digits: int = 3) -> str:
    """A number for a report table; "-" for a missing one."""
    return "-" if value is None else f"{value:.{digits}f}"
