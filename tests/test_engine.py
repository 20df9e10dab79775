"""Engine behaviour on the real model: batching, sampling, stopping, bad input, paging."""

from __future__ import annotations

import pytest

from tokenpool.errors import EmptyPromptError, InvalidRequestError, PromptTooLongError
from tokenpool.sampling import SamplingParams
from helpers import make_engine, random_prompts

GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)


def run_all(engine, joins: list[tuple[int, list[int], SamplingParams]]) -> list[list[int]]:
    """Add each request at its step number, run to completion; results in `joins` order."""
    tokens: dict[str, list[int]] = {}
    ids: list[str] = [""] * len(joins)
    pending = sorted(range(len(joins)), key=lambda i: joins[i][0])
    step = 0
    while pending or engine.has_unfinished():
        while pending and joins[pending[0]][0] <= step:
            i = pending.pop(0)
            ids[i] = engine.add_request(joins[i][1], joins[i][2])
            tokens[ids[i]] = []
        for out in engine.step():
            tokens[out.request_id].extend(out.new_token_ids)
        step += 1
    return [tokens[i] for i in ids]


def test_batch_invariance_with_joins_at_different_steps(engine):
    target = random_prompts([37], seed=7)[0]
    (alone,) = engine.generate([target], GREEDY)
    others = random_prompts([5, 64, 17, 130, 3, 48, 90, 22, 9, 200, 33, 71, 15, 40, 120], seed=8)
    joins = [(i % 5, p, GREEDY) for i, p in enumerate(others)]
    joins.insert(6, (2, target, GREEDY))  # joins mid-flight, among 15 mixed-length others
    got = run_all(engine, joins)
    assert got[6] == alone


def test_seeded_sampling_is_reproducible_whatever_the_batch(engine):
    params = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, top_k=50, seed=1234)
    prompt = random_prompts([20], seed=3)[0]
    (alone,) = engine.generate([prompt], params)
    crowd = random_prompts([50, 8, 31], seed=4)
    mixed = engine.generate(crowd + [prompt], [SamplingParams(max_tokens=16, temperature=1.0)]
                            * 3 + [params])
    assert mixed[-1] == alone
    (other_seed,) = engine.generate([prompt], SamplingParams(max_tokens=16, temperature=0.9,
                                                             top_p=0.95, top_k=50, seed=99))
    assert other_seed != alone


def test_top_k_one_and_tiny_top_p_are_greedy(engine):
    prompt = random_prompts([12], seed=5)[0]
    (greedy,) = engine.generate([prompt], GREEDY)
    (top_k,) = engine.generate([prompt], SamplingParams(max_tokens=24, temperature=1.5, top_k=1,
                                                        seed=1, ignore_eos=True))
    (top_p,) = engine.generate([prompt], SamplingParams(max_tokens=24, temperature=1.5,
                                                        top_p=1e-6, seed=2, ignore_eos=True))
    assert top_k == greedy == top_p


def test_logprobs_are_sorted_and_include_the_greedy_choice(engine):
    prompt = random_prompts([10], seed=6)[0]
    engine.add_request(prompt, SamplingParams(max_tokens=4, temperature=0, logprobs=5))
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    for out in outs:
        (lp,) = out.logprobs
        assert len(lp.top) == 5
        values = [v for _, v in lp.top]
        assert values == sorted(values, reverse=True) and all(v <= 0 for v in values)
        assert lp.top[0][0] == lp.token_id == out.new_token_ids[0]
        assert lp.logprob == pytest.approx(values[0])


def collect(engine, prompt, params):
    rid = engine.add_request(prompt, params)
    text, tokens, last = "", [], None
    while engine.has_unfinished():
        for out in engine.step():
            assert out.request_id == rid
            text += out.new_text
            tokens += out.new_token_ids
            last = out
    return text, tokens, last.finish_reason


def test_stop_string_truncates_and_is_never_emitted(engine, smollm2):
    prompt = smollm2.tokenizer.encode("The numbers from one to ten are: one, two, three,")
    full, _, reason = collect(engine, prompt, SamplingParams(max_tokens=30, temperature=0,
                                                             ignore_eos=True))
    assert reason == "length"
    stop = full[len(full) // 3: len(full) // 3 + 4]
    assert stop.strip(), f"need a visible stop string from {full!r}"
    text, _, reason = collect(engine, prompt, SamplingParams(max_tokens=30, temperature=0,
                                                             stop=[stop], ignore_eos=True))
    assert reason == "stop"
    assert text == full[: full.index(stop)]


def test_stop_token_ids_and_eos_end_with_stop(engine, smollm2):
    tok = smollm2.tokenizer
    prompt = tok.encode("Counting: 1, 2, 3, 4,")
    _, tokens, _ = collect(engine, prompt, SamplingParams(max_tokens=12, temperature=0,
                                                         ignore_eos=True))
    stop_id = tokens[5]
    _, got, reason = collect(engine, prompt, SamplingParams(
        max_tokens=12, temperature=0, stop_token_ids=[stop_id], ignore_eos=True))
    assert reason == "stop" and got == tokens[: tokens.index(stop_id) + 1]
    chat = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Say hello."}]))
    text, got, reason = collect(engine, chat, SamplingParams(max_tokens=200, temperature=0))
    assert reason == "stop" and got[-1] in smollm2.config.eos_token_ids
    assert text and "<|im_end|>" not in text


@pytest.mark.parametrize("make_bad, error", [
    (lambda: ([], SamplingParams()), EmptyPromptError),
    (lambda: ([5] * 9000, SamplingParams()), PromptTooLongError),
    (lambda: ([5, 6], SamplingParams(max_tokens=9000)), InvalidRequestError),
    (lambda: ([5, 10**6], SamplingParams()), InvalidRequestError),
])
def test_bad_requests_raise_typed_errors_and_the_engine_survives(engine, make_bad, error):
    prompt, params = make_bad()
    with pytest.raises(error) as info:
        engine.add_request(prompt, params)
    assert str(info.value)
    assert not engine.has_unfinished() and engine.num_used_pages == 0
    assert len(engine.generate([[5, 6, 7]], SamplingParams(max_tokens=2))[0]) >= 1


@pytest.mark.parametrize("kwargs, param", [
    ({"temperature": -0.5}, "temperature"), ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"), ({"top_k": -2}, "top_k"), ({"max_tokens": 0}, "max_tokens"),
    ({"logprobs": 1000}, "logprobs"), ({"stop": [""]}, "stop"),
])
def test_invalid_sampling_values_name_the_parameter(kwargs, param):
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(**kwargs)
    assert info.value.param == param and param in str(info.value)


def test_preemption_under_page_pressure_keeps_outputs_exact(smollm2, engine):
    prompts = random_prompts([40, 70, 25, 90, 55, 33], seed=11)
    expected = engine.generate(prompts, GREEDY)
    # About 12 pages: six sequences of up to 114 tokens cannot all stay resident.
    tight = make_engine(smollm2, kv_cache_bytes=12 * 30 * 2 * 16 * 3 * 64 * 4)
    assert tight.blocks.num_pages == 12
    got = tight.generate(prompts, GREEDY)
    assert tight.num_preemptions > 0, "the pool was meant to be too small for all six"
    assert got == expected
    assert tight.num_used_pages == 0


def test_a_named_step_grows_only_its_requests_and_preempts_the_others_first(smollm2, engine):
    prompts = random_prompts([40, 70, 25, 90], seed=13)
    expected = engine.generate(prompts, GREEDY)
    tight = make_engine(smollm2, kv_cache_bytes=12 * 30 * 2 * 16 * 3 * 64 * 4)  # 12 pages
    a, b, c, d = (tight.add_request(p, GREEDY) for p in prompts)
    got = {r: [] for r in (a, b, c, d)}

    def step(names=None):
        outs = tight.step(names)
        for out in outs:
            got[out.request_id].extend(out.new_token_ids)
        return [out.request_id for out in outs]

    assert step() == [a, b, c]  # 3 + 5 + 2 pages; d's 6 do not fit
    tables = {r: list(tight.blocks.block_table(r)) for r in (a, b, c)}
    for _ in range(9):  # a grows into a fourth page; b and c neither step nor grow
        assert step([a]) == [a]
    assert tight.blocks.block_table(a) != tables[a]
    assert {r: tight.blocks.block_table(r) for r in (b, c)} == {r: tables[r] for r in (b, c)}
    # d needs 6 pages and 1 is free: the newest requests not named make room, c then b.
    assert step([d]) == [d] and tight.num_preemptions == 2
    assert [r for r in (a, b, c, d) if tight.holds(r)] == [a, b, c, d]
    assert [s.seq_id for s in tight.running] == [a, d]
    assert [len(got[r]) for r in (a, b, c, d)] == [10, 1, 1, 1]
    while tight.has_unfinished():
        step()
    assert [got[r] for r in (a, b, c, d)] == expected
    assert tight.num_used_pages == 0


def test_abort_frees_pages_mid_generation(engine):
    rid = engine.add_request(random_prompts([50], seed=12)[0], GREEDY)
    engine.step()
    assert engine.num_used_pages > 0
    assert engine.abort(rid)
    assert engine.num_used_pages == 0 and not engine.has_unfinished()
    assert not engine.abort(rid)
