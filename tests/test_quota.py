"""Decode time quotas of one weighted-round-robin round (schedulers/quota.py, DESIGN §3.2).

Hand-computed cases write out n_i = TBT_i / d_i, S = sum 1/n_i, alpha and q_i. The property
test checks the point of the formula: each batch's mean token gap over a round is
alpha * TBT_i. Round length = sum q + c0 = c0 * alpha / (alpha - S), and batch i emits
q_i / d_i = c0 / (TBT_i * (alpha - S)) tokens per round, so the gap is alpha * TBT_i for any
alpha > S, floored or not: with the floor the identity holds with the floored alpha (the
round is then shorter than needed, and the longest quota falls below q_max).
"""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenpool.schedulers.quota import (ALPHA_FLOOR, Q_MAX_S, RoundQuotas, round_alpha,
                                        round_quotas)

approx = pytest.approx


def mean_gaps(step_times, tbt_slos, switch_time, quotas):
    """Per batch: round length / tokens the batch emits in a round."""
    round_s = sum(quotas) + switch_time
    return [round_s / (q / d) for q, d in zip(quotas, step_times)]


def test_alpha_floor_applies():
    # d 0.01, TBT 0.1: n = 10, S = 0.1; c0 = 1: raw alpha = 1 / (10 * 4) + 0.1 = 0.125 < 0.5
    r = round_quotas([0.01], [0.1], 1.0)
    assert r.alpha == ALPHA_FLOOR
    assert not r.overloaded
    # q = 1 / (10 * (0.5 - 0.1)) = 0.25, below Q_max; round 1.25 s for 25 tokens: gap 0.05
    assert r.quotas == approx((0.25,))
    assert mean_gaps([0.01], [0.1], 1.0, r.quotas) == approx([0.5 * 0.1])


def test_single_batch_unfloored_gets_q_max():
    # d 0.05, TBT 0.1: n = 2, S = 0.5; c0 = 2: alpha = 2 / (2 * 4) + 0.5 = 0.75
    r = round_quotas([0.05], [0.1], 2.0)
    assert r.alpha == approx(0.75)
    # q = 2 / (2 * 0.25) = 4 = Q_max; round 6 s for 80 tokens: gap 0.075 = 0.75 * 0.1
    assert r.quotas == approx((Q_MAX_S,))
    assert mean_gaps([0.05], [0.1], 2.0, r.quotas) == approx([0.075])


def test_unequal_step_times():
    # d 0.02 / 0.04, TBT 0.1: n = 5 / 2.5, S = 0.2 + 0.4 = 0.6; c0 = 2:
    # alpha = 2 / (2.5 * 4) + 0.6 = 0.8; q1 = 2 / (5 * 0.2) = 2, q2 = 2 / (2.5 * 0.2) = 4
    r = round_quotas([0.02, 0.04], [0.1, 0.1], 2.0)
    assert r.alpha == approx(0.8)
    assert r.quotas == approx((2.0, 4.0))
    # round 8 s; batch 1 emits 2 / 0.02 = 100 tokens, batch 2 4 / 0.04 = 100: gaps 0.08
    assert mean_gaps([0.02, 0.04], [0.1, 0.1], 2.0, r.quotas) == approx([0.08, 0.08])


def test_unequal_tbt_slos():
    # d 0.01 both, TBT 0.1 / 0.05: n = 10 / 5, S = 0.3; c0 = 1:
    # alpha = 1 / (5 * 4) + 0.3 = 0.35 -> floored to 0.5; q1 = 1 / (10 * 0.2) = 0.5,
    # q2 = 1 / (5 * 0.2) = 1.0; round 2.5 s: batch 1 50 tokens (gap 0.05 = 0.5 * 0.1),
    # batch 2 100 tokens (gap 0.025 = 0.5 * 0.05)
    r = round_quotas([0.01, 0.01], [0.1, 0.05], 1.0)
    assert r.alpha == ALPHA_FLOOR
    assert r.quotas == approx((0.5, 1.0))
    assert mean_gaps([0.01, 0.01], [0.1, 0.05], 1.0, r.quotas) == approx([0.05, 0.025])


def test_overload():
    # d 0.05 both, TBT 0.1: n = 2 / 2, S = 1.0; c0 = 0.8: alpha = 0.8 / (2 * 4) + 1 = 1.1
    r = round_quotas([0.05, 0.05], [0.1, 0.1], 0.8)
    assert r.alpha == approx(1.1)
    assert r.overloaded
    # q = 0.8 / (2 * 0.1) = 4 each; round 8.8 s for 80 tokens each: gap 0.11 = 1.1 * 0.1
    assert r.quotas == approx((4.0, 4.0))
    assert mean_gaps([0.05, 0.05], [0.1, 0.1], 0.8, r.quotas) == approx([0.11, 0.11])


def test_alpha_exactly_one_is_not_overload():
    # d 0.025 both, TBT 0.1: n = 4, S = 0.5; c0 = 4, q_max = 2: alpha = 4 / 8 + 0.5 = 1.0
    r = round_quotas([0.025, 0.025], [0.1, 0.1], 4.0, q_max=2.0)
    assert r.alpha == 1.0
    assert not r.overloaded


def test_zero_switch_time():
    # S = 0.1 < 0.5: alpha is the floor; nothing to amortise, so every batch gets Q_max
    assert round_quotas([0.01, 0.01], [0.1, 0.1], 0.0) == RoundQuotas(0.5, (4.0, 4.0))
    # d 0.2 > TBT 0.1: n = 0.5, S = 2: overloaded even without a switch
    r = round_quotas([0.2], [0.1], 0.0, q_max=1.5)
    assert r == RoundQuotas(2.0, (1.5,))
    assert r.overloaded


@pytest.mark.parametrize("args", [
    ([], [], 1.0),  # no batch
    ([0.01], [0.1, 0.1], 1.0),  # lengths differ
    ([0.0], [0.1], 1.0),
    ([0.01, -0.01], [0.1, 0.1], 1.0),
    ([0.01], [0.0], 1.0),
    ([0.01], [0.1], -1.0),
    ([0.01], [0.1], 1.0, 0.0),  # q_max 0 (was a ZeroDivisionError)
    ([0.01], [0.1], 1.0, -4.0),  # (gave negative quotas when S > 0.5)
    ([0.1, math.nan], [0.1, 0.1], 1.0),  # (nan alpha: silently "not overloaded")
    ([0.01], [math.nan], 1.0),
    ([0.01], [0.1], math.nan),
    ([0.01], [0.1], math.inf),  # (inf alpha, nan quotas)
    ([0.01], [0.1], 1.0, math.inf),
])
def test_invalid_inputs_raise(args):
    with pytest.raises(ValueError):
        round_quotas(*args)


batches = st.integers(1, 8).flatmap(lambda m: st.tuples(
    st.lists(st.floats(1e-3, 1.0), min_size=m, max_size=m),   # step times
    st.lists(st.floats(1e-2, 1.0), min_size=m, max_size=m)))  # TBT SLOs


@settings(max_examples=300, deadline=None)
@given(batch=batches, switch_time=st.floats(1e-3, 10.0), q_max=st.floats(0.1, 10.0))
def test_mean_gap_is_alpha_times_tbt(batch, switch_time, q_max):
    step_times, tbt_slos = batch
    r = round_quotas(step_times, tbt_slos, switch_time, q_max)
    inv_sum = sum(d / slo for d, slo in zip(step_times, tbt_slos))
    raw_alpha = switch_time / (min(s / d for s, d in zip(tbt_slos, step_times)) * q_max) + inv_sum
    assert r.alpha == approx(max(raw_alpha, ALPHA_FLOOR))
    assert r.overloaded == (r.alpha > 1.0)
    assert all(q > 0 for q in r.quotas)
    gaps = mean_gaps(step_times, tbt_slos, switch_time, r.quotas)
    # alpha - S cancels digits when the switch term is tiny next to S: hence rel 1e-6
    assert gaps == approx([r.alpha * slo for slo in tbt_slos], rel=1e-6)
    if raw_alpha >= ALPHA_FLOOR:  # unfloored: the tightest batch gets exactly q_max
        assert max(r.quotas) == approx(q_max, rel=1e-6)
    else:  # floored: shorter quotas, the same identity with the floored alpha
        assert max(r.quotas) < q_max


@settings(max_examples=100, deadline=None)
@given(batch=batches, switch_time=st.floats(0.0, 10.0), q_max=st.floats(0.1, 10.0))
def test_round_alpha_is_the_alpha_of_round_quotas(batch, switch_time, q_max):
    """Placement compares workers by `round_alpha`: the very alpha their round would get."""
    step_times, tbt_slos = batch
    assert round_alpha(step_times, tbt_slos, switch_time, q_max) == \
        round_quotas(step_times, tbt_slos, switch_time, q_max).alpha


def test_a_vanishing_switch_time_takes_the_formulas_limit():
    # alpha = 2e-313 / (1 * 1) + 1 rounds to 1 = sum 1/n: q = c0 / (n * 0) would divide by 0.
    r = round_quotas([1.0, 0.5], [1.0, 1.0], 2.2250738585e-313, q_max=1.0)
    assert r.alpha == 1.5 and r.quotas == (1.0, 0.5)  # q_max * min n / n_i: n = 1, 2
