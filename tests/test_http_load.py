"""Load through the whole edge: 300 concurrent streamed requests over six models (SmolLM2
and five aliases, each its own model to the pool) on two workers, real HTTP.

Every request must end exactly once with `[DONE]`, its streamed text must equal the greedy
text a standalone engine gives for its prompt (nothing lost, duplicated or reordered), and
the workers' KV pages must be back at zero afterwards.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from serving_fixtures import fleet_yaml, stack_over_http, wait_until_idle

MODELS = ("smollm2-135m-instruct", *(f"smollm2-load-{i}" for i in range(5)))
PROMPTS = ("The sea is", "My favourite colour is", "Paris is the capital of",
           "One, two, three,", "The best way to learn is", "Once upon a time")
MAX_TOKENS = 4
NUM_REQUESTS = 300


@pytest.fixture(scope="module")
def load_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("load")
    (root / "fleet.yaml").write_text(fleet_yaml(root, MODELS).replace(
        "scheduler: {", "scheduler: {max_waiting: 4096, "))
    with stack_over_http(root / "fleet.yaml") as served:
        yield served


@pytest.fixture(scope="module")
def expected(smollm2):
    from helpers import make_engine
    from tokenpool.models.prompts import encode_text
    from tokenpool.sampling import SamplingParams

    engine = make_engine(smollm2)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    outs = engine.generate([encode_text(smollm2.tokenizer, p) for p in PROMPTS], params)
    return {p: smollm2.tokenizer.decode(o) for p, o in zip(PROMPTS, outs)}


async def stream_one(client, i: int) -> tuple[str, list[str], int]:
    """(prompt, streamed pieces, number of [DONE] lines) of request i."""
    prompt = PROMPTS[i % len(PROMPTS)]
    body = {"model": MODELS[i % len(MODELS)], "prompt": prompt, "max_tokens": MAX_TOKENS,
            "temperature": 0, "ignore_eos": True, "stream": True}
    pieces, done = [], 0
    async with client.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200, await response.aread()
        async for line in response.aiter_lines():
            if line == "data: [DONE]":
                done += 1
            elif line.startswith("data: "):
                chunk = json.loads(line[len("data: "):])
                assert "error" not in chunk, chunk
                pieces.append(chunk["choices"][0]["text"])
    return prompt, pieces, done


async def stream_all(url: str):
    import httpx

    limits = httpx.Limits(max_connections=NUM_REQUESTS)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        return await asyncio.gather(*(stream_one(client, i) for i in range(NUM_REQUESTS)))


def test_300_concurrent_streams_over_six_models_lose_nothing(load_server, expected):
    stack, live = load_server
    results = asyncio.run(asyncio.wait_for(stream_all(live.url), timeout=900))
    assert len(results) == NUM_REQUESTS
    for prompt, pieces, done in results:
        assert done == 1
        assert "".join(pieces) == expected[prompt]
    snap = wait_until_idle(stack.controller)
    assert all(w["kv_pages_used"] == 0 for w in snap["workers"])
    assert snap["loop_errors"] == 0 and snap["cancelled"] == 0
    served = {m["id"] for m in snap["models"] if m["switches"]}
    assert served == set(MODELS)
