"""End to end on real Ray: `tokenpool serve`'s stack with `pool.backend: ray`, the real model,
the official openai client over real HTTP.

Two worker actors (separate processes) serve SmolLM2 and two aliases of it. A greedy
completion through the whole path (HTTP -> frontend -> controller -> Ray actor -> streamed
back) must equal a standalone engine's, streamed or not, and the pages must come back.
"""

from __future__ import annotations

import os

import pytest

from serving_fixtures import FLEET_IDS, MODEL, fleet_yaml, stack_over_http, wait_until_idle

PROMPT = "The three primary colours are"


@pytest.fixture(scope="module")
def ray_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-ray")
    text = fleet_yaml(root).replace("backend: local", "backend: ray, object_store_bytes: 128MiB")
    (root / "fleet.yaml").write_text(text)
    with stack_over_http(root / "fleet.yaml") as served:
        yield served


@pytest.fixture(scope="module")
def expected_text(smollm2):
    from helpers import make_engine
    from tokenpool.models.prompts import encode_text
    from tokenpool.sampling import SamplingParams

    ids = encode_text(smollm2.tokenizer, PROMPT)
    out = make_engine(smollm2).generate([ids], SamplingParams(max_tokens=12, temperature=0.0,
                                                              ignore_eos=True))[0]
    return smollm2.tokenizer.decode(out)


def test_ray_workers_are_separate_actor_processes(ray_server):
    stack, _ = ray_server
    infos = stack.controller.pool.workers()
    assert len(infos) == 2 and all(info.alive for info in infos)
    assert len({info.pid for info in infos} | {os.getpid()}) == 3


def test_completions_through_ray_actors_equal_a_standalone_engine(ray_server, expected_text):
    openai = pytest.importorskip("openai")
    stack, live = ray_server
    with openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0,
                       timeout=600) as client:
        for model in FLEET_IDS:  # every alias is its own model: switches between them
            reply = client.completions.create(model=model, prompt=PROMPT, max_tokens=12,
                                              temperature=0, extra_body={"ignore_eos": True})
            assert reply.choices[0].text == expected_text, model
        streamed = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12,
                                             temperature=0, stream=True,
                                             extra_body={"ignore_eos": True})
        assert "".join(chunk.choices[0].text for chunk in streamed) == expected_text
    snap = wait_until_idle(stack.controller)
    assert all(w["kv_pages_used"] == 0 for w in snap["workers"])
    assert sum(m["switches"] for m in snap["models"]) >= len(FLEET_IDS)
