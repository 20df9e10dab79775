"""A simulated worker: runs the same Jobs as a real one, with durations from a cost model.

Decode turns are stepped analytically: between two request completions a batch's step time
is constant (taken at the segment's start), so `k` tokens for every request are one
`emit_evenly` call each, not `k` events. Prefetch is a background copy: a later switch to the
prefetched model waits only for what is left of it.

Prefix caching is the truth here: each worker keeps the page names of the prompts it
prefilled in an LRU bounded by its KV region's bytes, across switches and for every model
(names carry their model), and a prefill computes only the tokens past a prompt's longest
cached prefix. Only prompt pages are named: the workload's requests say nothing of the
pages their outputs fill.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenpool.schedulers.cost import CostModel
from tokenpool.schedulers.prefix_index import PAGE_TOKENS, PageLRU, reusable_tokens
from tokenpool.schedulers.types import (Decode, DecodeDone, Job, Prefetch, Prefill,
                                        PrefillDone, Switch)


@dataclass(slots=True)
class SimRequest:
    """The simulator's truth about a request: its real output length and token times.

    `remaining` and `context` are fields, not properties: they are read millions of times.
    """

    request_id: str
    model: str
    prompt_len: int
    output_len: int
    timeline: object  # controller.metrics.TokenTimeline
    page_hashes: tuple[int, ...] = ()  # its prompt's page names; () without prefix caching
    remaining: int = 0  # tokens still to generate
    context: int = 0  # prompt plus tokens generated

    def __post_init__(self):
        self.remaining = self.output_len
        self.context = self.prompt_len

    def generate(self, k: int) -> None:
        self.remaining -= k
        self.context += k


class SimWorker:
    def __init__(self, worker: int, cost: CostModel, requests: dict[str, SimRequest]):
        self.worker = worker
        self.cost = cost
        self.requests = requests
        self.model: str | None = None
        self.prefetched: tuple[str, float] | None = None  # model, time its copy completes
        self.switches = 0
        self.busy_s = 0.0
        self.prefix_cache = PageLRU(cost.kv_capacity_bytes)
        self.prefix_queried_tokens = 0  # prompt tokens of prefills with page names
        self.prefix_hit_tokens = 0  # of those, served from the prefix cache

    def run(self, job: Job, now: float) -> tuple[float, list]:
        t, results = now, []
        for unit in job.units:
            kind = type(unit)
            if kind is Decode:
                t, result = self._decode(unit, t)
                results.append(result)
            elif kind is Prefill:
                t, result = self._prefill(unit, t)
                results.append(result)
            elif kind is Switch:
                t = self._switch(unit.model, t) + unit.baseline_switch_overhead_s
            elif kind is Prefetch:
                self.prefetched = (unit.model, t + self.cost.switch_time(unit.model))
            else:  # SwapIn, SwapOut
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
        requests = self.requests
        tokens = 0
        for request_id in unit.request_ids:
            r = requests[request_id]
            if r.remaining > 0:  # a request that finished this turn holds no KV
                tokens += r.context
        return self.cost.kv_swap_time(unit.model, tokens) if tokens else 0.0

    def _prefill(self, unit: Prefill, t: float) -> tuple[float, PrefillDone]:
        reqs = [self.requests[i] for i in unit.request_ids]
        cached = self._reuse(unit.model, reqs) if reqs[0].page_hashes else ()
        t += self.cost.prefill_time(unit.model, [r.prompt_len for r in reqs], cached)
        finished = []
        for request_id, r in zip(unit.request_ids, reqs):
            r.timeline.emit(t)
            r.generate(1)
            if r.remaining <= 0:
                r.timeline.finish()
                finished.append(request_id)
        return t, PrefillDone(self.worker, unit.model, unit.request_ids, tuple(finished))

    def _reuse(self, model: str, reqs: list[SimRequest]) -> list[int]:
        """The tokens of each prompt that the prefix cache holds, counted; then every
        prompt's pages are cached (after the pass: the prompts of one pass share nothing)."""
        cache, cached = self.prefix_cache, []
        for r in reqs:
            if r.page_hashes:
                hit = reusable_tokens(cache.match(r.page_hashes), r.prompt_len)
                self.prefix_queried_tokens += r.prompt_len
                self.prefix_hit_tokens += hit
                cached.append(hit)
        page_bytes = self.cost.kv_bytes(model, PAGE_TOKENS)
        for r in reqs:
            if r.page_hashes:
                cache.touch(r.page_hashes, page_bytes)
        return cached

    def _decode(self, unit: Decode, t: float) -> tuple[float, DecodeDone]:
        """Steps until the quota is spent, in stretches between request completions."""
        requests = self.requests
        live, context, least = [], 0, None
        for request_id in unit.request_ids:
            r = requests[request_id]
            if r.remaining > 0:
                live.append(r)
                context += r.context
                if least is None or r.remaining < least:
                    least = r.remaining
        step_time = self.cost.decode_step_time
        model, end = unit.model, t + unit.quota_s
        steps, finished = 0, []
        while live:
            n = len(live)
            d = step_time(model, n, context)
            fit = int((end - t) / d)
            if fit < 1:
                if steps:
                    break
                fit = 1  # a turn always makes progress
            k = fit if fit < least else least
            for r in live:
                r.timeline.emit_evenly(t, d, k)
                r.remaining -= k
                r.context += k
            t += k * d
            steps += k
            context += n * k
            least -= k
            if least:  # nobody finished: the next pass finds the quota spent
                continue
            live, least, context = _shrink(live, finished, context)
            if unit.until_first_finish:
                break
        return t, DecodeDone(self.worker, unit.model, unit.request_ids, steps, tuple(finished))


def _shrink(live: list[SimRequest], finished: list[str], context: int
            ) -> tuple[list[SimRequest], int | None, int]:
    """Someone finished: the batch without them, its least remaining, its context."""
    still, least = [], None
    for r in live:
        if r.remaining > 0:
            still.append(r)
            if least is None or r.remaining < least:
                least = r.remaining
        else:
            r.timeline.finish()
            finished.append(r.request_id)
            context -= r.context
    return still, least, context
