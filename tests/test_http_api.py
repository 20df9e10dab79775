"""The OpenAI-compatible HTTP edge against the real stack: SmolLM2 on two local workers,
a real uvicorn server, real HTTP, and the official `openai` client.

Generations are short (a few tokens): the CI machine has two shared cores. Requests that
must agree (streamed vs not) run concurrently, so they also share the workers' batches.
"""

from __future__ import annotations

import json
import logging
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import urlsplit

import pytest

# The shared session fixtures; registered before the import below, which also takes
# constants from it, so pytest can still rewrite its asserts.
pytest.register_assert_rewrite("serving_fixtures")
pytest_plugins = ["serving_fixtures"]

from prometheus_client.parser import text_string_to_metric_families

import tokenpool
from helpers import make_engine
from serving_fixtures import ALIASES, FLEET_IDS, MODEL, wait_until_idle
from tokenpool.models.prompts import encode_chat, encode_text
from tokenpool.sampling import SamplingParams

PROMPT = "The capital of France is"
CHAT = [{"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a primary color."}]
N = 6  # generated tokens per request
FIXED_LENGTH = {"extra_body": {"ignore_eos": True}}  # EOS cannot cut a comparison short
SAMPLINGS = {
    "greedy": dict(temperature=0.0),
    "seeded": dict(temperature=0.9, top_p=0.95, seed=1234,
                   extra_body={"ignore_eos": True, "top_k": 50}),
}


@dataclass
class Result:
    text: str
    finish_reason: str | None
    usage: tuple[int, int, int] | None
    chunks: int = 0


def _usage(u) -> tuple[int, int, int] | None:
    return None if u is None else (u.prompt_tokens, u.completion_tokens, u.total_tokens)


def generate(client, endpoint: str, stream: bool, model: str = MODEL, **kwargs) -> Result:
    """One request through the official client; streamed ones ask for the usage chunk."""
    kwargs = {"max_tokens": N, **FIXED_LENGTH, **kwargs}
    if stream:
        kwargs.update(stream=True, stream_options={"include_usage": True})
    if endpoint == "completions":
        reply = client.completions.create(model=model, prompt=PROMPT, **kwargs)
    else:
        reply = client.chat.completions.create(model=model, messages=CHAT, **kwargs)
    if not stream:
        choice = reply.choices[0]
        text = choice.text if endpoint == "completions" else choice.message.content
        return Result(text, choice.finish_reason, _usage(reply.usage))
    result = Result("", None, None)
    for chunk in reply:
        result.chunks += 1
        if chunk.usage is not None:
            result.usage = _usage(chunk.usage)
        for choice in chunk.choices:
            piece = choice.text if endpoint == "completions" else choice.delta.content
            result.text += piece or ""
            result.finish_reason = choice.finish_reason or result.finish_reason
    return result


@pytest.fixture(scope="module")
def reference(smollm2):
    """A standalone engine over the same checkpoint: what the pool must reproduce."""
    engine = make_engine(smollm2)

    def greedy(prompt_ids: list[int], n: int = N) -> str:
        params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
        return smollm2.tokenizer.decode(engine.generate([prompt_ids], params)[0])

    return greedy


def prompt_ids(tokenizer, endpoint: str) -> list[int]:
    return encode_text(tokenizer, PROMPT) if endpoint == "completions" else \
        encode_chat(tokenizer, CHAT)


def test_models_lists_every_fleet_id(client, serving_stack):
    models = client.models.list().data
    assert sorted(m.id for m in models) == sorted(FLEET_IDS)
    assert all(m.object == "model" and m.owned_by == "tokenpool" for m in models)


def test_health_and_version(http):
    health = http.get("/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert http.get("/version").json() == {"version": tokenpool.__version__}


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_greedy_text_equals_a_standalone_engine(client, reference, smollm2, endpoint):
    ids = prompt_ids(smollm2.tokenizer, endpoint)
    got = generate(client, endpoint, stream=False, model=ALIASES[0], temperature=0.0)
    assert got.text == reference(ids)
    assert got.finish_reason == "length"
    assert got.usage == (len(ids), N, len(ids) + N)


@pytest.mark.parametrize("sampling", SAMPLINGS)
@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_streamed_deltas_equal_the_whole_text(client, endpoint, sampling):
    kwargs = SAMPLINGS[sampling]
    with ThreadPoolExecutor(2) as pool:
        whole = pool.submit(generate, client, endpoint, False, **kwargs)
        streamed = pool.submit(generate, client, endpoint, True, **kwargs)
        whole, streamed = whole.result(), streamed.result()
    assert whole.text and streamed.text == whole.text
    assert streamed.chunks > 2  # deltas, not one lump
    assert streamed.finish_reason == whole.finish_reason == "length"
    assert streamed.usage == whole.usage and whole.usage[1] == N


def test_a_stop_string_ends_the_text_before_it(client, reference, smollm2):
    full = reference(encode_text(smollm2.tokenizer, PROMPT))
    words = full.split()
    stop = words[1] if len(words) > 1 else full[-1]
    expected = full[:full.index(stop)]
    with ThreadPoolExecutor(2) as pool:
        runs = [pool.submit(generate, client, "completions", s, temperature=0.0, stop=[stop])
                for s in (False, True)]
        whole, streamed = (r.result() for r in runs)
    for got in (whole, streamed):
        assert got.text == expected and got.finish_reason == "stop"
        assert 1 <= got.usage[1] <= N


def test_logprobs_for_completions_and_chat(client):
    reply = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4,
                                      temperature=0.0, logprobs=2, **FIXED_LENGTH)
    lp = reply.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert "".join(lp.tokens) == reply.choices[0].text
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert len(top) == 2 and chosen <= 0
        assert chosen == pytest.approx(max(top.values()), abs=1e-5)  # greedy took the best
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0

    chat = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4,
                                          temperature=0.0, logprobs=True, top_logprobs=3,
                                          **FIXED_LENGTH)
    content = chat.choices[0].logprobs.content
    assert len(content) == 4 and all(len(t.top_logprobs) == 3 for t in content)
    assert "".join(t.token for t in content) == chat.choices[0].message.content


def test_pool_shows_every_worker_and_model(http):
    pool = http.get("/pool").json()
    assert len(pool["workers"]) == 2
    for worker in pool["workers"]:
        assert {"id", "role", "device", "pid", "model", "state", "queued",
                "running", "decode_slowdown"} <= worker.keys()
        assert worker["decode_slowdown"] > 0  # measured turn time over the profile's
        assert worker["state"] in ("idle", "busy", "dead") and worker["device"] == "cpu"
        assert isinstance(worker["pid"], int) and worker["role"] == "prefill+decode"
    assert sorted(m["id"] for m in pool["models"]) == sorted(FLEET_IDS)
    for model in pool["models"]:
        assert {"id", "waiting", "running", "slo"} <= model.keys()
        assert model["slo"] == {"ttft_s": 600.0, "tbt_s": 60.0}


REQUIRED = {
    "tokenpool:time_to_first_token_seconds_count", "tokenpool:inter_token_latency_seconds_count",
    "tokenpool:e2e_request_latency_seconds_count", "tokenpool:model_switch_seconds_count",
    "tokenpool:prompt_tokens_total", "tokenpool:generation_tokens_total",
    "tokenpool:model_switches_total", "tokenpool:model_switch_bytes_total",
    "tokenpool:kv_swap_bytes_total",
    "tokenpool:request_success_total", "tokenpool:num_requests_running",
    "tokenpool:num_requests_waiting", "tokenpool:kv_cache_usage_perc",
    "tokenpool:slo_attainment",
}


def scrape(http) -> list:
    reply = http.get("/metrics")
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/plain")
    return [s for family in text_string_to_metric_families(reply.text) for s in family.samples]


def total(samples, name: str, **labels) -> float:
    return sum(s.value for s in samples if s.name == name
               and all(s.labels.get(k) == v for k, v in labels.items()))


def test_metrics_expose_the_required_names_and_move(http, client, caplog):
    model = ALIASES[1]
    before = scrape(http)
    marker = "zebra-quartz-marker"
    caplog.set_level(logging.DEBUG)
    reply = client.completions.create(model=model, prompt=f"{PROMPT} {marker}", max_tokens=3,
                                      temperature=0.0, **FIXED_LENGTH)
    after = scrape(http)
    assert marker not in caplog.text  # prompts never reach the logs

    assert REQUIRED <= {s.name for s in after}
    assert all(s.labels.get("model_name") for s in after), "a series without model_name"
    for name in ("tokenpool:num_requests_running", "tokenpool:num_requests_waiting"):
        assert {s.labels["model_name"] for s in after if s.name == name} == set(FLEET_IDS)

    def moved(name: str, **labels) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    assert moved("tokenpool:prompt_tokens_total", model_name=model) == reply.usage.prompt_tokens
    assert moved("tokenpool:generation_tokens_total", model_name=model) == 3
    assert moved("tokenpool:time_to_first_token_seconds_count", model_name=model) == 1
    assert moved("tokenpool:inter_token_latency_seconds_count", model_name=model) == 2
    assert moved("tokenpool:e2e_request_latency_seconds_count", model_name=model) == 1
    assert moved("tokenpool:request_success_total", model_name=model,
                 finished_reason="length") == 1
    # Some worker switched to some model by now, and the histogram got its durations.
    assert total(after, "tokenpool:model_switches_total") >= 1
    assert total(after, "tokenpool:model_switch_seconds_count") == \
        total(after, "tokenpool:model_switches_total")
    # ...and copied its weights, unless it had them prefetched: /pool says the same
    pool = {m["id"]: m for m in http.get("/pool").json()["models"]}
    for model_id, m in pool.items():
        assert total(after, "tokenpool:model_switch_bytes_total", model_name=model_id) <= \
            m["switch_bytes"]
    assert sum(m["switch_bytes"] for m in pool.values()) > 0
    attainment = total(after, "tokenpool:slo_attainment", model_name=model)
    assert 0.0 <= attainment <= 1.0


def _raw_post(url: str, body: dict) -> socket.socket:
    """A request over a plain socket, so the test decides when the connection drops."""
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port))
    payload = json.dumps(body).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\n"
                 b"Content-Type: application/json\r\n"
                 + f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
    return sock


def _wait_for(predicate, timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "whole"])
def test_a_client_disconnect_cancels_and_frees_the_kv_pages(server, serving_stack,
                                                            serving_metrics, stream):
    controller = serving_stack.controller
    wait_until_idle(controller)
    cancelled = controller.snapshot().as_json()["cancelled"]
    # Long enough that only a cancel ends it within the wait below.
    sock = _raw_post(server.url, {"model": MODEL, "prompt": PROMPT, "max_tokens": 1000,
                                  "temperature": 0.0, "ignore_eos": True, "stream": stream})
    try:
        if stream:
            received = b""
            while b"data: {" not in received:  # the first token's chunk is out
                chunk = sock.recv(65536)
                assert chunk, "server closed the stream"
                received += chunk
        else:
            _wait_for(lambda: any(m["id"] == MODEL and m["running"] >= 1
                                  for m in controller.snapshot().as_json()["models"]))
    finally:
        sock.close()
    snap = wait_until_idle(controller, timeout_s=240)
    assert snap["cancelled"] == cancelled + 1
    assert [w["kv_pages_used"] for w in snap["workers"]] == [0, 0]
    assert serving_metrics.num_live == 0
