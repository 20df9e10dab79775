"""An open-loop client for `tokenpool bench serve`: every request is sent at its arrival time,
whatever happened to the ones before it, and streamed; the client notes when each token
arrives.

HTTP asks for vLLM's `continuous_usage_stats`, so every SSE chunk says how many tokens have
been generated so far: a chunk that carries two tokens (text held back by the detokenizer)
counts as two tokens arriving at that moment. gRPC responses carry their token ids.

Prompts are random token ids (fixed by the seed and the request id), sent as `prompt_ids`
with `ignore_eos` and greedy decoding, so each request generates exactly its output length.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

import numpy as np

from tokenpool.sim.workload import WorkloadRequest

PROMPT_ID_RANGE = (256, 16384)  # ordinary tokens of any fleet vocabulary we ship
SHED_STATUSES = (429, 503)


@dataclass(slots=True)
class RequestRecord:
    """What the client saw of one request. Times are seconds since the run started."""

    request: WorkloadRequest
    sent_s: float = 0.0
    chunks: list[tuple[float, int]] = field(default_factory=list)  # (arrival, new tokens)
    status: str = "pending"  # ok | shed | error
    error: str | None = None

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.chunks)

    def add_tokens(self, total_so_far: int) -> None:
        new = total_so_far - self.num_tokens
        if new > 0:
            self.chunks.append((time.perf_counter(), new))


def prompt_ids(req: WorkloadRequest, seed: int) -> list[int]:
    rng = np.random.default_rng([seed, int(req.request_id)])
    return rng.integers(*PROMPT_ID_RANGE, size=req.prompt_len).tolist()


class HTTPClient:
    """Streams `/v1/completions` through one pooled httpx client."""

    def __init__(self, url: str, api_key: str | None = None, timeout_s: float = 600.0):
        import httpx

        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.AsyncClient(
            base_url=url.rstrip("/"), headers=headers,
            timeout=httpx.Timeout(timeout_s, connect=30.0),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))

    async def send(self, record: RequestRecord, ids: list[int]) -> None:
        req = record.request
        body = {"model": req.model, "prompt": ids, "max_tokens": req.output_len,
                "temperature": 0, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
        async with self._client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                record.status = "shed" if response.status_code in SHED_STATUSES else "error"
                record.error = f"HTTP {response.status_code}: {text[:200]}"
                return
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    record.status, record.error = "error", chunk["error"].get("message")
                    return
                if chunk.get("usage"):
                    record.add_tokens(chunk["usage"]["completion_tokens"])
        record.status = "ok"

    async def close(self) -> None:
        await self._client.aclose()


class GRPCClient:
    """Streams `tokenpool.v1.Generation/Generate` over one channel."""

    def __init__(self, target: str, api_key: str | None = None):
        import grpc

        from tokenpool.proxy.grpc_codegen import pb2, pb2_grpc

        self._grpc = grpc
        self._pb, stubs = pb2, pb2_grpc
        self._channel = grpc.aio.insecure_channel(target.removeprefix("grpc://"))
        self._stub = stubs.GenerationStub(self._channel)
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()

    async def send(self, record: RequestRecord, ids: list[int]) -> None:
        req = record.request
        message = self._pb.GenerateRequest(
            model=req.model, prompt_ids=self._pb.TokenIds(ids=ids), max_tokens=req.output_len,
            temperature=0.0, ignore_eos=True)
        try:
            async for response in self._stub.Generate(message, metadata=self._metadata):
                if response.token_ids:
                    record.add_tokens(record.num_tokens + len(response.token_ids))
        except self._grpc.aio.AioRpcError as exc:
            shed = exc.code() == self._grpc.StatusCode.RESOURCE_EXHAUSTED
            record.status = "shed" if shed else "error"
            record.error = f"{exc.code().name}: {exc.details()}"
            return
        record.status = "ok"

    async def close(self) -> None:
        await self._channel.close()


async def run_open_loop(client, requests: list[WorkloadRequest], seed: int,
                        progress=None) -> tuple[list[RequestRecord], float, float]:
    """Send every request at its arrival time and wait for all of them.

    Returns the records (token times relative to the start), and the start and end of the
    run in perf_counter seconds.
    """
    records = [RequestRecord(r) for r in requests]
    start = time.perf_counter()

    async def one(record: RequestRecord) -> None:
        ids = prompt_ids(record.request, seed)
        delay = start + record.request.arrival_s - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        record.sent_s = time.perf_counter() - start
        try:
            await client.send(record, ids)
        except Exception as exc:  # a broken connection is this request's error, not the run's
            record.status, record.error = "error", f"{type(exc).__name__}: {exc}"
        if progress is not None:
            progress(record)

    await asyncio.gather(*(one(r) for r in records))
    end = time.perf_counter()
    for record in records:
        record.chunks = [(t - start, n) for t, n in record.chunks]
    return records, start, end


def list_models_grpc(target: str, api_key: str | None = None) -> dict[str, tuple[float, float]]:
    """The server's model ids and their (TTFT, TBT) SLOs over gRPC `ListModels`."""
    import grpc

    from tokenpool.proxy.grpc_codegen import pb2, pb2_grpc

    metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
    with grpc.insecure_channel(target.removeprefix("grpc://")) as channel:
        reply = pb2_grpc.GenerationStub(channel).ListModels(pb2.ListModelsRequest(),
                                                             metadata=metadata, timeout=30)
    return {m.id: (m.ttft_slo_s, m.tbt_slo_s) for m in reply.models}
