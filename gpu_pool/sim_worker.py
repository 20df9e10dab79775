"""A simulated worker: runs the same Jobs as a real one, with durations from a cost model.

Decode turns are stepped analytically: between two request completions a batch's step time
is constant (taken at the segment's start), so `k` tokens for every request are one
`emit_evenly` call each, not `k` events. Prefetch is a background copy: a later switch to the
prefetched model waits only for what is left of it.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenpool.schedulers.cost import CostModel
from tokenpool.schedulers.types import (Decode, DecodeDone, Job, Prefetch, Prefill,
                                        PrefillDone, SwapIn, SwapOut, Switch)


@dataclass(slots=True)
class SimRequest:
    """The simulator's truth about a request: its real output length and token times."""

    model: str
    prompt_len: int
    output_len: int
    timeline: object  # controller.metrics.TokenTimeline
    generated: int = 0

    @property
    def remaining(self) -> int:
        return self.output_len - self.generated

    @property
    def context(self) -> int:
        return self.prompt_len + self.generated


class SimWorker:
    def __init__(self, worker: int, cost: CostModel, requests: dict[str, SimRequest]):
        self.worker = worker
        self.cost = cost
        self.requests = requests
        self.model: str | None = None
        self.prefetched: tuple[str, float] | None = None  # model, time its copy completes
        self.switches = 0
        self.busy_s = 0.0

    def run(self, job: Job, now: float) -> tuple[float, list]:
        t, results = now, []
        for unit in job.units:
            if isinstance(unit, Decode):
                t, result = self._decode(unit, t)
                results.append(result)
            elif isinstance(unit, Prefill):
                t, result = self._prefill(unit, t)
                results.append(result)
            elif isinstance(unit, Switch):
                t = self._switch(unit.model, t)
            elif isinstance(unit, Prefetch):
                self.prefetched = (unit.model, t + self.cost.switch_time(unit.model))
            elif isinstance(unit, (SwapIn, SwapOut)):
                t += self._swap_time(unit)
        self.busy_s += t - now
        return t, results

    def _switch(self, model: str, t: float) -> float:
        self.switches += 1
        if self.prefetched is not None and self.prefetched[0] == model:
            ready = self.prefetched[1]
            self.prefetched = None
            self.model = model
            return max(t, ready)
        self.model = model
        return t + self.cost.switch_time(model)

    def _swap_time(self, unit) -> float:
        tokens = sum(self.requests[i].context for i in unit.request_ids
                     if self.requests[i].remaining > 0)
        return self.cost.kv_swap_time(unit.model, tokens) if tokens else 0.0

    def _prefill(self, unit: Prefill, t: float) -> tuple[float, PrefillDone]:
        reqs = [self.requests[i] for i in unit.request_ids]
        t += self.cost.prefill_time(unit.model, [r.prompt_len for r in reqs])
        finished = []
        for request_id, r in zip(unit.request_ids, reqs):
            r.timeline.emit(t)
            r.generated = 1
            if r.remaining <= 0:
                r.timeline.finish()
                finished.append(request_id)
        return t, PrefillDone(self.worker, unit.model, unit.request_ids, tuple(finished))

    def _decode(self, unit: Decode, t: float) -> tuple[float, DecodeDone]:
        live = [(i, self.requests[i]) for i in unit.request_ids if self.requests[i].remaining > 0]
        end = t + unit.quota_s
        steps, finished = 0, []
        while live:
            d = self.cost.decode_step_time(unit.model, len(live),
                                           sum(r.context for _, r in live))
            fit = int((end - t) / d)
            if steps == 0:
                fit = max(1, fit)  # a turn always makes progress
            k = min(fit, min(r.remaining for _, r in live))
            if k <= 0:
                break
            for _, r in live:
                r.timeline.emit_evenly(t, d, k)
                r.generated += k
            t += k * d
            steps += k
            done = [i for i, r in live if r.remaining <= 0]
            for i in done:
                self.requests[i].timeline.finish()
            if done:
                finished += done
                live = [(i, r) for i, r in live if r.remaining > 0]
                if unit.until_first_finish:
                    break
        return t, DecodeDone(self.worker, unit.model, unit.request_ids, steps, tuple(finished))
