"""The policies on hand-built situations, and the simulator's determinism (issue 4)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tokenpool.schedulers.cost import CostModel, Linear3, ModelCost
from tokenpool.schedulers.decode import WeightedRoundRobinDecode
from tokenpool.schedulers.prefill import GroupedFCFSPrefill
from tokenpool.schedulers.registry import Roles, UnknownSchedulerError, make_scheduler
from tokenpool.schedulers.request_level import RequestLevelScheduler, static_placement
from tokenpool.schedulers.types import (SLO, Decode, DecodeDone, Job, Prefetch, Prefill,
                                        PrefillDone, RequestInfo, SwapIn, SwapOut, Switch)

WORKLOADS = Path(__file__).resolve().parents[2] / "shared" / "data" / "aegaeon" / "workloads"
SIM_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "sim" / "aegaeon-h800.yaml"
GiB = 1 << 30


def cost(models=("a", "b", "c"), kv_tokens: int = 10_000) -> CostModel:
    # Prefill 10 ms + 0.1 ms/token; decode 10 ms + 1 ms per request; switch 1 s (1 GiB at 1 GiB/s).
    spec = ModelCost(Linear3(0.01, 1e-4, 0.0), Linear3(0.01, 1e-3, 0.0), GiB, 1024)
    return CostModel({m: spec for m in models}, float(GiB), 1024 * kv_tokens)


def req(i: int, model: str, prompt: int = 100, t: float = 0.0) -> RequestInfo:
    return RequestInfo(f"r{i}", model, prompt, t, 16)


# -- grouped FCFS prefill ----------------------------------------------------------------------

def test_prefill_groups_a_model_then_opens_groups_on_the_least_loaded_worker():
    p = GroupedFCFSPrefill([0, 1], cost(), max_group_size=2)
    for i, model in enumerate(["a", "a", "a", "b"]):
        p.add_request(req(i, model))
    q0, q1 = p.queues[0], p.queues[1]
    assert [(g.model, [r.request_id for r in g.requests]) for g in q0.groups] == \
        [("a", ["r0", "r1"])]
    # r2 finds a's group full and opens one on the idle worker. b opens a group where less
    # is queued: worker 1 (switch 1 s + 20 ms of prefill) beats worker 0 (1 s + 30 ms).
    assert [(g.model, len(g.requests)) for g in q1.groups] == [("a", 1), ("b", 1)]


def test_prefill_job_switches_once_prefetches_the_next_model_and_prefills_each_request():
    p = GroupedFCFSPrefill([0], cost(), max_group_size=8)
    for i, model in enumerate(["a", "a", "b"]):
        p.add_request(req(i, model))
    job = p.next_job(0)
    assert job.units == (Switch(0, "a"), Prefetch(0, "b"), Prefill(0, "a", ("r0",)),
                         Prefill(0, "a", ("r1",)))
    assert p.next_job(0).units == (Switch(0, "b"), Prefill(0, "b", ("r2",)))
    assert p.next_job(0) is None


# -- weighted round robin decode ---------------------------------------------------------------

def test_decode_round_gives_each_model_a_turn_with_formula_quotas_and_swaps():
    # KV room for 250 tokens: the round's 303 do not fit at once, so turns swap out.
    d = WeightedRoundRobinDecode([0], cost(kv_tokens=250), q_max_s=4.0)
    for i, model in enumerate(["a", "b", "a"]):
        d.place(f"r{i}", model, 101, tbt_slo=0.1)
    first = d.next_job(0)
    # Batches: a (r0, r2) and b (r1). d_a = 0.012, d_b = 0.011; n = 8.33, 9.09;
    # sum 1/n = 0.23; c0 = 2 s; alpha = 2 / (8.33 * 4) + 0.23 = 0.29 -> floor 0.5;
    # q_a = 2 / (8.33 * 0.27) = 0.889 s.
    decode = next(u for u in first.units if isinstance(u, Decode))
    assert decode.request_ids == ("r0", "r2") and decode.quota_s == pytest.approx(0.8889, 1e-3)
    assert isinstance(first.units[0], SwapIn) and Switch(0, "a") in first.units
    assert Prefetch(0, "b") in first.units and isinstance(first.units[-1], SwapOut)
    assert d.workers[0].alpha == 0.5
    d.decoded(0, ("r0", "r2"), steps=5, finished=("r2",))
    second = d.next_job(0)
    assert Switch(0, "b") in second.units and not isinstance(second.units[-1], SwapOut)
    assert d.workers[0].requests["r0"].context == 106
    d.decoded(0, ("r1",), steps=5, finished=("r1",))
    third = d.next_job(0)  # a new round, r0 alone: its KV back, a switched in, no swap out.
    # d = 0.011, n = 9.09, c0 = 1 s: alpha = max(1 / 36.4 + 0.11, 0.5) = 0.5,
    # q = 1 / (9.09 * 0.39) = 0.282 s.
    assert third.units[:2] == (SwapIn(0, "a", ("r0",)), Switch(0, "a"))
    assert third.units[2] == Decode(0, "a", ("r0",), pytest.approx(0.28205, 1e-4))
    assert len(third.units) == 3


def test_turns_keep_kv_on_the_device_when_the_round_fits():
    d = WeightedRoundRobinDecode([0], cost(), q_max_s=4.0)
    for i, model in enumerate(["a", "b", "a"]):
        d.place(f"r{i}", model, 101, tbt_slo=0.1)
    first = d.next_job(0)
    assert isinstance(first.units[0], SwapIn)  # the hand-over from the prefill worker
    assert not any(isinstance(u, SwapOut) for u in first.units)
    d.decoded(0, ("r0", "r2"), steps=5, finished=())
    d.next_job(0)
    third = d.next_job(0)  # a's next turn: its KV stayed, so no swap-in either
    assert not any(isinstance(u, (SwapIn, SwapOut)) for u in third.units)


def test_a_new_request_joins_its_models_upcoming_turn():
    d = WeightedRoundRobinDecode([0, 1], cost())
    d.place("r0", "a", 100, 0.1)  # both idle: worker 0
    d.place("r1", "b", 100, 0.1, local=0)  # prefilled on worker 0, which also decodes
    d.next_job(0)  # the round starts with a's turn; b's is upcoming
    assert [t.model for t in d.workers[0].turns] == ["b"]
    assert d.place("r9", "b", 100, 0.1) == 0
    assert d.workers[0].turns[0].request_ids == ("r1", "r9")
    assert d.place("r10", "c", 100, 0.1) == 1  # no batch of c anywhere: the idler worker


# -- request level and static ------------------------------------------------------------------

def test_request_level_holds_a_model_until_its_requests_finish():
    s = RequestLevelScheduler([0], cost(), lambda m: SLO(10, 0.1))
    s.add_request(req(0, "a", t=0.0), 0.0)
    s.add_request(req(1, "b", t=0.5), 0.5)
    [job] = s.schedule({0}, 1.0)
    assert job.units == (Switch(0, "a"), Prefill(0, "a", ("r0",)))
    s.update([PrefillDone(0, "a", ("r0",), ())], 1.1)
    s.add_request(req(2, "a", t=1.2), 1.2)  # joins the worker already serving a
    [job] = s.schedule({0}, 1.2)
    assert job.units == (Prefill(0, "a", ("r2",), decode_ids=("r0",)),)  # r0 rides along
    s.update([PrefillDone(0, "a", ("r2",), (), decoded=("r0",))], 1.3)
    assert s.workers[0].running == {"r0": 101, "r2": 100}  # r0 got a token in that step
    [job] = s.schedule({0}, 1.3)
    assert job.units == (Decode(0, "a", ("r0", "r2"), 0.25, until_first_finish=True),)
    s.update([DecodeDone(0, "a", ("r0", "r2"), 10, ("r0", "r2"))], 1.6)
    [job] = s.schedule({0}, 1.6)  # free again: b, the oldest waiting model
    assert job.units[0] == Switch(0, "b")
    assert s.num_unfinished() == 1


def test_static_placement_gives_every_model_a_worker_then_spreads_by_load():
    assert static_placement({"a": 6, "b": 3, "c": 1}, list(range(5))) == \
        {"a": [0, 1, 2], "b": [3], "c": [4]}
    assert static_placement({"a": 1, "b": 5, "c": 2}, [0, 1]) == {"b": [0], "c": [1]}


def test_unknown_scheduler_is_named():
    with pytest.raises(UnknownSchedulerError, match="token-level"):
        make_scheduler("fifo", Roles((0,), (1,)), cost(), lambda m: SLO(1, 1))


# -- the simulator -----------------------------------------------------------------------------

def simulate_file(name: str, scheduler: str) -> dict:
    from tokenpool.sim import run as sim_run
    from tokenpool.sim.config import load_sim_config
    from tokenpool.sim.workload import load_aegaeon_csv

    config = load_sim_config(SIM_CONFIG)
    return sim_run.run_one(config, load_aegaeon_csv(WORKLOADS / name), scheduler,
                           config.slo)


@pytest.mark.parametrize("scheduler", ["token-level", "request-level", "request-level-plus",
                                       "static"])
def test_simulation_serves_every_request_and_is_deterministic(scheduler):
    first = simulate_file("synth-8-0.1-1.0-1.0.csv", scheduler)
    again = simulate_file("synth-8-0.1-1.0-1.0.csv", scheduler)
    assert json.dumps(first, sort_keys=True) == json.dumps(again, sort_keys=True)
    assert first["finished"] == first["requests"] == 81
    assert 0.9 <= first["slo_attainment"] <= 1.0
    assert (first["switches"] == 0) == (scheduler == "static")


def test_token_level_holds_80_models_where_request_level_does_not():
    """The artifact's largest rate-0.1 workload on the testbed config (docs/sim.md)."""
    token = simulate_file("synth-80-0.1-1.0-1.0.csv", "token-level")
    request = simulate_file("synth-80-0.1-1.0-1.0.csv", "request-level")
    assert token["slo_attainment"] >= 0.9 > request["slo_attainment"]
    assert token["ttft_p99_s"] < request["ttft_p99_s"]


# -- the simulated worker ----------------------------------------------------------------------

def sim_worker(requests: dict):
    from tokenpool.sim.worker import SimWorker

    return SimWorker(0, cost(), requests)


def sim_request(i: int, output_len: int, prompt: int = 100):
    from tokenpool.sim.timelines import TokenTimeline
    from tokenpool.sim.worker import SimRequest

    return SimRequest(f"r{i}", "a", prompt, output_len, TokenTimeline(0.0, 10.0, 0.1))


def test_sim_decode_turn_steps_analytically_between_completions():
    reqs = {"r0": sim_request(0, 4), "r1": sim_request(1, 10)}
    w = sim_worker(reqs)
    for r in reqs.values():
        r.timeline.emit(0.0)
        r.generate(1)
    end, done = w._decode(Decode(0, "a", ("r0", "r1"), quota_s=1.0), 0.0)
    # Two requests: 12 ms a step for 3 steps (r0 then has its 4 tokens), then r1 alone at
    # 11 ms a step for its 6 remaining: 0.036 + 0.066 = 0.102 s, well inside the quota.
    assert done.steps == 9 and done.finished == ("r0", "r1")
    assert end == pytest.approx(3 * 0.012 + 6 * 0.011)
    assert reqs["r0"].timeline.num_tokens == 4 and reqs["r1"].timeline.num_tokens == 10
    assert reqs["r1"].timeline.last_time == pytest.approx(end)


def test_sim_decode_turn_ends_at_its_quota_with_at_least_one_step():
    reqs = {"r0": sim_request(0, 1000)}
    w = sim_worker(reqs)
    end, done = w._decode(Decode(0, "a", ("r0",), quota_s=0.1), 5.0)
    assert done.steps == 9 and done.finished == ()  # int(0.1 / 0.011) steps
    end, done = w._decode(Decode(0, "a", ("r0",), quota_s=0.001), end)
    assert done.steps == 1  # a turn always makes progress


def test_sim_switch_waits_only_for_what_is_left_of_a_prefetch():
    from tokenpool.schedulers.types import Job

    w = sim_worker({})
    end, _ = w.run(Job(0, (Prefetch(0, "b"),)), 0.0)
    assert end == 0.0  # a background copy: the worker is free at once
    assert w.run(Job(0, (Switch(0, "b"),)), 0.4)[0] == pytest.approx(1.0)  # 1 s copy, 0.6 left
    assert w.run(Job(0, (Switch(0, "c"),)), 2.0)[0] == pytest.approx(3.0)  # not prefetched
    assert w.switches == 2


def test_colocated_prefill_avoids_a_worker_busy_decoding():
    from tokenpool.schedulers.token_level import TokenLevelScheduler

    s = TokenLevelScheduler([0, 1], [0, 1], cost(), lambda m: SLO(10, 0.1))
    s.add_request(req(0, "a"), 0.0)
    [job] = s.schedule({0}, 0.0)  # worker 1 is busy elsewhere; 0 prefills r0...
    s.update([PrefillDone(0, "a", ("r0",), ())], 0.1)  # ...and keeps it to decode
    [job] = s.schedule({0}, 0.1)  # its first round starts: it now has decode work in hand
    assert s.decode.workers[0].turn_s > 0
    s.add_request(req(1, "b"), 0.2)
    assert [g.model for g in s.prefill.queues[1].groups] == ["b"]  # not piled onto worker 0


def _decoding(s, worker: int, model: str, count: int, first: int = 1000) -> None:
    """Give a colocated worker `count` prefilled requests of `model` to decode."""
    for i in range(first, first + count):
        s.decode.place(f"r{i}", model, 101, s.slo_of(model).tbt_s, local=worker)


def test_colocated_requests_skip_an_open_group_where_decoding_them_would_break_tbt():
    from tokenpool.schedulers.token_level import TokenLevelScheduler

    # 50 ms TBT, decode steps of 10 ms + 1 ms per request: one model keeps up to 40 requests.
    s = TokenLevelScheduler([0, 1], [0, 1], cost(), lambda m: SLO(10, 0.05))
    s.add_request(req(0, "a"), 0.0)  # opens a group of "a" on worker 0
    _decoding(s, 0, "a", 45)  # worker 0's round now runs past the TBT SLO
    s.add_request(req(1, "a"), 0.0)
    groups = {w: [[r.request_id for r in g.requests] for g in q.groups]
              for w, q in s.prefill.queues.items()}
    assert groups == {0: [["r0"]], 1: [["r1"]]}  # not the open group: worker 1 decodes in time
    _decoding(s, 1, "a", 45, first=2000)
    s.add_request(req(2, "a"), 0.0)  # both overloaded: the usual placement (admission sheds)
    assert [r.request_id for r in s.prefill.queues[0].groups[0].requests] == ["r0", "r2"]


def test_colocated_requests_go_where_their_model_already_decodes():
    from tokenpool.schedulers.token_level import TokenLevelScheduler

    s = TokenLevelScheduler([0, 1], [0, 1], cost(), lambda m: SLO(10, 0.05))
    _decoding(s, 0, "b", 5)
    _decoding(s, 1, "a", 20, first=2000)  # busier, but a new batch on 0 would cost more
    s.add_request(req(0, "a"), 0.0)
    assert [g.model for g in s.prefill.queues[1].groups] == ["a"]
    assert not s.prefill.queues[0].groups


def _queued_models(s) -> dict[int, list[str]]:
    return {w: [g.model for g in q.groups] for w, q in s.prefill.queues.items()}


def test_colocated_requests_of_a_new_model_go_to_the_lighter_worker():
    from tokenpool.schedulers.token_level import TokenLevelScheduler

    # Worker 0 decodes two models; worker 1 nothing. Both rounds sit at the 0.5 floor, which
    # hid the difference: a new model went to worker 0, whose prefill queue was as empty.
    s = TokenLevelScheduler([0, 1], [0, 1], cost(), lambda m: SLO(10, 0.1))
    _decoding(s, 0, "a", 1)
    _decoding(s, 0, "b", 1, first=2000)
    s.add_request(req(0, "c"), 0.0)
    assert _queued_models(s) == {0: [], 1: ["c"]}


def test_colocated_requests_stay_with_their_model_while_its_round_is_light():
    from tokenpool.schedulers.token_level import TokenLevelScheduler

    # Worker 1 is idle, so its round would be lighter still (0.11 against 0.16), but below
    # the 0.5 floor the extra request costs worker 0 nothing and a batch of "a" on each
    # worker would cost a step on both.
    s = TokenLevelScheduler([0, 1], [0, 1], cost(), lambda m: SLO(10, 0.1))
    _decoding(s, 0, "a", 5)
    s.add_request(req(0, "a"), 0.0)
    assert _queued_models(s) == {0: ["a"], 1: []}


def test_colocated_placement_passes_over_a_worker_measured_too_slow_for_the_request():
    from tokenpool.schedulers.admission import SLOAdmission
    from tokenpool.schedulers.token_level import TokenLevelScheduler

    # 30 requests of "a": 41 ms steps by the profile (alpha 0.41 at a 100 ms TBT), 123 ms
    # as worker 0 has been running (slowdown 3): alpha 1.23. Placing by the profile put the
    # request there, and admission, which asks for the measured alpha, shed it while
    # worker 1 was idle.
    slo = SLO(10, 0.1)
    s = TokenLevelScheduler([0, 1], [0, 1], cost(), lambda m: slo)
    _decoding(s, 0, "a", 30)
    s.decode.workers[0].slowdown = 3.0
    assert SLOAdmission().decide(s, req(0, "a"), slo, num_waiting=0).admit
    s.add_request(req(0, "a"), 0.0)
    assert _queued_models(s) == {0: [], 1: ["a"]}
    _decoding(s, 1, "a", 30, first=2000)  # now no worker can take it: admission sheds
    s.decode.workers[1].slowdown = 3.0
    verdict = SLOAdmission().decide(s, req(1, "a"), slo, num_waiting=0)
    assert not verdict.admit and "decode is overloaded" in verdict.reason


def test_colocated_placement_ranks_by_the_profile_so_a_stale_measurement_starves_nobody():
    from tokenpool.schedulers.token_level import TokenLevelScheduler

    # Worker 0 was measured 3x slow long ago and has decoded nothing since; worker 1 decodes
    # "b". By the measured times worker 0 would look the busier (0.33 against 0.27) and
    # never be measured again; by the profile it is the lighter (0.11).
    s = TokenLevelScheduler([0, 1], [0, 1], cost(), lambda m: SLO(10, 0.1))
    s.decode.workers[0].slowdown = 3.0
    _decoding(s, 1, "b", 1)
    s.add_request(req(0, "c"), 0.0)
    assert _queued_models(s) == {0: ["c"], 1: []}


def test_a_colocated_prefill_carries_its_model_s_resident_decodes_and_counts_their_token():
    from tokenpool.schedulers.token_level import TokenLevelScheduler

    s = TokenLevelScheduler([0], [0], cost(), lambda m: SLO(10, 0.1))
    _decoding(s, 0, "a", 3)  # r1000-r1002 decode "a" on worker 0
    _decoding(s, 0, "b", 1, first=2000)
    s.decode.workers[0].requests["r1002"].resident = False  # swapped out: waits for its turn
    s.add_request(req(0, "a"), 0.0)
    [job] = s.schedule({0}, 0.0)
    [prefill] = [u for u in job.units if isinstance(u, Prefill)]
    assert prefill.request_ids == ("r0",) and prefill.decode_ids == ("r1000", "r1001")
    s.update([PrefillDone(0, "a", ("r0",), ("r1001",), decoded=("r1000", "r1001"))], 0.1)
    held = s.decode.workers[0].requests
    assert held["r1000"].context == 102 and "r1001" not in held and held["r1002"].context == 101
    assert "r0" in held and s.num_unfinished() == 1  # r0; the _decoding ones were placed only


def test_request_level_baselines_hold_the_worker_after_a_switch_and_token_level_never():
    from tokenpool.sim.worker import SimWorker

    slo = lambda m: SLO(10, 0.1)  # noqa: E731
    for name in ("request-level", "request-level-plus"):
        s = make_scheduler(name, Roles((0,), (0,)), cost(), slo, baseline_switch_overhead_s=2.5)
        s.add_request(req(0, "a"), 0.0)
        [job] = s.schedule({0}, 0.0)
        assert Switch(0, "a", 2.5) in job.units
        worker = SimWorker(0, cost(), {})
        assert worker.run(Job(0, (Switch(0, "a", 2.5),)), 0.0)[0] == pytest.approx(1.0 + 2.5)
    s = make_scheduler("token-level", Roles((0,), (0,)), cost(), slo,
                       baseline_switch_overhead_s=2.5)
    s.add_request(req(0, "a"), 0.0)
    [job] = s.schedule({0}, 0.0)
    assert Switch(0, "a") in job.units  # no overhead: tokenpool's own switch
