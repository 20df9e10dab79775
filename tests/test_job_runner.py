"""Jobs on real workers, streamed (issue 5): the JobRunner behind threads and Ray actors.

The yardstick is a standalone engine: however a request travels (prefilled on one worker and
decoded on another, interleaved with cancellations and other units), its streamed tokens and
text must be the engine's. A unit runs exactly the requests it names, and only a unit naming
a request reports it finished.
"""

from __future__ import annotations

import pickle
import queue
import time

import pytest

from test_kv_handoff import GREEDY, PROMPT, SEEDED, make_worker, standalone
from tokenpool.gpu_pool.protocol import JobDone, JobInput, StepOutputs
from tokenpool.gpu_pool.job_runner import JobRunner
from tokenpool.gpu_pool.pool import LocalPool
from tokenpool.gpu_pool.pool_config import PoolConfig
from tokenpool.sampling import SamplingParams
from tokenpool.schedulers.types import (Decode, DecodeDone, Job, Prefill, PrefillDone, SwapIn,
                                        SwapOut, Switch)

FOREVER = 600.0  # a quota no test reaches: decode units here end when their requests do


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from helpers import synthetic_checkpoints
    from test_kv_handoff import SHAPES

    return synthetic_checkpoints(tmp_path_factory.mktemp("runner-fleet"), SHAPES)


def run_job(runner: JobRunner, *units, **extra) -> tuple[list[StepOutputs], JobDone]:
    items = list(runner.run(JobInput(Job(runner.worker_id, tuple(units)), **extra)))
    *steps, done = items
    assert isinstance(done, JobDone) and all(isinstance(s, StepOutputs) for s in steps)
    return steps, done


class Streams:
    """Each request's streamed tokens, text and finishes, over any number of jobs."""

    def __init__(self):
        self.tokens: dict[str, list[int]] = {}
        self.text: dict[str, str] = {}
        self.finishes: dict[str, int] = {}
        self.stamps: list[float] = []

    def add(self, steps: list[StepOutputs]) -> None:
        for step in steps:
            self.stamps.append(step.emitted_at)
            for out in step.outputs:
                self.tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
                self.text[out.request_id] = self.text.get(out.request_id, "") + out.new_text
                self.finishes[out.request_id] = self.finishes.get(out.request_id, 0) + out.finished

    def assert_matches(self, want: dict[str, tuple[list[int], str]]) -> None:
        assert {r: self.tokens[r] for r in want} == {r: t for r, (t, _) in want.items()}
        assert {r: self.text[r] for r in want} == {r: text for r, (_, text) in want.items()}
        assert all(self.finishes[r] == 1 for r in want), self.finishes
        assert self.stamps == sorted(self.stamps)


def test_prefill_on_one_worker_and_decode_on_another_is_exact_on_smollm2(smollm2):
    tok = smollm2.tokenizer
    prompts = {"g": tok.encode("The three primary colours are red, yellow and blue. Mixing "
                               "red and blue gives"),
               "s": tok.encode("Once upon a time, in a small village by the sea, there lived")}
    params = {"g": SamplingParams(max_tokens=14, temperature=0.0, ignore_eos=True),
              "s": SamplingParams(max_tokens=14, temperature=0.8, seed=11, ignore_eos=True)}
    ids = list(prompts)
    want = dict(zip(ids, standalone(smollm2, [prompts[r] for r in ids],
                                    [params[r] for r in ids])))
    a, b = (JobRunner(make_worker({"smollm2": smollm2}, kv_cache_bytes=16 << 20,
                                  slab_bytes=4 << 20, swap_bytes=8 << 20), i) for i in (0, 1))
    streams = Streams()
    steps, prefilled = run_job(a, Switch(0, "smollm2"), Prefill(0, "smollm2", tuple(ids)),
                               prompts={r: (tuple(prompts[r]), params[r]) for r in ids},
                               export_after_prefill=True)
    streams.add(steps)
    assert prefilled.results == (PrefillDone(0, "smollm2", tuple(ids), ()),)
    assert sorted(prefilled.handoffs) == ids and prefilled.kv_pages_used == 0
    assert [s.bytes_copied > 0 for s in prefilled.switches] == [True]
    # The handoffs cross a process boundary in serving: they travel pickled here too.
    handoffs = pickle.loads(pickle.dumps(prefilled.handoffs))
    steps, decoded = run_job(b, SwapIn(1, "smollm2", tuple(ids)), Switch(1, "smollm2"),
                             Decode(1, "smollm2", tuple(ids), FOREVER), handoffs=handoffs)
    streams.add(steps)
    assert decoded.results == (DecodeDone(1, "smollm2", tuple(ids), 13, tuple(ids)),)
    assert decoded.results[0].seconds > 0  # the turn's steps, timed for the policy
    assert decoded.kv_pages_used == 0 and decoded.model == "smollm2" and not decoded.errors
    streams.assert_matches(want)
    assert all(want[r][1] for r in ids)  # real text, not only tokens
    for runner in (a, b):
        usage = runner.worker.usage()
        assert usage["kv"]["used"] == 0 and usage["swap"]["used"] == 0


def test_cancellation_before_prefill_between_jobs_and_of_unknown_ids(checkpoints):
    params = SamplingParams(max_tokens=9, temperature=0.0, ignore_eos=True)
    ids = ("x", "y", "z", "v")
    runner = JobRunner(make_worker(checkpoints), 0)
    engine = runner.worker.engine("m-a")
    streams = Streams()
    steps, done = run_job(runner, Switch(0, "m-a"), Prefill(0, "m-a", ids),
                          prompts={r: (tuple(PROMPT), params) for r in ids},
                          cancelled=("x", "nope"))
    streams.add(steps)
    assert done.results == (PrefillDone(0, "m-a", ids, ("x",)),)  # x never started
    assert "x" not in streams.tokens and not engine.blocks.has("x")
    steps, done = run_job(runner, Decode(0, "m-a", ids[1:], 0.0))  # a quota of one step
    streams.add(steps)
    pages_each = engine.blocks.pages_to_grow("new", len(PROMPT) + 2)
    assert done.kv_pages_used == 3 * pages_each
    # Cancelled between jobs: aborted before anything runs, its pages freed at once; no unit
    # names it, so it is reported later, by the unit that does.
    steps, done = run_job(runner, cancelled=("y",))
    assert done.results == () and not engine.holds("y")
    assert done.kv_pages_used == 2 * pages_each and not steps
    # A swapped-out request's host pages go too.
    _, done = run_job(runner, SwapOut(0, "m-a", ("z",)))
    assert runner.worker.usage()["swap"]["used"] > 0 and done.kv_swap_bytes > 0
    steps, done = run_job(runner, Decode(0, "m-a", ("y", "z", "v"), FOREVER),
                          cancelled=("y", "z", "nope"))
    streams.add(steps)
    assert runner.worker.usage()["swap"]["used"] == 0
    assert done.results == (DecodeDone(0, "m-a", ("y", "z", "v"), 7, ("y", "z", "v")),)
    [want] = standalone(checkpoints["m-a"], [PROMPT], [params])
    streams.assert_matches({"v": want})
    assert runner.worker.usage()["kv"]["used"] == 0


def test_a_decode_unit_steps_only_the_requests_it_names(checkpoints):
    lengths = {"a": 8, "b": 3, "c": 2, "d": 6}
    params = {r: SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
              for r, n in lengths.items()}
    runner = JobRunner(make_worker(checkpoints), 0)
    ids = tuple(lengths)
    streams = Streams()
    steps, done = run_job(runner, Switch(0, "m-b"), Prefill(0, "m-b", ids),
                          prompts={r: (tuple(PROMPT[:10]), params[r]) for r in ids})
    streams.add(steps)
    # Each request has its first token; each unit now runs only the requests it names.
    turns = [(Decode(0, "m-b", ("a", "c"), FOREVER, until_first_finish=True), 1, ("c",)),
             (Decode(0, "m-b", ("a",), FOREVER), 6, ("a",)),
             (Decode(0, "m-b", ("b",), FOREVER), 2, ("b",)),
             (Decode(0, "m-b", ("d",), FOREVER), 5, ("d",))]
    for unit, num_steps, finished in turns:
        before = {r: len(streams.tokens[r]) for r in ids}
        steps, done = run_job(runner, unit)
        streams.add(steps)
        assert done.results == (DecodeDone(0, "m-b", unit.request_ids, num_steps, finished),)
        assert {out.request_id for s in steps for out in s.outputs} == set(unit.request_ids)
        assert all(len(streams.tokens[r]) == before[r]
                   for r in ids if r not in unit.request_ids)
    want = standalone(checkpoints["m-b"], [PROMPT[:10]] * 4, [params[r] for r in ids])
    streams.assert_matches(dict(zip(ids, want)))
    assert done.kv_pages_used == 0


def test_a_prefill_unit_emits_only_the_first_tokens_of_its_requests(checkpoints):
    # Two sequences a step: the three prompts take two steps, and the first two must not
    # decode in the second; the request already decoding gets nothing during the unit.
    runner = JobRunner(make_worker(checkpoints, max_num_seqs=2), 0)
    new = ("p", "q", "r")
    prompts = {r: (tuple(PROMPT[: 6 + i]), GREEDY) for i, r in enumerate(("old",) + new)}
    streams = Streams()
    steps, _ = run_job(runner, Switch(0, "m-a"), Prefill(0, "m-a", ("old",)),
                       Decode(0, "m-a", ("old",), 0.0), prompts=prompts)
    streams.add(steps)
    steps, done = run_job(runner, Prefill(0, "m-a", new), prompts=prompts)
    streams.add(steps)
    assert done.results == (PrefillDone(0, "m-a", new, ()),) and not done.decode_timings
    assert [sorted(out.request_id for out in s.outputs) for s in steps] == [["p", "q"], ["r"]]
    assert all(out.new_token_ids and out.num_output_tokens == 1
               for s in steps for out in s.outputs)
    assert len(streams.tokens["old"]) == 2
    steps, done = run_job(runner, Decode(0, "m-a", ("old",) + new, FOREVER))
    streams.add(steps)
    ids = ("old",) + new
    want = standalone(checkpoints["m-a"], [prompts[r][0] for r in ids], [GREEDY] * 4)
    streams.assert_matches(dict(zip(ids, want)))
    assert done.kv_pages_used == 0


def test_a_prefill_s_decode_ids_ride_every_step_until_its_prompts_have_a_token(checkpoints):
    runner = JobRunner(make_worker(checkpoints, max_num_seqs=2), 0)
    prompts = {r: (tuple(PROMPT[: 6 + i]), GREEDY) for i, r in enumerate(("old", "p", "q"))}
    streams = Streams()
    steps, _ = run_job(runner, Switch(0, "m-a"), Prefill(0, "m-a", ("old",)), prompts=prompts)
    streams.add(steps)
    # Two sequences a step: "old" rides with "p" in the first step and with "q" in the
    # second, and the unit ends once both prompts have their first token.
    steps, done = run_job(runner, Prefill(0, "m-a", ("p", "q"), decode_ids=("old", "gone")),
                          prompts=prompts)
    streams.add(steps)
    assert [sorted(out.request_id for out in s.outputs) for s in steps] == [["old", "p"],
                                                                             ["old", "q"]]
    # "gone" is not on this worker: not decoded, not reported.
    assert done.results == (PrefillDone(0, "m-a", ("p", "q"), (), decoded=("old",),
                                        decode_steps=2),)
    assert len(streams.tokens["old"]) == 3
    steps, done = run_job(runner, Decode(0, "m-a", ("old", "p", "q"), FOREVER))
    streams.add(steps)
    want = standalone(checkpoints["m-a"], [prompts[r][0] for r in ("old", "p", "q")],
                      [GREEDY] * 3)
    streams.assert_matches(dict(zip(("old", "p", "q"), want)))
    # A cancelled decode id is reported by the Prefill that names it, as ended.
    run_job(runner, Prefill(0, "m-a", ("x",)), prompts={"x": (tuple(PROMPT), GREEDY)})
    _, done = run_job(runner, Prefill(0, "m-a", ("y",), decode_ids=("x",)),
                      prompts={"y": (tuple(PROMPT), GREEDY)}, cancelled=("x",))
    assert done.results == (PrefillDone(0, "m-a", ("y",), ("x",), decoded=("x",)),)


def test_a_cancelled_request_is_reported_by_the_units_that_name_it(checkpoints):
    runner = JobRunner(make_worker(checkpoints), 0)
    engine = runner.worker.engine("m-a")
    ids = ("k", "c1", "c2")
    run_job(runner, Switch(0, "m-a"), Prefill(0, "m-a", ids),
            prompts={r: (tuple(PROMPT), GREEDY) for r in ids})
    pages = engine.num_used_pages
    # Cancelled while no unit names it: aborted at once, reported by no one yet.
    steps, done = run_job(runner, cancelled=("c1",))
    assert done.results == () and not steps
    assert not engine.holds("c1") and done.kv_pages_used == pages * 2 // 3
    # Sent cancelled again, it is reported by the unit naming it, which steps only the rest;
    # c2, cancelled now and named by no unit, is aborted and not reported.
    steps, done = run_job(runner, Decode(0, "m-a", ("k", "c1"), 0.0), cancelled=("c1", "c2"))
    assert done.results == (DecodeDone(0, "m-a", ("k", "c1"), 1, ("c1",)),)
    assert [[out.request_id for out in s.outputs] for s in steps] == [["k"]]
    assert not engine.holds("c2") and done.kv_pages_used == pages // 3
    # A unit whose requests all ended steps nothing and still reports them.
    steps, done = run_job(runner, Decode(0, "m-a", ("c2",), FOREVER), cancelled=("c2",))
    assert done.results == (DecodeDone(0, "m-a", ("c2",), 0, ("c2",)),) and not steps
    run_job(runner, cancelled=("k",))
    assert runner.worker.usage()["kv"]["used"] == 0


def test_a_bad_request_or_handoff_ends_with_an_error_and_the_job_goes_on(checkpoints):
    good = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    prompts = {"ok": (tuple(PROMPT), good), "empty": ((), good),
               "huge": (tuple(PROMPT), SamplingParams(max_tokens=100_000))}
    runner = JobRunner(make_worker(checkpoints), 0)
    other = JobRunner(make_worker({"m-b": checkpoints["m-a"]}), 1)  # "m-b" is m-a there
    run_job(other, Switch(1, "m-b"), Prefill(1, "m-b", ("moved",)),
            prompts={"moved": (tuple(PROMPT), good)})
    wrong_shape = other.worker.engine("m-b").export_sequence("moved")
    ids = ("ok", "empty", "huge", "lost")
    # A failed import is reported by the Decode that follows its SwapIn, as in every policy.
    steps, done = run_job(runner, Switch(0, "m-b"), Prefill(0, "m-b", ids),
                          SwapIn(0, "m-b", ("moved",)),
                          Decode(0, "m-b", ("ok", "moved"), FOREVER),
                          prompts=prompts, handoffs={"moved": wrong_shape})
    assert done.results == (PrefillDone(0, "m-b", ids, ("empty", "huge", "lost")),
                            DecodeDone(0, "m-b", ("ok", "moved"), 3, ("ok", "moved")))
    assert sorted(done.errors) == ["empty", "huge", "lost", "moved"]
    assert "empty" in done.errors["empty"] and "context" in done.errors["huge"]
    assert "no prompt" in done.errors["lost"] and "kv heads" in done.errors["moved"]
    streams = Streams()
    streams.add(steps)
    [want] = standalone(checkpoints["m-b"], [PROMPT], [good])
    streams.assert_matches({"ok": want})
    assert set(streams.tokens) == {"ok"} and done.kv_pages_used == 0


def test_job_done_reports_switches_swaps_and_the_model_left_in(checkpoints):
    runner = JobRunner(make_worker(checkpoints), 0)
    prompts = {"r": (tuple(PROMPT), GREEDY), "q": (tuple(PROMPT), SEEDED)}
    _, done = run_job(runner, Switch(0, "m-a"), Switch(0, "m-a"), Prefill(0, "m-a", ("r",)),
                      SwapOut(0, "m-a", ("r",)), Switch(0, "m-b"),
                      Prefill(0, "m-b", ("q",)), Switch(0, "m-a"),
                      Decode(0, "m-a", ("r",), 0.0), prompts=prompts)
    assert [s.model for s in done.switches] == ["m-a", "m-b", "m-a"]  # the repeat moved nothing
    assert all(s.bytes_copied > 0 and not s.prefetched for s in done.switches)
    page = runner.worker.memory.models["m-a"].page_shape.page_bytes
    assert done.kv_swap_bytes == 2 * 2 * page  # r's two pages out, then back in
    assert done.model == "m-a" == runner.worker.active
    engines = runner.worker.engines
    assert done.kv_pages_used == engines["m-a"].num_used_pages + engines["m-b"].num_used_pages
    assert engines["m-a"].num_used_pages == engines["m-b"].num_used_pages == 2  # 21-23 tokens
    _, done = run_job(runner, cancelled=("r", "q"))  # freed now, reported when named
    assert done.kv_pages_used == 0 and done.results == () and not done.switches


def test_a_switch_holds_the_worker_for_its_hold_and_a_model_already_in_holds_nothing(
        checkpoints):
    """Switch.baseline_switch_overhead_s, the request-level baselines' emulated engine
    re-initialisation, is paid on the worker after the copy, and only when weights moved."""
    runner = JobRunner(make_worker(checkpoints), 0)
    start = time.monotonic()
    _, done = run_job(runner, Switch(0, "m-a", 0.3))
    assert time.monotonic() - start >= 0.3
    assert [s.model for s in done.switches] == ["m-a"]
    start = time.monotonic()
    _, done = run_job(runner, Switch(0, "m-a", 30.0))
    assert time.monotonic() - start < 30.0 and not done.switches


def test_a_decode_turn_reports_its_steps_with_their_mean_batch_and_context(checkpoints):
    runner = JobRunner(make_worker(checkpoints), 0)
    prompts = {"r": (tuple(PROMPT), GREEDY), "q": (tuple(PROMPT[:5]), GREEDY)}
    _, done = run_job(runner, Prefill(0, "m-a", ("r", "q")), prompts=prompts)
    assert not done.decode_timings  # a prefill is no decode turn
    first = sum(s.num_tokens for s in runner.worker.engine("m-a").running)
    _, done = run_job(runner, Decode(0, "m-a", ("r", "q"), FOREVER, until_first_finish=True))
    (timing,) = done.decode_timings
    (result,) = done.results
    assert (timing.model, timing.steps, timing.seconds) == ("m-a", result.steps, result.seconds)
    assert timing.batch == 2  # nobody finished before the last step
    assert timing.context == first + 2 * (timing.steps - 1) / 2  # +2 tokens a step, averaged


class _Listener:
    def __init__(self):
        self.items: queue.SimpleQueue = queue.SimpleQueue()

    def on_step(self, out):
        self.items.put(out)

    def on_done(self, done):
        self.items.put(done)

    def on_failure(self, worker, error):
        self.items.put(error)

    def until_done(self, streams: Streams) -> JobDone:
        while not isinstance(item := self.items.get(timeout=120), JobDone):
            assert isinstance(item, StepOutputs), item
            streams.add([item])
        return item


def test_worker_threads_hand_a_request_from_prefill_to_decode(checkpoints):
    pool = LocalPool(PoolConfig(num_workers=2, prefill_workers=1),
                     lambda i: JobRunner(make_worker(checkpoints), i))
    listener, streams = _Listener(), Streams()
    pool.start(listener)
    try:
        pool.run(0, JobInput(Job(0, (Switch(0, "m-b"), Prefill(0, "m-b", ("r",)))),
                             {"r": (tuple(PROMPT), SEEDED)}, export_after_prefill=True))
        prefilled = listener.until_done(streams)
        pool.run(1, JobInput(Job(1, (SwapIn(1, "m-b", ("r",)), Switch(1, "m-b"),
                                     Decode(1, "m-b", ("r",), FOREVER))),
                             handoffs=prefilled.handoffs))
        decoded = listener.until_done(streams)
    finally:
        pool.close()
    [want] = standalone(checkpoints["m-b"], [PROMPT], [SEEDED])
    streams.assert_matches({"r": want})
    assert decoded.results == (DecodeDone(1, "m-b", ("r",), 19, ("r",)),)
    assert prefilled.kv_pages_used == decoded.kv_pages_used == 0
