"""Token timelines, run summaries and sweep read-outs (sim/timelines.py, DESIGN §8).

Hand-computed cases spell out the deadline arithmetic; a hypothesis test checks the O(1)
closed form of `emit_evenly` against emitting the same tokens one by one.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenpool.sim.timelines import (TokenTimeline, max_at_90, meets_slos, percentile,
                                          summarize, sustainable_rate, weighted_percentile)

approx = pytest.approx


def make_timeline(arrival=0.0, ttft_slo=1.0, tbt_slo=0.1) -> TokenTimeline:
    return TokenTimeline(arrival, ttft_slo, tbt_slo)


# -- hand-computed cases (arrival 0, TTFT_SLO 1, TBT_SLO 0.1 unless said) ------------------------

def test_on_time_throughout_banks_slack():
    tl = make_timeline()
    tl.emit(0.5)  # D1 = 1.0: on time, D2 = 1.0 + 0.1 = 1.1 (slack kept, not 0.5 + 0.1)
    tl.emit_evenly(0.5, 0.05, 10)  # 0.55 .. 1.00 vs deadlines 1.1 .. 2.0: all on time
    assert tl.num_tokens == 11
    assert tl.late_time == 0.0
    assert tl.next_deadline == approx(2.1)  # 1.1 + 10 * 0.1
    assert tl.attainment == 1.0
    assert tl.ttft == 0.5
    assert tl.last_time == approx(1.0)
    assert tl.mean_tpot == approx(0.05)  # (1.0 - 0.5) / 10


def test_slack_runs_out_mid_run():
    tl = make_timeline()
    tl.emit(0.2)  # on time; D2 = 1.1
    # step 0.3 > TBT: tokens 0.5 0.8 1.1 1.4 1.7 vs deadlines 1.1 1.2 1.3 1.4 1.5:
    # on time (slack 0.6, 0.4, 0.2, 0.0), then the 5th is late by 1.7 - 1.5 = 0.2
    tl.emit_evenly(0.2, 0.3, 5)
    assert tl.late_time == approx(0.2)
    assert tl.next_deadline == approx(1.8)  # restarted: 1.7 + 0.1
    assert tl.attainment == approx(1 - 0.2 / 1.7)


def test_late_first_token_then_on_time():
    tl = make_timeline()
    # step 0.05 <= TBT: tokens 1.05 1.10 1.15 1.20; D1 = 1.0 so token 1 is late by 0.05,
    # then D2 = 1.05 + 0.1 = 1.15, D3 = 1.25, D4 = 1.35: all on time
    tl.emit_evenly(1.0, 0.05, 4)
    assert tl.ttft == approx(1.05)
    assert tl.late_time == approx(0.05)
    assert tl.next_deadline == approx(1.45)  # 1.05 + 4 * 0.1
    assert tl.attainment == approx(1 - 0.05 / 1.2)  # service time 1.2


def test_late_first_token_and_every_token_after():
    tl = make_timeline()
    # step 0.3 > TBT: tokens 1.3 1.6 1.9 2.2; late 0.3 (D1 = 1.0), then each deadline is the
    # previous token + 0.1, so each later token is late by 0.3 - 0.1 = 0.2: 0.3 + 3 * 0.2 = 0.9
    tl.emit_evenly(1.0, 0.3, 4)
    assert tl.late_time == approx(0.9)
    assert tl.next_deadline == approx(2.3)
    assert tl.attainment == approx(1 - 0.9 / 2.2)
    assert tl.mean_tpot == approx(0.3)


def test_single_emits_restart_the_schedule_after_a_miss():
    tl = make_timeline(tbt_slo=0.5)
    tl.emit(2.0)  # D1 = 1.0: late 1.0, D2 = 2.0 + 0.5 = 2.5
    tl.emit(2.4)  # on time, D3 = 2.5 + 0.5 = 3.0
    tl.emit(3.2)  # late 0.2, D4 = 3.7
    assert tl.late_time == approx(1.2)
    assert tl.next_deadline == approx(3.7)
    assert tl.attainment == approx(1 - 1.2 / 3.2)  # 0.625
    assert tl.mean_tpot == approx(0.6)  # (3.2 - 2.0) / 2
    assert tl.gap_runs == [(approx(0.4), 1), (approx(0.8), 1)]


def test_gap_runs_of_a_run_after_a_token():
    tl = make_timeline()
    tl.emit(0.5)
    tl.emit_evenly(2.0, 0.05, 3)  # 2.05 2.10 2.15: one gap 1.55, then two of 0.05
    assert tl.gap_runs == [(approx(1.55), 1), (0.05, 2)]
    assert sum(c for _, c in tl.gap_runs) == tl.num_tokens - 1


def test_empty_and_degenerate_timelines():
    tl = make_timeline(arrival=3.0)
    assert (tl.num_tokens, tl.ttft, tl.last_time, tl.attainment) == (0, None, None, 0.0)
    assert tl.mean_tpot == 0.0
    tl.emit_evenly(3.0, 0.1, 0)  # no tokens: a no-op
    assert tl.num_tokens == 0
    tl.emit(3.0)  # zero service time counts as fully on time
    assert tl.attainment == 1.0 and tl.mean_tpot == 0.0


@pytest.mark.parametrize("call", [
    lambda tl: tl.emit(-0.1),  # before arrival
    lambda tl: tl.emit_evenly(0.0, -0.1, 3),
    lambda tl: tl.emit_evenly(0.0, 0.1, -1),
])
def test_bad_input_raises(call):
    with pytest.raises(ValueError):
        call(make_timeline())


def test_tokens_must_not_go_back_in_time():
    tl = make_timeline()
    tl.emit(1.0)
    with pytest.raises(ValueError):
        tl.emit_evenly(0.5, 0.1, 2)  # first token at 0.6 < 1.0


@pytest.mark.parametrize("ttft_slo, tbt_slo", [(0.0, 0.1), (1.0, 0.0), (-1.0, 0.1)])
def test_slos_must_be_positive(ttft_slo, tbt_slo):
    with pytest.raises(ValueError):
        TokenTimeline(0.0, ttft_slo, tbt_slo)


def test_attainment_at_counts_a_pending_token_as_late():
    tl = make_timeline()
    tl.emit(0.5)  # D2 = 1.1
    # cut off at 3.1 with no second token: late 3.1 - 1.1 = 2.0 of a service time of 3.1
    assert tl.attainment_at(3.1) == approx(1 - 2.0 / 3.1)
    assert tl.attainment_at(1.0) == 1.0  # not due yet
    assert tl.attainment == 1.0  # the plain score only sees emitted tokens


# -- closed form vs token by token -----------------------------------------------------------

runs = st.lists(st.tuples(st.floats(0.0, 5.0),  # wait before the run's t0
                          st.floats(0.0, 1.0),  # step
                          st.integers(1, 60),   # k
                          st.booleans()),       # emit a single token before the run
                min_size=1, max_size=8)


@settings(max_examples=400, deadline=None)
@given(arrival=st.floats(0.0, 1000.0), ttft_slo=st.floats(0.01, 10.0),
       tbt_slo=st.floats(0.001, 1.0), plan=runs)
def test_emit_evenly_matches_token_by_token(arrival, ttft_slo, tbt_slo, plan):
    fast = TokenTimeline(arrival, ttft_slo, tbt_slo)
    slow = TokenTimeline(arrival, ttft_slo, tbt_slo)
    now = arrival
    for wait, step, k, single in plan:
        t0 = now + wait
        if single:
            fast.emit(t0)
            slow.emit(t0)
        fast.emit_evenly(t0, step, k)
        for j in range(1, k + 1):
            slow.emit(t0 + j * step)
        now = t0 + k * step
    close = dict(rel=1e-9, abs=1e-9)
    assert fast.num_tokens == slow.num_tokens
    assert fast.ttft == approx(slow.ttft, **close)
    assert fast.last_time == approx(slow.last_time, **close)
    assert fast.late_time == approx(slow.late_time, **close)
    assert fast.next_deadline == approx(slow.next_deadline, **close)
    assert fast.attainment == approx(slow.attainment, **close)
    assert fast.mean_tpot == approx(slow.mean_tpot, **close)
    assert sum(c for _, c in fast.gap_runs) == fast.num_tokens - 1
    assert sum(g * c for g, c in fast.gap_runs) == approx(sum(g for g, _ in slow.gap_runs), **close)
    # Lateness is exactly how far the schedule was pushed back (the telescoping identity).
    pushed = fast.next_deadline - arrival - ttft_slo - fast.num_tokens * tbt_slo
    assert fast.late_time == approx(pushed, rel=1e-9, abs=1e-6)
    assert 0.0 <= fast.attainment <= 1.0


# -- summaries -------------------------------------------------------------------------------

def test_nearest_rank_percentiles():
    assert percentile([0.4, 0.1, 0.3, 0.2], 50) == 0.2  # rank ceil(0.5 * 4) = 2
    assert percentile([0.4, 0.1, 0.3, 0.2], 99) == 0.4  # rank ceil(3.96) = 4
    assert percentile([7.0], 1) == 7.0
    assert percentile([], 50) is None
    # 99 gaps of 0.05 and one of 1.0: rank 99 of 100 is still 0.05; with two 1.0s it is 1.0
    assert weighted_percentile([1.0, 0.05], [1, 99], 99) == 0.05
    assert weighted_percentile([1.0, 0.05], [2, 98], 99) == 1.0
    with pytest.raises(ValueError):
        percentile([1.0], 0)


def _finished(arrival, first, step, k, ttft_slo=1.0, tbt_slo=0.1):
    tl = TokenTimeline(arrival, ttft_slo, tbt_slo)
    tl.emit(first)
    tl.emit_evenly(first, step, k)
    tl.finish()
    return tl


def test_summary_of_a_tiny_run():
    good = _finished(0.0, 0.2, 0.05, 4)  # TTFT 0.2, TPOT 0.05, all on time
    slow = _finished(1.0, 1.5, 0.2, 2)  # TTFT 0.5 ok; TPOT 0.2 > 0.1: misses goodput
    # tokens 1.7 (D2 = 2.1, on time), 1.9 (D3 = 2.2, on time): attainment 1.0
    late = _finished(2.0, 4.0, 0.05, 1)  # TTFT 2.0 > 1.0; late 4.0 - 3.0 = 1.0 of 2.05
    waiting = TokenTimeline(3.0, 1.0, 0.1)  # never served: attainment 0
    s = summarize([good, slow, late, waiting], duration_s=10.0)
    assert s["requests"] == 4 and s["finished"] == 3
    assert s["slo_attainment"] == approx((1.0 + 1.0 + (1 - 1.0 / 2.05) + 0.0) / 4)
    assert s["slo_met_fraction"] == 0.25  # only `good`
    assert s["goodput_rps"] == approx(0.1)  # 1 request / 10 s
    assert s["ttft_p50_s"] == approx(0.5)  # TTFTs 0.2 0.5 2.0: rank ceil(1.5) = 2
    assert s["ttft_p99_s"] == approx(2.0)
    # gaps: good 4 x 0.05, slow 2 x 0.2, late 1 x 0.05: 7 gaps, rank ceil(6.93) = 7 -> 0.2
    assert s["tbt_p99_s"] == approx(0.2)


def test_summary_slo_overrides_and_cutoff():
    slow = _finished(1.0, 1.5, 0.2, 2)
    assert not meets_slos(slow)
    assert meets_slos(slow, tbt_slo=0.25)  # a looser SLO passed to the summary wins
    assert summarize([slow], 1.0, None, 0.25)["slo_met_fraction"] == 1.0
    stuck = make_timeline()
    stuck.emit(0.5)  # unfinished, next due 1.1
    assert summarize([stuck], 10.0)["slo_attainment"] == 1.0
    assert summarize([stuck], 10.0, now=3.1)["slo_attainment"] == approx(1 - 2.0 / 3.1)
    assert not meets_slos(stuck)  # unfinished requests never count toward goodput


def test_empty_summary():
    s = summarize([], 5.0)
    assert s["requests"] == 0 and s["goodput_rps"] == 0.0
    assert s["slo_attainment"] is None and s["ttft_p99_s"] is None and s["tbt_p99_s"] is None
    with pytest.raises(ValueError):
        summarize([], 0.0)


# -- sweeps ----------------------------------------------------------------------------------

def _sweep(pairs, key="num_models", metric="slo_attainment"):
    return [{key: x, metric: v} for x, v in pairs]


@pytest.mark.parametrize("pairs, expected", [
    ([(2, 0.99), (4, 0.95), (6, 0.91), (8, 0.6)], 6),
    ([(8, 0.6), (2, 0.99), (6, 0.91), (4, 0.95)], 6),  # order of points does not matter
    ([(2, 0.99), (4, 0.9), (6, 0.89)], 4),  # exactly 0.9 passes
    ([(2, 0.99), (4, 0.95)], 4),  # never fails: the largest measured x
    ([(2, 0.8), (4, 0.95)], None),  # the smallest x fails already
    ([(2, 0.99), (4, 0.7), (6, 0.93)], 2),  # a recovery after the first crossing is noise
    ([(2, 0.99), (4, 0.95), (4, 0.85), (6, 0.95)], 2),  # every point at x must pass
    ([(2, 0.99), (4, None)], 2),  # an undefined metric fails
    ([], None),
])
def test_max_at_90(pairs, expected):
    assert max_at_90(_sweep(pairs), "num_models") == expected


def test_sustainable_rate_reads_slo_met_fraction():
    points = [{"rate": r, "slo_met_fraction": f, "slo_attainment": 1.0}
              for r, f in [(0.5, 0.99), (1.0, 0.92), (1.5, 0.88), (2.0, 0.5)]]
    assert sustainable_rate(points) == 1.0
    assert max_at_90(points, "rate") == 2.0  # the other metric tells another story
