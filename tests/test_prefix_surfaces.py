"""Prefix caching's binding surfaces (DESIGN §6, issue 25): OpenAI's
`usage.prompt_tokens_details.cached_tokens`, gRPC's `Usage.cached_tokens`, the
`tokenpool:prefix_cache_{queries,hits}_total` counters and `GET /pool`'s `cached_pages`.

The first half feeds the edge real events and job ends, no engine involved: the plumbing from
RequestOutput to each surface. The second half runs a real stack (a tiny synthetic model on
one worker, so both requests of a pair meet the same cache) behind real HTTP and the official
client, with prefix caching on, and once with it off.
"""

from __future__ import annotations

import asyncio
import json
import time
from contextlib import contextmanager

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from serving_fixtures import stack_over_http, wait_until_idle
from tokenpool.controller.pool_stats import PoolStats
from tokenpool.controller.serving_types import ServeRequest, TokenEvent
from tokenpool.gpu_pool.pool import WorkerInfo
from tokenpool.gpu_pool.protocol import JobDone, RequestOutput
from tokenpool.proxy.config import ProxyConfig
from tokenpool.proxy.frontend import Frontend
from tokenpool.proxy.http_stream import Outcome, sse_chunks
from tokenpool.proxy.metrics import ServingMetrics
from tokenpool.proxy.openai_format import ChatFormat, CompletionFormat
from tokenpool.sampling import SamplingParams
from tokenpool.schedulers.types import SLO

PAGE = 16  # tokens per KV page
SLOS = {"m": SLO(600.0, 60.0), "other": SLO(600.0, 60.0)}


def output(tokens=(7,), cached=48, finished=False) -> RequestOutput:
    return RequestOutput("r", tokens, "x" * len(tokens), finished,
                         "stop" if finished else None, num_prompt_tokens=100,
                         num_output_tokens=1, num_cached_tokens=cached)


# -- the plumbing, without an engine ----------------------------------------------------------


def test_events_carry_the_first_token_events_cached_tokens():
    first = TokenEvent.of(output(cached=48), emitted_at=1.0)
    readmitted = TokenEvent.of(output(cached=0, finished=True), emitted_at=2.0)
    assert first.num_cached_tokens == 48
    assert first.followed_by(readmitted).num_cached_tokens == 48
    tokenless = TokenEvent("r", num_cached_tokens=0)  # no token yet: the later one decides
    assert tokenless.followed_by(first).num_cached_tokens == 48


@pytest.mark.parametrize("fmt_type", [CompletionFormat, ChatFormat])
def test_whole_response_usage_has_openais_shape(fmt_type):
    openai_types = pytest.importorskip("openai.types")
    outcome = Outcome(prompt_tokens=100)
    outcome.add(TokenEvent.of(output(cached=48), 1.0))
    outcome.add(TokenEvent.of(output(cached=0, finished=True), 2.0))  # a re-admission's count
    usage = fmt_type("id", "m", None, False, False, False).whole(outcome)["usage"]
    assert usage == {"prompt_tokens": 100, "completion_tokens": 2, "total_tokens": 102,
                     "prompt_tokens_details": {"cached_tokens": 48}}
    parsed = openai_types.CompletionUsage.model_validate(usage)  # the client's own type
    assert parsed.prompt_tokens_details.cached_tokens == 48


async def _events(*events):
    for event in events:
        yield event


def stream_chunks(fmt_type, include_usage: bool) -> list[str]:
    fmt = fmt_type("id", "m", None, False, include_usage, False)
    first = TokenEvent.of(output(cached=48), 1.0)
    rest = _events(TokenEvent.of(output(cached=48, finished=True), 2.0))

    async def run():
        return [c.decode() async for c in sse_chunks(fmt, first, rest, 100, include_usage)]
    return asyncio.run(run())


@pytest.mark.parametrize("fmt_type", [CompletionFormat, ChatFormat])
def test_stream_reports_cached_tokens_in_the_final_usage_chunk_only(fmt_type):
    chunks = stream_chunks(fmt_type, include_usage=True)
    assert chunks[-1] == "data: [DONE]\n\n"
    bodies = [json.loads(c[len("data: "):]) for c in chunks[:-1]]
    assert all(b["usage"] is None for b in bodies[:-1])
    assert bodies[-1]["choices"] == []
    assert bodies[-1]["usage"]["prompt_tokens_details"] == {"cached_tokens": 48}
    assert not any("cached_tokens" in c for c in stream_chunks(fmt_type, include_usage=False))


def test_grpc_usage_carries_cached_tokens():
    from tokenpool.proxy.grpc_server import response_of

    assert response_of(TokenEvent.of(output(cached=48), 1.0)).usage.cached_tokens == 48


class ScriptedController:
    """The controller's edge-facing side, replaying one request's events: the edge is what is
    under test here, and the real pool's snapshot backs /metrics' pool series."""

    def __init__(self, *events: TokenEvent):
        self.events = events
        self.stats = PoolStats(num_workers=0, slos=SLOS)

    def submit(self, req, sink) -> None:
        # Apart, so the edge does not merge them (as it does events that queued up).
        loop = asyncio.get_running_loop()
        for i, event in enumerate(self.events):
            loop.call_later(0.01 * i, sink, event)

    def cancel(self, request_id: str) -> None:
        pass

    def snapshot(self):
        return self.stats.snapshot([], {}, (), lambda worker: None)


def exported(metrics: ServingMetrics, name: str) -> dict[str, float]:
    text = generate_latest(metrics.registry).decode()
    return {s.labels["model_name"]: s.value for f in text_string_to_metric_families(text)
            for s in f.samples if s.name == name}


def test_edge_bills_the_first_value_and_counts_it_once_per_request():
    # A preemption after the first token re-admits the request: the engine's later outputs
    # report that admission's hits, but the client is billed, and the counters fed, once.
    events = (TokenEvent.of(output(cached=48), 1.0), TokenEvent.of(output(cached=96), 2.0),
              TokenEvent.of(output(cached=0, finished=True), 3.0))
    controller = ScriptedController(*events)
    metrics = ServingMetrics(controller)
    frontend = Frontend(controller, {}, ProxyConfig(), observer=metrics)
    req = ServeRequest("r", "m", tuple(range(100)), SamplingParams(max_tokens=3), SLOS["m"],
                       time.monotonic())

    async def run():
        return [e async for e in frontend.stream(req)]
    assert [e.num_cached_tokens for e in asyncio.run(run())] == [48, 48, 48]
    assert exported(metrics, "tokenpool:prefix_cache_queries_total") == {"m": 100}
    assert exported(metrics, "tokenpool:prefix_cache_hits_total") == {"m": 48}


def test_pool_lists_cached_pages_per_worker_and_per_model():
    stats = PoolStats(num_workers=2, slos=SLOS)
    infos = [WorkerInfo(i, "prefill+decode", "cpu", pid=100 + i) for i in range(2)]

    def pool() -> tuple[list, dict]:
        body = stats.snapshot(infos, {}, (), lambda worker: None).as_json()
        return ([w["cached_pages"] for w in body["workers"]],
                {m["id"]: m["cached_pages"] for m in body["models"]})

    stats.job_done(JobDone(worker=0, results=(), model="m", cached_pages={"m": 3}))
    stats.job_done(JobDone(worker=1, results=(), model="other",
                           cached_pages={"m": 2, "other": 5}))
    assert pool() == ([{"m": 3}, {"m": 2, "other": 5}], {"m": 5, "other": 5})
    stats.job_done(JobDone(worker=0, results=(), model="m"))  # the job left nothing cached
    stats.worker_lost(1)  # and a dead worker's cache is gone with it
    assert pool() == ([{}, {}], {"m": 0, "other": 0})


# -- end to end, over a real stack ----------------------------------------------------------

MODEL = "tiny"
# About 65 tokens (a few more with a tag in front): four full pages for two requests of the
# same prompt to share.
LONG_TEXT = ("The harbour master counted the boats at dawn, wrote each name in a ledger, "
             "and walked the length of the pier twice before the fog lifted from the water. "
             "By noon the fishermen had mended their nets, traded stories about the storm, "
             "and argued over who would sail first when the tide turned in the evening.")


def write_fleet(root, prefix_caching: bool):
    from tokenpool.models import write_synthetic_checkpoint

    checkpoint = root / "ckpt"
    if not checkpoint.exists():
        write_synthetic_checkpoint(checkpoint, num_layers=2, hidden_size=64, num_heads=4,
                                   num_kv_heads=2)
    cache_dir = root / f"cache-{prefix_caching}"  # its own: the two stacks may be up at once
    cache_dir.mkdir(exist_ok=True)
    path = root / f"fleet-{prefix_caching}.yaml"
    path.write_text(
        f"models:\n  - {{id: {MODEL}, source: {checkpoint}}}\n"
        f"engine: {{dtype: float32, kv_cache_bytes: 16MiB, "
        f"prefix_caching: {str(prefix_caching).lower()}}}\n"
        f"memory: {{slab_bytes: 1MiB, swap_bytes: 16MiB, host_cache_dir: {cache_dir}}}\n"
        "pool: {backend: local, num_workers: 1}\n"
        "slo: {ttft_s: 600, tbt_s: 60}\n"
        "scheduler: {max_alpha: 1000, shed_ttft_factor: 1000}\n")
    return path


@pytest.fixture(scope="module")
def fleet_root(tmp_path_factory):
    return tmp_path_factory.mktemp("prefix")


@contextmanager
def served(root, prefix_caching: bool):
    """(stack, official client, httpx client) over a one-worker stack."""
    import httpx
    openai = pytest.importorskip("openai")

    with stack_over_http(write_fleet(root, prefix_caching)) as (stack, live), \
            openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0,
                          timeout=120) as client, \
            httpx.Client(base_url=live.url, timeout=120) as http:
        yield stack, client, http


@pytest.fixture(scope="module")
def cached_server(fleet_root):
    with served(fleet_root, prefix_caching=True) as parts:
        yield parts


def ask(client, tag: str, chat: bool, stream: bool):
    """One greedy request of LONG_TEXT (after `tag`); returns its usage."""
    kwargs = dict(model=MODEL, max_tokens=2, temperature=0.0)
    if stream:
        kwargs.update(stream=True, stream_options={"include_usage": True})
    if chat:
        reply = client.chat.completions.create(
            messages=[{"role": "user", "content": f"{tag}. {LONG_TEXT}"}], **kwargs)
    else:
        reply = client.completions.create(prompt=f"{tag}. {LONG_TEXT}", **kwargs)
    if not stream:
        return reply.usage
    usages = [chunk.usage for chunk in reply if chunk.usage is not None]
    assert len(usages) == 1, "one usage chunk, the last"
    return usages[0]


def cached_of(usage) -> int:
    return usage.prompt_tokens_details.cached_tokens


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_a_repeated_prompt_is_billed_as_cached(cached_server, chat, stream):
    _, client, _ = cached_server
    tag = f"{'chat' if chat else 'text'} {'stream' if stream else 'whole'}"
    first, second = (ask(client, tag, chat, stream) for _ in range(2))
    assert first.prompt_tokens == second.prompt_tokens >= 3 * PAGE + 1
    cached = cached_of(second)  # the shared prefix is three full pages at least
    assert cached >= 3 * PAGE, "too few cached tokens: does the engine report them?"
    assert cached % PAGE == 0 and cached < second.prompt_tokens


def test_grpc_usage_reports_the_cached_prefix(cached_server):
    from grpc_fixtures import EdgeLoop, start_edge, stop_edge
    from tokenpool.proxy.grpc_codegen import pb2, pb2_grpc

    loop = EdgeLoop()
    edge = start_edge(loop, cached_server[0], ProxyConfig())
    request = pb2.GenerateRequest(model=MODEL, prompt=f"grpc. {LONG_TEXT}", max_tokens=2,
                                  temperature=0.0)
    try:
        with edge.channel() as channel:
            stub = pb2_grpc.GenerationStub(channel)
            _, second = (list(stub.Generate(request, timeout=120)) for _ in range(2))
    finally:
        stop_edge(loop, edge)
        loop.close()
    cached = {r.usage.cached_tokens for r in second}
    assert len(cached) == 1, "the same on every response"
    assert 0 < min(cached) < second[-1].usage.prompt_tokens and min(cached) % PAGE == 0


def scrape(http, name: str) -> float:
    text = http.get("/metrics").text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == name and s.labels.get("model_name") == MODEL)


def test_metrics_count_prompt_tokens_queried_and_cached(cached_server):
    _, client, http = cached_server
    names = ("tokenpool:prefix_cache_queries_total", "tokenpool:prefix_cache_hits_total")
    before = [scrape(http, n) for n in names]
    usages = [ask(client, "metrics", chat=False, stream=False) for _ in range(2)]
    queries, hits = (scrape(http, n) - b for n, b in zip(names, before))
    assert queries == sum(u.prompt_tokens for u in usages)
    assert hits == sum(cached_of(u) for u in usages)
    assert hits > 0, "no hits: does the engine report num_cached_tokens?"


def test_pool_shows_the_workers_cached_pages(cached_server):
    stack, client, http = cached_server
    ask(client, "pool", chat=False, stream=False)
    wait_until_idle(stack.controller, timeout_s=60)  # so its last job's end is counted
    pool = http.get("/pool").json()
    per_worker = [w["cached_pages"].get(MODEL, 0) for w in pool["workers"]]
    total = {m["id"]: m["cached_pages"] for m in pool["models"]}[MODEL]
    assert total == sum(per_worker)
    assert total >= 3, "no cached pages: does the engine report JobDone.cached_pages?"


def test_prefix_caching_off_bills_nothing_cached(fleet_root):
    with served(fleet_root, prefix_caching=False) as (stack, client, http):
        usages = [ask(client, "off", chat=False, stream=s) for s in (False, True)]
        assert [cached_of(u) for u in usages] == [0, 0]
        assert scrape(http, "tokenpool:prefix_cache_hits_total") == 0
        assert scrape(http, "tokenpool:prefix_cache_queries_total") == \
            sum(u.prompt_tokens for u in usages)
        wait_until_idle(stack.controller, timeout_s=60)
        pool = http.get("/pool").json()
        assert all(not any(w["cached_pages"].values()) for w in pool["workers"])
