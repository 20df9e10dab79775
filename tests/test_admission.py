"""SLO admission (pure policy): sheds on the queue bound, the predicted TTFT and the decode
rounds' alpha, and lets an emptied pool admit again."""

from __future__ import annotations

import pytest
from test_schedulers import cost, req

from tokenpool.schedulers.admission import SLOAdmission
from tokenpool.schedulers.protocol import Estimate, Scheduler, WorkerPolicyState
from tokenpool.schedulers.registry import SCHEDULERS, Roles, make_scheduler
from tokenpool.schedulers.types import SLO, Decode, DecodeDone, Prefill, PrefillDone

SLO_ = SLO(2.0, 0.05)


def token_level():
    return make_scheduler("token-level", Roles((0,), (0,)), cost(), lambda m: SLO_,
                          q_max_s=0.5)


def test_the_queue_bound_sheds_whatever_the_policy():
    s = make_scheduler("request-level", Roles((0,), (0,)), cost(), lambda m: SLO_)
    verdict = SLOAdmission(max_waiting=3).decide(s, req(0, "a"), SLO_, num_waiting=3)
    assert not verdict.admit and "3 requests" in verdict.reason
    assert SLOAdmission(max_waiting=3).decide(s, req(0, "a"), SLO_, num_waiting=2).admit


def test_a_long_prefill_queue_sheds_on_predicted_ttft():
    s = token_level()
    admission = SLOAdmission(ttft_factor=1.0, max_alpha=1e9)
    for i in range(40):  # 40 x (10 ms + 1000 tokens x 0.1 ms) = 4.4 s queued, plus a switch
        s.add_request(req(i, "ab"[i % 2], prompt=1000), 0.0)
    assert s.prefill.predicted_ttft(req(99, "a", prompt=1000)) > SLO_.ttft_s
    verdict = admission.decide(s, req(99, "a", prompt=1000), SLO_, num_waiting=40)
    assert not verdict.admit and "time to first token" in verdict.reason


def test_decode_overload_sheds_and_an_emptied_pool_admits_again():
    s = token_level()
    admission = SLOAdmission(ttft_factor=1e9, max_alpha=1.0)
    models = "abc"
    for i in range(30):
        s.add_request(req(i, models[i % 3]), 0.0)
    while True:  # prefill all; three models' batches then share one decode worker
        jobs = s.schedule({0}, 0.0)
        prefills = [u for j in jobs for u in j.units if type(u) is Prefill]
        if not prefills:
            break
        s.update([PrefillDone(0, u.model, u.request_ids, ()) for u in prefills], 0.0)
    # Three models, 1 s switches, 50 ms TBT: far past alpha 1.
    assert s.decode.predicted_alpha(req(99, "a"), SLO_.tbt_s) > 1.0
    assert not admission.decide(s, req(99, "a"), SLO_, num_waiting=0).admit
    everyone = tuple(f"r{i}" for i in range(30))
    for model in models:
        ids = tuple(r for i, r in enumerate(everyone) if models[i % 3] == model)
        s.update([DecodeDone(0, model, ids, 1, ids)], 1.0)
    assert s.num_unfinished() == 0
    assert s.decode.workers[0].alpha > 1.0  # the last round's, stale
    assert admission.decide(s, req(99, "a"), SLO_, num_waiting=0).admit


def test_colocated_admission_checks_the_worker_the_request_would_decode_on():
    from test_schedulers import _decoding

    s = make_scheduler("token-level", Roles((0, 1), (0, 1)), cost(), lambda m: SLO_)
    s.add_request(req(0, "a"), 0.0)  # an open group of "a" on worker 0, which r99 would join
    _decoding(s, 0, "a", 90)  # steps of 100 ms against 50 ms TBT: alpha 2
    _decoding(s, 1, "a", 50, first=2000)  # 60 ms: alpha 1.2, over 1 too, so no way around 0
    assert s.decode.predicted_alpha(req(99, "a"), SLO_.tbt_s) < 1.5  # the best worker's...
    assert s.decode.predicted_alpha(req(99, "a"), SLO_.tbt_s, worker=0) > 1.5  # ...is not r99's
    verdict = SLOAdmission(ttft_factor=1e9, max_alpha=1.5).decide(s, req(99, "a"), SLO_, 0)
    assert not verdict.admit and "decode is overloaded" in verdict.reason


def test_colocated_predicted_ttft_waits_for_one_decode_turn_not_the_round():
    from test_schedulers import _decoding

    s = make_scheduler("token-level", Roles((0,), (0,)), cost(), lambda m: SLO_, q_max_s=0.5)
    _decoding(s, 0, "a", 5)
    _decoding(s, 0, "b", 5, first=2000)
    [job] = s.schedule({0}, 0.0)  # a round of two turns starts: prefill runs after this one
    w = s.decode.workers[0]
    (running,) = [u for u in job.units if type(u) is Decode]
    assert w.turns and running.quota_s == w.turn_s > 0  # a turn in progress, another to come
    c = s.prefill.cost
    own = c.switch_time("c") + c.prefill_time("c", [100])
    assert s.prefill.predicted_ttft(req(99, "c")) == pytest.approx(w.turn_s + own)


def test_a_worker_measured_slower_than_its_profile_sheds_what_the_profile_would_admit():
    tight = SLO(2.0, 0.02)  # a batch of two steps in 12 ms by the profile: alpha 0.6
    s = make_scheduler("token-level", Roles((0,), (0,)), cost(), lambda m: tight, q_max_s=0.5)
    admission = SLOAdmission(ttft_factor=1.0, max_alpha=1.0)
    s.add_request(req(0, "a"), 0.0)
    s.schedule({0}, 0.0)
    s.update([PrefillDone(0, "a", ("r0",), ())], 0.0)
    assert admission.decide(s, req(1, "a"), tight, num_waiting=0).admit
    for _ in range(20):  # its turns take 4x the profile's step time
        step = s.decode.cost.decode_step_time("a", 1, s.decode.workers[0].tokens["a"])
        s.update([DecodeDone(0, "a", ("r0",), 5, (), seconds=5 * 4 * step)], 0.0)
    assert s.decode.workers[0].slowdown > 3.9
    verdict = admission.decide(s, req(1, "a"), tight, num_waiting=0)
    assert not verdict.admit and "decode is overloaded" in verdict.reason


def test_every_policy_offers_the_scheduler_protocol_and_only_token_level_predicts():
    for name in SCHEDULERS:
        s = make_scheduler(name, Roles((0,), (0,)), cost(), lambda m: SLO_)
        assert isinstance(s, Scheduler) and s.name == name
        if name != "token-level":
            assert s.estimate(req(0, "a"), SLO_) is None and s.worker_state(0) is None
    s = token_level()
    s.add_request(req(0, "a"), 0.0)
    s.schedule({0}, 0.0)
    s.update([PrefillDone(0, "a", ("r0",), ())], 0.0)
    estimate = s.estimate(req(1, "a"), SLO_)
    assert type(estimate) is Estimate and estimate.predicted_ttft_s > 0
    assert estimate.round_alpha == s.decode.predicted_alpha(req(1, "a"), SLO_.tbt_s, 0)
    # No round yet: alpha 0; its load is what a round of its one request would take.
    assert s.worker_state(0) == WorkerPolicyState(1.0, 0.0, 1, s.decode.load(0))
    assert 0 < s.decode.load(0) < 0.5
    assert s.worker_state(7) is None
