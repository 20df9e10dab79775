"""SLO admission: shed a request at the door when the pool cannot meet its SLO (DESIGN §7).

Shedding early, with 429 / RESOURCE_EXHAUSTED, beats queueing work that every request would
then miss its SLO on. Signals, cheapest first:
- the pool-wide prefill queue is full (`max_waiting`): a bound on memory whatever the policy;
- token-level: the predicted TTFT on the best prefill worker (its queued groups' predicted
  work, switches included, plus this prompt) exceeds `ttft_factor` x the TTFT SLO;
- token-level: on every decode worker, the next round with this request added would run at
  an alpha above `max_alpha`, i.e. stretch every batch's token gap past its TBT SLO by that
  factor. The next round's alpha, not the last one's: an emptied worker keeps the alpha of
  its last busy round, and shedding on it would never let an idle pool recover.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    max_alpha: float = 1.5
    max_waiting: int = 512

    def decide(self, scheduler, req: RequestInfo, slo: SLO, num_waiting: int) -> Admission:
        if num_waiting >= self.max_waiting:
            return Admission(False, f"{num_waiting} requests are already waiting for prefill "
                                    f"(limit {self.max_waiting})", slo.ttft_s)
        prefill = getattr(scheduler, "prefill", None)
        if prefill is None:  # request-level baselines: the queue bound only
            return ADMIT
        ttft = predicted_ttft(prefill, req)
        if ttft > self.ttft_factor * slo.ttft_s:
            return Admission(False, f"predicted time to first token {ttft:.2f} s exceeds the "
                                    f"SLO of {slo.ttft_s:g} s", ttft - slo.ttft_s)
        alpha = predicted_alpha(scheduler.decode, req, slo)
        if alpha > self.max_alpha:
            return Admission(False, f"decode is overloaded (round alpha {alpha:.2f} > "
                                    f"{self.max_alpha:g})", slo.tbt_s * 10)
        return ADMIT


def predicted_ttft(prefill, req: RequestInfo) -> float:
    """Seconds until `req`'s first token on the prefill worker that would give it soonest."""
    own = prefill.cost.prefill_time(req.model, [req.prompt_len])
    joinable = prefill.open_groups.get(req.model)
    if joinable:  # it joins a queued group of its model, behind the worker's other work too
        queue, _ = joinable[0]
        return queue.work + prefill.busy_elsewhere(queue.worker) + own
    return min(prefill._cost_of_new_group(q, req.model) + prefill.busy_elsewhere(q.worker)
               for q in prefill.queues.values()) + own


def predicted_alpha(decode, req: RequestInfo, slo: SLO) -> float:
    """The lowest next-round alpha of any decode worker, were `req` placed on it."""
    context = req.prompt_len + 1
    return min(decode._alpha_with(w, req.model, context, slo.tbt_s)
               for w in decode.workers.values())
