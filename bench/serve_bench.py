"""`tokenpool bench serve`: an open-loop load against a running server, reported as JSON.

The run is bounded: the workload's arrivals stop at `duration_s`, and the run ends when the
last request has finished (or failed). Before it, `warmup` requests (not reported) take the
first-use costs: kernel compilation, the first switch of each worker.
"""

from __future__ import annotations

import asyncio
import sys
from dataclasses import dataclass
from datetime import datetime, timezone

from tokenpool.bench import serve_report
from tokenpool.bench.load_client import GRPCClient, HTTPClient, run_open_loop
from tokenpool.sim.workload import WorkloadRequest
from tokenpool.schedulers.types import SLO


@dataclass(frozen=True, slots=True)
class Target:
    """Where the load goes: an HTTP base URL, or a gRPC host:port with `grpc`."""

    url: str
    grpc: bool = False
    api_key: str | None = None

    def client(self):
        if self.grpc:
            return GRPCClient(self.url, self.api_key)
        return HTTPClient(self.url, self.api_key)


def server_facts(url: str, api_key: str | None = None) -> dict:
    """The server's model ids, SLOs and switch counters (`GET /pool`, `GET /v1/models`)."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=30.0) as client:
        pool = client.get("/pool").raise_for_status().json()
        models = client.get("/v1/models").raise_for_status().json()
    return {"models": [m["id"] for m in models["data"]],
            "slo": {m["id"]: SLO(m["slo"]["ttft_s"], m["slo"]["tbt_s"]) for m in pool["models"]},
            "switches": sum(w["switches"] for w in pool["workers"]),
            "workers": len(pool["workers"]),
            "decode_step_ratio": pool.get("decode_step_ratio")}


def run(target: Target, requests: list[WorkloadRequest], slo_of, *, seed: int = 0,
        warmup: list[WorkloadRequest] = (), progress: bool = True, **facts) -> dict:
    """Run the load and return the report (bench/serve_report.py)."""
    if not requests:
        raise ValueError("the workload has no requests in the chosen window")
    records, start, end = asyncio.run(_drive(target, requests, list(warmup), seed, progress))
    last = max((r.chunks[-1][0] for r in records if r.chunks), default=end - start)
    duration = max(last, requests[-1].arrival_s, 1e-9)
    return serve_report.bench_report(
        records, slo_of, duration, **facts, backend="grpc" if target.grpc else "http",
        seed=seed, timestamp=datetime.now(timezone.utc).isoformat(timespec="seconds"))


async def _drive(target: Target, requests, warmup, seed: int, progress: bool):
    client = target.client()
    try:
        if warmup:
            await run_open_loop(client, warmup, seed)
        return await run_open_loop(client, requests, seed,
                                   _Progress(len(requests)) if progress else None)
    finally:
        await client.close()


class _Progress:
    """One stderr line per tenth of the requests done."""

    def __init__(self, total: int):
        self.total, self.done, self.bad = total, 0, 0

    def __call__(self, record) -> None:
        self.done += 1
        self.bad += record.status != "ok"
        if self.done == self.total or self.done % max(1, self.total // 10) == 0:
            print(f"bench serve: {self.done}/{self.total} requests done "
                  f"({self.bad} shed or failed)", file=sys.stderr, flush=True)


def warmup_requests(model_ids: list[str], count: int) -> list[WorkloadRequest]:
    """Short requests spread over the models, all sent at once."""
    return [WorkloadRequest(str(10**6 + i), model_ids[i % len(model_ids)], 0.0, 16, 4)
            for i in range(count)]


def plot(result: dict, path) -> None:
    """TTFT and TPOT per model: where each model's requests sat against its SLO."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(result["per_model"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, slo_key, label in ((axes[0], "ttft", "ttft_s", "TTFT (s)"),
                                    (axes[1], "tpot", "tbt_s", "TPOT (s)")):
        per = [result["per_model"][m] for m in models]
        for stat, marker in (("median", "o"), ("p99", "^")):
            values = [(p[f"{stat}_{key}_ms"] or 0) / 1e3 for p in per]
            ax.plot(range(len(models)), values, marker, label=stat)
        slos = [result["slo"][m][slo_key] for m in models]
        ax.plot(range(len(models)), slos, "k_", markersize=20, label="SLO")
        ax.set_xticks(range(len(models)), models, rotation=45, ha="right")
        ax.set_ylabel(label)
        ax.legend()
    fig.suptitle(f"{result.get('scheduler', '')} attainment {result['slo_attainment']:.3f}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
