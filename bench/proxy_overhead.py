"""`tokenpool bench proxy`: how long a token spends between its worker and the HTTP client.

For every streamed token: the worker stamps `TokenEvent.emitted_at` (time.monotonic() when
the engine step that made it ended); the client notes time.monotonic() when the SSE chunk
carrying it arrives. On Linux CLOCK_MONOTONIC is one clock for every process on the machine,
so the difference is the token's time in controller -> proxy -> uvicorn -> socket -> client.

The app is built with `expose_timing=True`, which adds the worker's stamp to each chunk as
`tokenpool_emitted_at` (off by default; nothing else changes). The server runs as
`tokenpool serve` would run it (uvicorn in this process, the local pool's worker threads
beside it); the client runs in a separate process so its parsing does not take the
server's interpreter lock.

Target (issue 5): median <= 5 ms.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import socket
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

TARGET_MEDIAN_MS = 5.0
PROMPT = "Write one sentence about the sea."


def run(fleet_path, num_requests: int = 32, json_out=None, *, concurrency: int = 4,
        max_tokens: int = 16, progress: bool = False) -> dict:
    """Serve the fleet, stream `num_requests` requests over its models (round robin,
    `concurrency` at a time), and report the per-token overhead; writes `json_out` if set."""
    from tokenpool.controller.stack import build_stack
    from tokenpool.fleet import load_fleet

    if num_requests < 1 or concurrency < 1 or max_tokens < 1:
        raise ValueError("num_requests, concurrency and max_tokens must be >= 1")
    fleet = load_fleet(fleet_path)
    stack = build_stack(fleet, progress=progress)
    try:
        models = [spec.id for spec in fleet.models]
        with _served(stack) as url:
            _stream_requests(url, models[:1], 1, 1, 2)  # warm-up: kernels, first switch
            delays, shed = _stream_requests(url, models, num_requests, concurrency,
                                            max_tokens)
    finally:
        stack.close()
    result = report(delays, num_requests=num_requests, concurrency=concurrency,
                    max_tokens=max_tokens, models=models, shed_and_retried=shed)
    if json_out is not None:
        from tokenpool.bench.report import write_json

        write_json(Path(json_out), result)
    return result


def report(delays_s: list[float], **facts) -> dict:
    from tokenpool.bench.report import cpu_info
    from tokenpool.sim.timelines import percentile

    ms = [d * 1e3 for d in delays_s]

    def pct(p: float) -> float | None:
        return percentile(ms, p)

    median = pct(50)
    return {
        "measured": "worker TokenEvent.emitted_at to SSE chunk arrival at a client in "
                    "another process (both time.monotonic)",
        "samples": len(ms),
        "median_ms": median, "p90_ms": pct(90), "p99_ms": pct(99),
        "max_ms": max(ms) if ms else None,
        "target_median_ms": TARGET_MEDIAN_MS,
        "meets_target": median is not None and median <= TARGET_MEDIAN_MS,
        **facts,
        "cpu": cpu_info(),
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


class _served:
    """The stack's HTTP app (with timing exposed) on a free loopback port, in a thread."""

    def __init__(self, stack):
        self.stack = stack

    def __enter__(self) -> str:
        import uvicorn

        from tokenpool.proxy.frontend import Frontend
        from tokenpool.proxy.http_app import create_app
        from tokenpool.proxy.metrics import ServingMetrics

        fleet, controller = self.stack.fleet, self.stack.controller
        metrics = ServingMetrics(controller, self.stack.catalog)
        frontend = Frontend(controller, self.stack.catalog, fleet.proxy, metrics)
        app = create_app(frontend, controller, fleet.proxy, metrics, expose_timing=True)
        self._socket = socket.socket()
        self._socket.bind(("127.0.0.1", 0))
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning",
                                                    access_log=False, lifespan="off"))
        self._thread = threading.Thread(target=self.server.run, args=([self._socket],),
                                        daemon=True)
        self._thread.start()
        while not self.server.started:
            if not self._thread.is_alive():
                raise RuntimeError("the HTTP server did not start")
            time.sleep(0.02)
        host, port = self._socket.getsockname()
        return f"http://{host}:{port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=30)
        self._socket.close()


def _stream_requests(url: str, models: list[str], num_requests: int, concurrency: int,
                     max_tokens: int) -> tuple[list[float], int]:
    """Runs the client in a fresh process; returns (per-token delays in s, 429s)."""
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:
        return pool.apply(_client_main, (url, models, num_requests, concurrency, max_tokens))


def _client_main(url, models, num_requests, concurrency, max_tokens):
    return asyncio.run(_client(url, models, num_requests, concurrency, max_tokens))


async def _client(url, models, num_requests, concurrency, max_tokens):
    import httpx

    tally = _Tally()
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        async def one(i: int) -> None:
            body = {"model": models[i % len(models)], "prompt": PROMPT, "stream": True,
                    "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True}
            async with gate:
                while not await _stream_one(client, body, tally):
                    pass

        await asyncio.gather(*(one(i) for i in range(num_requests)))
    return tally.delays, tally.shed


class _Tally:
    def __init__(self):
        self.delays: list[float] = []  # seconds, one per token chunk
        self.shed = 0  # 429s, each retried


async def _stream_one(client, body: dict, tally: _Tally) -> bool:
    """One streamed request; False if admission shed it (after waiting its Retry-After)."""
    async with client.stream("POST", "/v1/completions", json=body) as reply:
        if reply.status_code == 429:
            tally.shed += 1
            await asyncio.sleep(min(5.0, float(reply.headers["retry-after"])))
            return False
        reply.raise_for_status()
        async for line in reply.aiter_lines():
            arrived = time.monotonic()  # first, before any parsing
            emitted = _emitted_at(line)
            if emitted is not None:
                tally.delays.append(arrived - emitted)
    return True


def _emitted_at(line: str) -> float | None:
    """The worker's stamp of a token chunk (None for [DONE], usage or errors)."""
    if not line.startswith("data: {"):
        return None
    chunk = json.loads(line[len("data: "):])
    if "error" in chunk:
        raise RuntimeError(f"request failed: {chunk['error']['message']}")
    return chunk.get("tokenpool_emitted_at") if chunk.get("choices") else None


def main() -> None:  # python -m tokenpool.bench.proxy_overhead FLEET [N] [JSON]
    import sys

    args = sys.argv[1:]
    result = run(args[0], int(args[1]) if len(args) > 1 else 32,
                 args[2] if len(args) > 2 else None)
    print(json.dumps({k: result[k] for k in ("samples", "median_ms", "p90_ms", "p99_ms",
                                             "meets_target")}))


if __name__ == "__main__":
    main()
