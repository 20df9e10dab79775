"""SLO admission: shed a request at the door when the pool cannot meet its SLO (DESIGN §7).

Shedding early, with 429 / RESOURCE_EXHAUSTED, beats queueing work that every request would
then miss its SLO on. Signals, cheapest first:
- the pool-wide prefill queue is full (`max_waiting`): a bound on memory whatever the policy;
- token-level: the predicted TTFT on the prefill worker placement picks (its queued groups'
  predicted work, switches included, plus this prompt) exceeds `ttft_factor` x the TTFT SLO;
- token-level: on every decode worker (colocated roles: on the worker it would prefill and so
  decode on), the next round with this request added would run at an alpha above
  `max_alpha`, i.e. stretch every batch's token gap past its TBT SLO by that factor. The next
  round's alpha, not the last one's: an emptied worker keeps the alpha of its last busy
  round, and shedding on it would never let an idle pool recover.
Both predictions are scaled by how much slower than its cost model the worker has been
decoding lately (`DecodeWorker.slowdown`): under overload the frontend and its clients take
CPU from the workers, and a profile from an idle machine would admit too much.
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
    max_alpha: float = 1.0
    max_waiting: int = 512

    def decide(self, scheduler, req: RequestInfo, slo: SLO, num_waiting: int) -> Admission:
        if num_waiting >= self.max_waiting:
            return Admission(False, f"{num_waiting} requests are already waiting for prefill "
                                    f"(limit {self.max_waiting})", slo.ttft_s)
        prefill = getattr(scheduler, "prefill", None)
        if prefill is None:  # request-level baselines: the queue bound only
            return ADMIT
        queue, group = prefill.target(req)
        ttft = predicted_ttft(prefill, req, queue, group) * _slowdown(scheduler, queue.worker)
        if ttft > self.ttft_factor * slo.ttft_s:
            return Admission(False, f"predicted time to first token {ttft:.2f} s exceeds the "
                                    f"SLO of {slo.ttft_s:g} s", ttft - slo.ttft_s)
        # Colocated roles decode where they prefill: that worker's round is the one to check.
        on = queue.worker if prefill.decode_tiers is not None else None
        alpha = predicted_alpha(scheduler.decode, req, slo, on)
        if alpha > self.max_alpha:
            return Admission(False, f"decode is overloaded (round alpha {alpha:.2f} > "
                                    f"{self.max_alpha:g})", slo.tbt_s * 10)
        return ADMIT


def _slowdown(scheduler, worker: int) -> float:
    """How much slower than the cost model `worker` has been stepping: measured on its decode
    turns, so known for colocated roles; a prefill-only worker is taken at its prediction."""
    decode_worker = scheduler.decode.workers.get(worker)
    return 1.0 if decode_worker is None else decode_worker.slowdown


def predicted_ttft(prefill, req: RequestInfo, queue=None, group=None) -> float:
    """Seconds until `req`'s first token on the prefill worker placement would give it:
    `queue` and the open `group` it joins (None: a new group), from `prefill.target`."""
    if queue is None:
        queue, group = prefill.target(req)
    own = prefill.cost.prefill_time(req.model, [req.prompt_len])
    ahead = queue.work if group is not None else prefill._cost_of_new_group(queue, req.model)
    return ahead + prefill.busy_elsewhere(queue.worker) + own


def predicted_alpha(decode, req: RequestInfo, slo: SLO, worker: int | None = None) -> float:
    """The next-round alpha of `worker`, or of the best decode worker, were `req` placed on it,
    with step times as that worker's turns have lately run."""
    if worker is not None and worker in decode.workers:
        return decode.alpha_with(worker, req, slo.tbt_s, measured=True)
    return min(decode.alpha_with(w, req, slo.tbt_s, measured=True) for w in decode.workers)
