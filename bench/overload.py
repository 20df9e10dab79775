"""`tokenpool bench overload`: a fresh server driven past capacity, then back to a normal load.

Phase one offers `factor` x the sustainable rate for `duration_s`; phase two, right after it,
offers the sustainable rate for `recovery_s`. Both are the fleet's `bench:` workload, sent
open loop. The report says, per phase, how much the server shed (429), how the requests it
accepted fared (SLO attainment of the accepted ones only: shedding exists so that they keep
their SLOs), and how the server's resident memory (its whole process tree: the Ray workers
are its descendants) moved: first and peak MiB, and the least-squares slope in MiB/min.
After the run, every worker must hold 0 KV pages.
"""

from __future__ import annotations

import asyncio
import dataclasses
import sys
import threading
import time
from pathlib import Path

from tokenpool.bench import serve_bench, serve_report
from tokenpool.bench.load_client import run_open_loop
from tokenpool.bench.sweep import point_requests, served


class MemorySampler:
    """Resident memory of a process and its descendants, sampled on a thread: all of it, and
    the private part (resident minus file-backed shared pages). The private part is what a
    leak grows. The rest is mostly the node's host cache: each worker maps a model's
    /dev/shm file the first time it switches to it, and the kernel counts those same pages
    in every process that maps them, so total RSS steps up by a model's size per worker
    until each worker has served every model, without a byte more in use on the node."""

    def __init__(self, pid: int, interval_s: float = 1.0):
        import psutil

        self._root, self._interval = psutil.Process(pid), interval_s
        self.samples: list[tuple[float, float]] = []  # (perf_counter s, MiB resident)
        self.private: list[tuple[float, float]] = []  # (perf_counter s, MiB private)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def rss_mib(self) -> float:
        return self._read()[0]

    def _read(self) -> tuple[float, float]:
        import psutil

        rss = shared = 0
        for proc in [self._root, *self._root.children(recursive=True)]:
            try:
                info = proc.memory_info()
            except psutil.Error:  # a process that ended between listing and reading
                continue
            rss += info.rss
            shared += getattr(info, "shared", 0)  # Linux; elsewhere all counts as private
        return rss / 2**20, (rss - shared) / 2**20

    def _run(self) -> None:
        while not self._stop.is_set():
            now, (rss, private) = time.perf_counter(), self._read()
            self.samples.append((now, rss))
            self.private.append((now, private))
            self._stop.wait(self._interval)

    def between(self, start: float, end: float) -> dict:
        """RSS first, peak, last and slope over [start, end], and the same of private memory."""
        def window(samples):
            return [s for s in samples if start <= s[0] <= end]
        private = memory_summary(window(self.private))
        return {**memory_summary(window(self.samples)),
                **{k.replace("rss_", "private_"): v for k, v in private.items()
                   if k != "num_samples"}}


def memory_summary(samples: list[tuple[float, float]]) -> dict:
    """First, peak and last MiB, and the least-squares slope in MiB per minute."""
    if not samples:
        return {"rss_first_mib": None, "rss_peak_mib": None, "rss_last_mib": None,
                "rss_slope_mib_per_min": None, "num_samples": 0}
    return {"rss_first_mib": samples[0][1], "rss_peak_mib": max(m for _, m in samples),
            "rss_last_mib": samples[-1][1], "rss_slope_mib_per_min": 60 * slope(samples),
            "num_samples": len(samples)}


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares dy/dx; 0 for fewer than two distinct x."""
    n = len(points)
    mx, my = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    return 0.0 if sxx == 0 else sum((x - mx) * (y - my) for x, y in points) / sxx


def phases(fleet, rate: float, factor: float, duration_s: float, recovery_s: float):
    """(overload requests, recovery requests): the second start when the first's end. Ids
    stay integers (they seed each prompt), the recovery's offset past the overload's."""
    hot = point_requests(fleet, rate * factor, duration_s)
    offset = 1 + max((int(r.request_id) for r in hot), default=0)
    calm = [dataclasses.replace(r, request_id=str(offset + int(r.request_id)),
                                arrival_s=r.arrival_s + duration_s)
            for r in point_requests(fleet, rate, recovery_s)]
    return hot, calm


def phase_report(records, slo_of, span_s: float) -> dict:
    """The phase over every request, and `accepted`: over the ones not shed."""
    accepted = [r for r in records if r.status != "shed"]
    out = serve_report.summarize_records(records, slo_of, span_s)
    out["shed_fraction"] = out["shed"] / len(records) if records else None
    out["accepted"] = serve_report.summarize_records(accepted, slo_of, span_s) \
        if accepted else None
    return out


def run(config: str, fleet, scheduler: str, rate: float, factor: float, duration_s: float,
        recovery_s: float, log_path: Path | None = None) -> dict:
    hot, calm = phases(fleet, rate, factor, duration_s, recovery_s)
    print(f"bench overload: {scheduler}, {len(hot)} requests at {rate * factor:g} req/s for "
          f"{duration_s:g} s, then {len(calm)} at {rate:g} req/s for {recovery_s:g} s",
          file=sys.stderr, flush=True)
    with served(config, scheduler, log_path) as server:
        facts = serve_bench.server_facts(server.url)
        warmup = serve_bench.warmup_requests(facts["models"], 2 * len(facts["models"]))
        target = serve_bench.Target(server.url)
        with MemorySampler(server.pid) as memory:
            idle_mib = memory.rss_mib()
            records, start = asyncio.run(_drive(target, warmup, hot + calm, fleet.bench.seed))
            end = time.perf_counter()
        after = _pool(server.url)
    slo_of = facts["slo"].__getitem__
    records_hot, records_calm = records[:len(hot)], records[len(hot):]
    return {
        "scheduler": scheduler, "sustainable_rate": rate, "factor": factor,
        "overload": {"rate": rate * factor, "duration_s": duration_s,
                     **phase_report(records_hot, slo_of, duration_s),
                     "memory": memory.between(start, start + duration_s)},
        "recovery": {"rate": rate, "duration_s": recovery_s,
                     **phase_report(records_calm, slo_of, recovery_s),
                     "memory": memory.between(start + duration_s, end)},
        "memory": {"rss_idle_mib": idle_mib, **memory.between(start, end)},
        "kv_pages_used_after": [w["kv_pages_used"] for w in after["workers"]],
        "switches": sum(w["switches"] for w in after["workers"]),
    }


async def _drive(target, warmup, requests, seed: int):
    client = target.client()
    try:
        await run_open_loop(client, warmup, seed)
        records, start, _ = await run_open_loop(client, requests, seed)
        return records, start
    finally:
        await client.close()


def _pool(url: str) -> dict:
    import httpx

    return httpx.get(url.rstrip("/") + "/pool", timeout=30.0).raise_for_status().json()


def table(result: dict) -> str:
    """A short text summary of both phases."""
    lines = []
    for name in ("overload", "recovery"):
        p, acc = result[name], result[name]["accepted"] or {}
        lines.append(f"{name:<9} {p['rate']:g} req/s: {p['num_requests']} offered, "
                     f"{p['shed']} shed ({p['shed_fraction']:.1%}), {p['failed']} failed; "
                     f"attainment of accepted {serve_report.fmt(acc.get('slo_attainment'))}, "
                     f"p99 TTFT {serve_report.fmt(acc.get('p99_ttft_ms'), 0)} ms; RSS peak "
                     f"{serve_report.fmt(p['memory']['rss_peak_mib'], 0)} MiB, slope "
                     f"{serve_report.fmt(p['memory']['rss_slope_mib_per_min'], 1)} MiB/min")
    lines.append(f"KV pages used after: {result['kv_pages_used_after']}")
    return "\n".join(lines) + "\n"

