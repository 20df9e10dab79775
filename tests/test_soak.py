"""Soak (DESIGN §7), under `-m slow`: ten minutes of mixed load on a fresh `tokenpool serve`
of the CPU bench fleet (8 models, 2 Ray workers): streamed HTTP, gRPC, and HTTP streams their
clients drop after a moment, together at 8 req/s, well under the sustainable 14. The server's
private resident memory (its whole process tree; bench/overload.py's MemorySampler says why
not all of RSS) must not trend upward once warm, and every KV page must come back at the
end. The measured slopes are printed (run with -s to see them).

TOKENPOOL_SOAK_S shortens the run, to try the test itself.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

import httpx
import pytest

from tokenpool.bench.load_client import GRPCClient, HTTPClient, run_open_loop
from tokenpool.bench.overload import MemorySampler, memory_summary, slope
from tokenpool.bench.sweep import point_requests, served
from tokenpool.fleet import load_fleet

CONFIG = Path(__file__).parent.parent / "configs" / "bench" / "cpu-8models.yaml"
SOAK_S = float(os.environ.get("TOKENPOOL_SOAK_S", 600))
RATE = 8.0  # req/s over the fleet, well under its sustainable 14 (docs/bench/serving.md)
SHARES = {"http": 0.6, "grpc": 0.3, "dropped": 0.1}
DROP_AFTER_S = 0.3  # a dropped stream's client gives up this long after sending
WARM_FRACTION = 0.2  # the first fifth grows caches and pools to their working size
MAX_SLOPE_MIB_PER_MIN = 5.0


async def _pages(url: str, every_s: float, until: float) -> list[tuple[float, int]]:
    samples = []
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        while time.perf_counter() < until:
            pool = (await client.get("/pool")).json()
            samples.append((time.perf_counter(), sum(w["kv_pages_used"]
                                                     for w in pool["workers"])))
            await asyncio.sleep(every_s)
    return samples


async def mixed_load(server, fleet, duration_s: float):
    loads = {kind: point_requests(fleet, RATE * share, duration_s) for kind, share in SHARES.items()}
    clients = {"http": HTTPClient(server.url), "grpc": GRPCClient(server.grpc),
               "dropped": HTTPClient(server.url, timeout_s=DROP_AFTER_S)}
    try:
        runs = [run_open_loop(clients[k], loads[k], seed=i) for i, k in enumerate(loads)]
        pages = _pages(server.url, 5.0, time.perf_counter() + duration_s)
        *results, page_samples = await asyncio.gather(*runs, pages)
    finally:
        for client in clients.values():
            await client.close()
    return dict(zip(loads, (records for records, _, _ in results))), page_samples


def _pages_when_idle(url: str, timeout_s: float = 120) -> int:
    deadline = time.monotonic() + timeout_s
    while True:
        pool = httpx.get(url + "/pool", timeout=30).json()
        used = sum(w["kv_pages_used"] for w in pool["workers"])
        if used == 0 or time.monotonic() > deadline:
            return used
        time.sleep(1)


@pytest.mark.slow
@pytest.mark.timeout(SOAK_S + 600)  # the load, plus the server's start and shutdown
def test_mixed_load_for_ten_minutes_leaves_memory_and_pages_flat():
    fleet = load_fleet(CONFIG)
    with served(str(CONFIG), "token-level") as server:
        with MemorySampler(server.pid, interval_s=2.0) as memory:
            start = time.perf_counter()
            records, page_samples = asyncio.run(mixed_load(server, fleet, SOAK_S))
            end = time.perf_counter()
        pages_after = _pages_when_idle(server.url)
    warm = start + WARM_FRACTION * (end - start)
    rss = memory.between(warm, end)
    statuses = {k: {s: sum(r.status == s for r in rs) for s in ("ok", "shed", "error")}
                for k, rs in records.items()}
    report = {"duration_s": end - start, "statuses": statuses, "rss": rss,
              "rss_whole_run": memory_summary(memory.samples),
              "kv_pages_slope_per_min": 60 * slope([p for p in page_samples if p[0] >= warm]),
              "kv_pages_peak": max(n for _, n in page_samples), "kv_pages_after": pages_after}
    print("soak:", json.dumps(report, indent=1))

    assert pages_after == 0
    assert statuses["http"]["error"] == 0 and statuses["grpc"]["error"] == 0
    assert statuses["http"]["ok"] > 0 and statuses["grpc"]["ok"] > 0
    assert statuses["dropped"]["error"] > 0  # the drops happened (a timeout is an error here)
    assert rss["num_samples"] >= 10
    assert rss["private_slope_mib_per_min"] < MAX_SLOPE_MIB_PER_MIN, report
