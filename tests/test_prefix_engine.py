"""Prefix caching and chunked prefill in the engine and across a worker's switches.

The yardstick is always the same engine with the feature off: greedy and seeded tokens must
be equal, whatever was cached, chunked, preempted or evicted on the way.
"""

from __future__ import annotations

import pytest

from tokenpool.gpu_pool.worker import Worker
from tokenpool.sampling import SamplingParams
from helpers import make_engine, random_prompts, worker_over

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.95, seed=7, ignore_eos=True)
BASE = random_prompts([100], seed=1)[0]
OTHER = BASE[:64] + random_prompts([40], seed=2)[0]  # shares 4 full pages with BASE


def run(engine, prompts, params=GREEDY, steps: list | None = None):
    """Each prompt to completion, one after another: (tokens, cached tokens) each."""
    results = []
    for prompt in prompts:
        engine.add_request(prompt, params)
        tokens, cached = [], None
        while engine.has_unfinished():
            for out in engine.step():
                tokens += out.new_token_ids
                cached = out.num_cached_tokens
            if steps is not None:
                steps.append(engine.last_step_prompt_tokens)
        results.append((tokens, cached))
    return results


@pytest.fixture(scope="module")
def engines(smollm2):
    return {"off": make_engine(smollm2, prefix_caching=False),
            "on": make_engine(smollm2)}


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_a_repeated_prefix_is_served_from_the_cache_and_changes_no_token(engines, params):
    prompts = [BASE, BASE, OTHER, BASE[:48]]
    engines["on"].memory.pages.flush()  # what the other parameter cached
    off = run(engines["off"], prompts, params)
    on = run(engines["on"], prompts, params)
    assert [t for t, _ in on] == [t for t, _ in off]
    assert [c for _, c in off] == [0, 0, 0, 0]
    # 100 tokens: 6 full pages are reusable (the last token is always computed); OTHER
    # shares 4 pages; a 48-token prompt that is all cached pages recomputes its last page.
    assert [c for _, c in on] == [0, 96, 64, 32]
    assert engines["on"].num_used_pages == 0  # cached pages are retained, not held


def test_chunks_share_steps_with_decodes_and_change_no_token(smollm2):
    whole = make_engine(smollm2, prefix_caching=False, chunked_prefill=False,
                        max_num_batched_tokens=32)
    chunked = make_engine(smollm2, prefix_caching=False, max_num_batched_tokens=32)
    short = random_prompts([5, 9, 7], seed=3)
    long = random_prompts([150], seed=4)[0]
    outputs, steps = {}, {}
    for name, engine in (("whole", whole), ("chunked", chunked)):
        ids = [engine.add_request(p, SamplingParams(max_tokens=40, temperature=0,
                                                    ignore_eos=True)) for p in short]
        tokens = {i: [] for i in ids}
        engine.step()  # the three short prompts start decoding
        long_id = engine.add_request(long, GREEDY)
        tokens[long_id], steps[name] = [], []
        while engine.has_unfinished():
            outs = engine.step()
            for out in outs:
                tokens[out.request_id] += out.new_token_ids
            if not tokens[long_id] or len(tokens[long_id]) == 1 and long_id in \
                    [o.request_id for o in outs]:
                steps[name].append((engine.last_step_prompt_tokens,
                                    sorted(o.request_id for o in outs if o.request_id in ids)))
        outputs[name] = list(tokens.values())
    assert outputs["chunked"] == outputs["whole"]
    # Unchunked, the prompt over the budget waits until the decodes end, then runs alone;
    # chunked, it starts at once, and every step until its first token gives each running
    # decode its token and computes at most 29 prompt tokens.
    assert steps["whole"][-1] == (150, []) and all(n == 0 for n, _ in steps["whole"][:-1])
    assert len(steps["chunked"]) == -(-150 // 29)
    assert all(n <= 29 and got == sorted(ids) for n, got in steps["chunked"])


@pytest.mark.parametrize("swap_bytes", [0, 4 << 20], ids=["recompute", "swap"])
def test_preemption_under_page_pressure_keeps_cached_outputs_exact(checkpoints, swap_bytes):
    system = random_prompts([120], seed=5, vocab=500)[0]
    prompts = [system + p for p in random_prompts([30, 50, 20, 60] * 6, seed=6, vocab=500)]
    params = SamplingParams(max_tokens=60, temperature=0, ignore_eos=True)
    reference = worker_over(checkpoints, prefix_caching=False, kv_cache_bytes=16 << 20)
    reference.switch("m-a")
    want = reference.engine("m-a").generate(prompts, params)
    # 256 pages of m-a: about 20 of these 24 sequences at once.
    tight = worker_over(checkpoints, kv_cache_bytes=1 << 20, swap_bytes=swap_bytes)
    tight.switch("m-a")
    engine = tight.engine("m-a")
    assert engine.generate(prompts, params) == want
    assert engine.num_preemptions > 0
    assert engine.num_used_pages == 0 and tight.usage()["swap"]["used"] == 0


def test_cancelling_requests_that_share_pages_leaves_the_others_exact(checkpoints):
    system = random_prompts([64], seed=10, vocab=500)[0]
    prompts = [system + p for p in random_prompts([20, 3, 35, 17], seed=11, vocab=500)]
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    reference = worker_over(checkpoints, prefix_caching=False)
    reference.switch("m-a")
    want = reference.engine("m-a").generate(prompts, params)
    worker = worker_over(checkpoints)
    worker.switch("m-a")
    engine = worker.engine("m-a")
    engine.generate(prompts[:1], params)  # caches the shared 64 tokens
    ids = [engine.add_request(p, params) for p in prompts]
    tokens = {i: [] for i in ids}
    for step in range(40):
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
        if step == 5:
            assert engine.abort(ids[1]) and engine.abort(ids[3])
    assert [tokens[ids[0]], tokens[ids[2]]] == [want[0], want[2]]
    assert not engine.has_unfinished() and engine.num_used_pages == 0
    cache = engine.memory.pages
    assert cache.num_retained > 0 and cache.flush() > 0
    assert cache.cached_pages() == {} and worker.usage()["kv"]["cached"] == 0


def test_cached_pages_survive_switches_and_give_way_to_another_model(checkpoints):
    worker: Worker = worker_over(checkpoints, kv_cache_bytes=2 << 20, slab_bytes=256 << 10)
    reference = worker_over(checkpoints, prefix_caching=False)
    a, b = "m-a", "m-b"
    prompt = random_prompts([90], seed=6, vocab=500)[0]

    def generate(w, model, prompts):
        w.switch(model)
        return run(w.engine(model), prompts)

    first = generate(worker, a, [prompt])
    generate(worker, b, random_prompts([40, 70], seed=7, vocab=500))
    again = generate(worker, a, [prompt])
    assert again[0][1] == 80 and again[0][0] == first[0][0]
    assert worker.cached_pages()[a] >= 5 and worker.cached_pages()[b] >= 1
    # Model b now needs every slab: a's retained pages are evicted, nothing is held wrongly.
    crowd = random_prompts([400] * 6, seed=8, vocab=500)
    worker.switch(b)
    got = worker.engine(b).generate(crowd, GREEDY)
    reference.switch(b)
    assert got == reference.engine(b).generate(crowd, GREEDY)
    assert worker.cached_pages().get(a, 0) < 5
    assert worker.usage()["kv"]["used"] == 0
    for engine in worker.engines.values():
        engine.memory.pages.flush()
    assert worker.usage()["kv"] == {"used": 0, "cached": 0,
                                    "free": worker.memory.layout.kv.size}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from helpers import synthetic_checkpoints
    from test_kv_handoff import SHAPES

    return synthetic_checkpoints(tmp_path_factory.mktemp("prefix-fleet"), SHAPES)


def test_a_one_step_prefill_leaves_a_long_prompt_to_its_model_s_turns(checkpoints):
    from tokenpool.gpu_pool.job_runner import JobRunner
    from tokenpool.gpu_pool.protocol import JobInput
    from tokenpool.schedulers.types import Decode, Job, Prefill, Switch

    long = random_prompts([150], seed=9, vocab=500)[0]
    runner = JobRunner(worker_over(checkpoints, max_num_batched_tokens=32), 0)

    def job(*units, **extra):
        items = list(runner.run(JobInput(Job(0, units), **extra)))
        return [o for step in items[:-1] for o in step.outputs], items[-1]

    prompts = {"long": (tuple(long), GREEDY)}
    outputs, done = job(Switch(0, "m-b"), Prefill(0, "m-b", ("long",), max_steps=1),
                        prompts=prompts)
    assert outputs == [] and done.results[0].request_ids == ("long",)
    engine = runner.worker.engine("m-b")
    assert engine.holds("long") and engine.running[0].num_computed == 32
    # Another model's turn in between, then the long prompt's model finishes it.
    job(Switch(0, "m-a"), Prefill(0, "m-a", ("x",)), prompts={"x": ((5, 6, 7), GREEDY)})
    outputs, _ = job(Switch(0, "m-b"), Decode(0, "m-b", ("long",), 60.0))
    reference = worker_over(checkpoints)
    reference.switch("m-b")
    assert [t for o in outputs for t in o.new_token_ids] == \
        reference.engine("m-b").generate([long], GREEDY)[0]
    assert outputs[0].num_prompt_tokens == 150


def test_prefill_chunk_tokens_caps_each_prompt_s_share_of_a_step(checkpoints):
    worker = worker_over(checkpoints, max_num_batched_tokens=64, prefill_chunk_tokens=20)
    worker.switch("m-a")
    engine = worker.engine("m-a")
    prompts = random_prompts([50, 45], seed=12, vocab=500)
    ids = [engine.add_request(p, GREEDY) for p in prompts]
    tokens, steps = {i: [] for i in ids}, []
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
        steps.append(engine.last_step_prompt_tokens)
    assert steps[:3] == [40, 40, 15]  # both prompts, 20 tokens each a step, then their tails
    assert not any(steps[3:])
    reference = worker_over(checkpoints, prefix_caching=False, chunked_prefill=False)
    reference.switch("m-a")
    assert [tokens[i] for i in ids] == reference.engine("m-a").generate(prompts, GREEDY)
