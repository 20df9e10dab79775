"""SLO admission: shed a request at the door when the pool cannot meet its SLO (DESIGN §7).

Shedding early, with 429 / RESOURCE_EXHAUSTED, beats queueing work that every request would
then miss its SLO on. Signals, cheapest first:
- the pool-wide prefill queue is full (`max_waiting`): a bound on memory whatever the policy;
- the policy's `estimate` (token-level; the request-level baselines predict nothing): the
  predicted TTFT on the prefill worker placement picks (its queued groups' predicted work,
  switches included, plus this prompt) exceeds `ttft_factor` x the TTFT SLO;
- or the next decode round with this request added (colocated roles: on the worker it would
  prefill and so decode on) would run at an alpha above `max_alpha`, i.e. stretch every
  batch's token gap past its TBT SLO by that factor. The next round's alpha, not the last
  one's: an emptied worker keeps the alpha of its last busy round, and shedding on it would
  never let an idle pool recover.
Both predictions are scaled by how much slower than its cost model the worker has been
decoding lately: under overload the frontend and its clients take CPU from the workers, and
a profile from an idle machine would admit too much.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenpool.schedulers.protocol import Scheduler
from tokenpool.schedulers.types import SLO, RequestInfo


@dataclass(frozen=True, slots=True)
class Admission:
    admit: bool
    reason: str = ""
    retry_after_s: float = 0.0


ADMIT = Admission(True)


@dataclass(frozen=True, slots=True)
class SLOAdmission:
    ttft_factor: float = 1.0
    max_alpha: float = 1.0
    max_waiting: int = 512

    def decide(self, scheduler: Scheduler, req: RequestInfo, slo: SLO,
               num_waiting: int) -> Admission:
        if num_waiting >= self.max_waiting:
            return Admission(False, f"{num_waiting} requests are already waiting for prefill "
                                    f"(limit {self.max_waiting})", slo.ttft_s)
        estimate = scheduler.estimate(req, slo)
        if estimate is None:  # request-level baselines: the queue bound only
            return ADMIT
        ttft = estimate.predicted_ttft_s
        if ttft > self.ttft_factor * slo.ttft_s:
            return Admission(False, f"predicted time to first token {ttft:.2f} s exceeds the "
                                    f"SLO of {slo.ttft_s:g} s", ttft - slo.ttft_s)
        alpha = estimate.round_alpha
        if alpha > self.max_alpha:
            return Admission(False, f"decode is overloaded (round alpha {alpha:.2f} > "
                                    f"{self.max_alpha:g})", slo.tbt_s * 10)
        return ADMIT
