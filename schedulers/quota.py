"""Decode time quotas for one round of weighted round robin (Aegaeon, DESIGN §3.2).

For batches i of a round: `d_i` is the predicted decode step time, `n_i = TBT_SLO_i / d_i`
the steps batch i may take per TBT period, and `c0` the switch time paid per round (the sum
over the round's distinct models). With `Q_max` the longest quota:

    alpha = max(c0 / (min_j n_j * Q_max) + sum_j 1/n_j, 0.5)
    q_i   = c0 / (n_i * (alpha - sum_j 1/n_j))

Each batch's mean token gap over the round is then `alpha * TBT_SLO_i`; `alpha > 1` means the
round cannot meet every TBT SLO (an overload signal for admission and placement).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

ALPHA_FLOOR = 0.5
Q_MAX_S = 4.0


@dataclass(frozen=True, slots=True)
class RoundQuotas:
    alpha: float
    quotas: tuple[float, ...]  # seconds of decoding per batch, in round order

    @property
    def overloaded(self) -> bool:
        return self.alpha > 1.0


def round_quotas(step_times: list[float], tbt_slos: list[float], switch_time: float,
                 q_max: float = Q_MAX_S) -> RoundQuotas:
    """Quotas for batches with predicted step times `step_times` and their TBT SLOs.

    With no switch cost (one model, or switches fully hidden) any quota keeps up; each batch
    then gets the longest one, `q_max`.
    """
    n, inv_sum, alpha = _steps_per_slo_and_alpha(step_times, tbt_slos, switch_time, q_max)
    if switch_time == 0.0:
        return RoundQuotas(alpha, tuple(q_max for _ in n))
    if alpha - inv_sum <= 0.0:
        # A switch time so small next to sum 1/n that alpha rounds to it: the formula's
        # limit, q_i = q_max * min_j n_j / n_i (alpha unfloored), instead of dividing by 0.
        return RoundQuotas(alpha, tuple(q_max * min(n) / x for x in n))
    return RoundQuotas(alpha, tuple(switch_time / (x * (alpha - inv_sum)) for x in n))


def round_alpha(step_times: list[float], tbt_slos: list[float], switch_time: float,
                q_max: float = Q_MAX_S, floor: float = ALPHA_FLOOR) -> float:
    """The alpha alone of a round of these batches. `floor=0` gives the formula's value
    below the 0.5 floor: how loaded a lightly loaded worker is, which the floor hides."""
    return _steps_per_slo_and_alpha(step_times, tbt_slos, switch_time, q_max, floor)[2]


def _steps_per_slo_and_alpha(step_times: list[float], tbt_slos: list[float],
                             switch_time: float, q_max: float, floor: float = ALPHA_FLOOR):
    """(n_i, sum 1/n_i, alpha) for the formula in the module docstring."""
    if not step_times or len(step_times) != len(tbt_slos):
        raise ValueError("need one TBT SLO per batch, and at least one batch")
    if not (min(step_times) > 0 and min(tbt_slos) > 0 and switch_time >= 0 and q_max > 0
            and math.isfinite(sum(step_times) + sum(tbt_slos) + switch_time + q_max)):
        raise ValueError("step times, SLOs, q_max must be finite and > 0; switch time >= 0")
    n = [slo / d for slo, d in zip(tbt_slos, step_times)]
    inv_sum = sum(1.0 / x for x in n)
    alpha = max(switch_time / (min(n) * q_max) + inv_sum, floor)
    return n, inv_sum, alpha
