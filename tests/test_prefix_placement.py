"""Cache-aware placement (issue 25): the policy's prefix index, the cost of uncached tokens,
placement on the worker holding a prompt's prefix when its TTFT allows, riding decodes'
tokens, and the controller naming prompts' pages."""

from __future__ import annotations

import pytest

from tokenpool.memory.prefix_cache import page_hashes
from tokenpool.memory.slabs import BLOCK_SIZE
from tokenpool.schedulers.cost import CostModel, Linear3, ModelCost
from tokenpool.schedulers.prefill import GroupedFCFSPrefill
from tokenpool.schedulers.prefix_index import (PAGE_TOKENS, PageLRU, PrefixIndex,
                                               reusable_tokens)
from tokenpool.schedulers.request_level import RequestLevelScheduler
from tokenpool.schedulers.token_level import TokenLevelScheduler
from tokenpool.schedulers.types import SLO, Prefill, PrefillDone, RequestInfo

GiB = 1 << 30


def cost(per_token: float = 1e-3, quadratic: float = 0.0) -> CostModel:
    # Prefill 10 ms + 1 ms a token (2000 tokens: 2.01 s); decode 10 ms + 1 ms a request;
    # switch 1 s; room for 10,000 tokens of KV (1 KiB each).
    spec = ModelCost(Linear3(0.01, per_token, quadratic), Linear3(0.01, 1e-3, 0.0), GiB, 1024)
    return CostModel({m: spec for m in ("a", "b")}, float(GiB), 1024 * 10_000)


def tokens(n: int, seed: int = 0) -> list[int]:
    return [(seed * 7919 + i * 31) % 32000 for i in range(n)]


def req(i: int, model: str, prompt: list[int] | int, t: float = 0.0) -> RequestInfo:
    if isinstance(prompt, int):
        return RequestInfo(f"r{i}", model, prompt, t, 16)
    return RequestInfo(f"r{i}", model, len(prompt), t, 16, page_hashes(model, prompt))


# -- the index -----------------------------------------------------------------------------

def test_page_size_and_reusable_tokens_match_the_engine():
    assert PAGE_TOKENS == BLOCK_SIZE
    assert reusable_tokens(10, 161) == 160  # (161 - 1) // 16 = 10 pages may be reused
    assert reusable_tokens(10, 160) == 144  # the last token is always computed
    assert reusable_tokens(0, 1000) == 0


def test_lru_keeps_a_prompt_s_first_pages_freshest_and_evicts_within_its_bytes():
    lru = PageLRU(capacity_bytes=3 * 100)
    assert lru.touch([1, 2, 3], 100) == []
    assert lru.match([1, 2, 3, 4]) == 3
    # A new prompt's pages push out the oldest: the tail of the first prompt, not its head.
    assert lru.touch([1, 5], 100) == [3]
    assert lru.match([1, 2, 3]) == 2 and 5 in lru and lru.used_bytes == 300


def test_index_finds_the_longest_held_prefix_and_forgets_evicted_pages():
    index = PrefixIndex([0, 1], capacity_bytes=3 * 10)
    index.record(0, (1, 2, 3), 10)
    index.record(1, (1, 2), 10)
    assert index.longest((1, 2, 3, 4), limit=8) == ({0}, 3)
    assert index.longest((1, 2, 3, 4), limit=2) == ({0, 1}, 2)
    assert index.longest((1, 2, 3), limit=8, allowed={1}) == ({1}, 2)
    assert index.longest((9, 1), limit=8) == (set(), 0)
    index.record(0, (7, 8), 10)  # evicts 3 then 2 from worker 0
    assert index.cached_pages(0, (1, 2, 3)) == 1 and index.holders[2] == {1}
    assert 3 not in index.holders


def test_index_search_agrees_with_walking_every_worker_s_cache():
    import random

    rng = random.Random(3)
    index = PrefixIndex([0, 1, 2], capacity_bytes=40)
    bases = [tokens(16 * 6, seed=s) for s in range(3)]
    prompts = [page_hashes("a", base[:16 * rng.randint(1, 6)] + tokens(16 * rng.randint(0, 4),
                                                                       seed=10 + i))
               for i, base in enumerate(rng.choice(bases) for _ in range(60))]
    for names in prompts:
        index.record(rng.randrange(3), names, 1)
        for probe in rng.sample(prompts, 5):
            allowed = rng.choice([None, {0, 1}, {2}])
            best = max(index.cached_pages(w, probe) for w in allowed or (0, 1, 2))
            expected = {w for w in allowed or (0, 1, 2)
                        if best and index.cached_pages(w, probe) == best}
            assert index.longest(probe, 99, allowed) == (expected, best)


# -- the cost of uncached tokens -----------------------------------------------------------

def test_prefill_charges_only_uncached_tokens_which_still_attend_to_the_whole_prompt():
    c = cost(per_token=1e-3, quadratic=1e-7)
    assert c.prefill_time("a", [2000]) == pytest.approx(0.01 + 2.0 + 0.4)
    # 1984 tokens cached: 16 computed, with the attention work of 2000^2 - 1984^2.
    assert c.prefill_time("a", [2000], (1984,)) == \
        pytest.approx(0.01 + 16e-3 + 1e-7 * (2000**2 - 1984**2))
    assert c.prefill_time("a", [2000], ()) == c.prefill_time("a", [2000])


# -- placement -----------------------------------------------------------------------------

def _prefill_with_cached_prefix(other_prompt: int):
    """Worker 0 prefilled a 2000-token prompt of "a" and has a group of "b" queued
    (`other_prompt` tokens); worker 1 is idle. Returns the policy and a prompt that extends
    the cached one."""
    p = GroupedFCFSPrefill([0, 1], cost(), prefixes=PrefixIndex([0, 1], 1 << 40))
    first = tokens(2000)
    p.add_request(req(0, "a", first))
    assert p.queues[0].groups and p.next_job(0) is not None  # r0 runs on worker 0
    p.add_request(req(1, "b", other_prompt))  # FCFS: worker 0 (tie on a switch to "b")
    assert [g.model for g in p.queues[0].groups] == ["b"]
    return p, req(2, "a", first + tokens(100, seed=1))


def test_placement_prefers_the_worker_holding_the_prefix_when_its_ttft_is_no_worse():
    p, r2 = _prefill_with_cached_prefix(other_prompt=500)
    # Worker 1: switch 1 s + 2.11 s of prefill = 3.11 s. Worker 0: "b"'s 1.51 s + switch
    # 1 s + 2100 - 2000 cached tokens (~0.11 s) = 2.63 s, within a 3 s SLO.
    queue, group = p.target(r2)
    assert queue.worker == 0 and group is None
    own = cost().prefill_time("a", [2100], (2000,))
    assert p.predicted_ttft(r2) == pytest.approx(1.51 + 1.0 + own)
    p.add_request(r2)
    assert p.queues[0].groups[-1].work == pytest.approx(1.0 + own)  # only uncached tokens


def test_placement_leaves_the_prefix_holder_when_its_queue_would_miss_the_slo():
    p, r2 = _prefill_with_cached_prefix(other_prompt=2000)
    # Worker 0 now: 3.01 s of "b" + 1 s + 0.11 s = 4.12 s, past a 3.5 s SLO that worker 1
    # meets (3.11 s) even computing the whole prompt.
    queue, _ = p.target(r2)
    assert queue.worker == 1
    assert p.predicted_ttft(r2) == pytest.approx(1.0 + cost().prefill_time("a", [2100]))


def test_requests_without_page_names_are_placed_as_before():
    p = GroupedFCFSPrefill([0, 1], cost(), prefixes=PrefixIndex([0, 1], 1 << 40))
    plain = GroupedFCFSPrefill([0, 1], cost())
    for i, model in enumerate(["a", "b", "a", "b", "a"]):
        p.add_request(req(i, model, 300 + i))
        plain.add_request(req(i, model, 300 + i))
    assert [[(g.model, g.work) for g in q.groups] for q in p.queues.values()] == \
        [[(g.model, g.work) for g in q.groups] for q in plain.queues.values()]
    assert not p.prefixes.holders


def test_colocated_placement_takes_the_prefix_holder_only_while_it_decodes_in_time():
    # 50 ms TBT with decode steps of 10 ms + 1 ms a request: a model keeps up to 40.
    s = TokenLevelScheduler([0, 1], [0, 1], cost(), lambda m: SLO(10, 0.05))
    first = tokens(2000)
    s.add_request(req(0, "a", first), 0.0)
    [job] = s.schedule({0}, 0.0)
    s.update([PrefillDone(0, "a", ("r0",), ("r0",))], 2.0)  # r0 ends at its first token
    for i in range(1000, 1005):  # worker 0 decodes a little "b": FCFS would pick worker 1
        s.decode.place(f"r{i}", "b", 101, 0.05, local=0)
    s.add_request(req(1, "a", first + tokens(50, seed=2)), 2.0)
    assert [g.model for g in s.prefill.queues[0].groups] == ["a"]
    for i in range(2000, 2040):  # now a round there with one more request misses its TBT
        s.decode.place(f"r{i}", "b", 101, 0.05, local=0)
    s.add_request(req(2, "a", first + tokens(50, seed=3)), 2.0)
    assert [g.model for g in s.prefill.queues[1].groups] == ["a"]


# -- riding decodes get a token at every step of a chunked prefill -------------------------

def test_token_level_counts_decode_steps_of_riding_decodes():
    s = TokenLevelScheduler([0], [0], cost(), lambda m: SLO(10, 0.1))
    s.decode.place("r1000", "a", 101, 0.1, local=0)
    s.add_request(req(0, "a", 100), 0.0)
    [job] = s.schedule({0}, 0.0)
    assert [u.decode_ids for u in job.units if type(u) is Prefill] == [("r1000",)]
    s.update([PrefillDone(0, "a", ("r0",), (), decoded=("r1000",), decode_steps=4)], 0.5)
    assert s.decode.workers[0].requests["r1000"].context == 105


def test_request_level_counts_decode_steps_of_riding_decodes():
    s = RequestLevelScheduler([0], cost(), lambda m: SLO(10, 0.1))
    s.add_request(req(0, "a", 100), 0.0)
    s.schedule({0}, 0.0)
    s.update([PrefillDone(0, "a", ("r0",), ())], 0.1)
    s.add_request(req(1, "a", 50), 0.2)
    [job] = s.schedule({0}, 0.2)
    assert job.units[-1].decode_ids == ("r0",)
    s.update([PrefillDone(0, "a", ("r1",), (), decoded=("r0",), decode_steps=3)], 0.3)
    assert s.workers[0].running == {"r0": 103, "r1": 50}


# -- the controller names prompts' pages ---------------------------------------------------

def _fleet(tmp_path, caching: bool):
    from tokenpool.fleet import load_fleet

    path = tmp_path / f"fleet-{caching}.yaml"
    path.write_text("models:\n  - {id: a, source: a.gguf}\n"
                    f"engine:\n  prefix_caching: {str(caching).lower()}\n")
    return load_fleet(path, check_memory=False)


def test_only_models_whose_engine_caches_prefixes_get_page_names(tmp_path):
    from tokenpool.controller.page_names import PageNamer

    prompt = tokens(40)
    on = PageNamer.of_fleet(_fleet(tmp_path, True))
    assert on("a", prompt) == page_hashes("a", prompt) and len(on("a", prompt)) == 2
    assert PageNamer.of_fleet(_fleet(tmp_path, False))("a", prompt) == ()


def test_submit_names_the_prompt_s_pages():
    from tokenpool.controller.page_names import PageNamer
    from tokenpool.controller.service import ServingController
    from tokenpool.controller.serving_types import ServeRequest
    from tokenpool.sampling import SamplingParams

    controller = ServingController(None, PageNamer(frozenset({"a"})))
    controller._thread = object()  # as if started: submit only queues
    prompt = tuple(tokens(40))
    controller.submit(ServeRequest("r0", "a", prompt, SamplingParams(), SLO(1, 1), 0.0),
                      lambda event: None)
    [arrival] = controller._inbox
    assert arrival.info.page_hashes == page_hashes("a", prompt)


def test_a_retried_request_s_names_cover_the_tokens_its_client_has():
    from tokenpool.controller.core_types import Arrival, Tracked
    from tokenpool.controller.page_names import PageNamer
    from tokenpool.controller.recovery import retry_info
    from tokenpool.sampling import SamplingParams

    namer = PageNamer(frozenset({"a"}))
    prompt, streamed = tuple(tokens(40)), tuple(tokens(30, seed=5))
    info = RequestInfo("r0", "a", 40, 0.0, 100, namer("a", prompt))
    tracked = Tracked(Arrival(info, SLO(1, 1), (prompt, SamplingParams())), 0.0,
                      resumed=streamed)
    retry = retry_info(tracked, namer)
    assert retry.prompt_len == 70 and retry.page_hashes == page_hashes("a", prompt + streamed)
    assert len(retry.page_hashes) == 4 and retry_info(tracked).page_hashes == info.page_hashes
