"""Request-level baselines: a worker holds one model until all of its requests finish.

- `request-level` (ServerlessLLM-style): a free worker takes the model whose waiting request
  is oldest, switches to it, and serves every request of that model, new arrivals included,
  with continuous batching, until none is left.
- `request-level-plus`: the same, but a free worker takes the model with the least waiting
  work (its waiting requests' prompt tokens: shortest remaining first, with the whole group).
- Both may pay `baseline_switch_overhead_s` on every switch (`Switch`'s field of that name):
  ServerlessLLM's engine re-initialisation, which the paper's baseline pays and tokenpool's
  switch does not.
- `static`: every model pinned to its own worker(s), never switching. Models left without a
  worker are never served: the deployment pooling is measured against.

Workers prefill a model's pending prompts in one batch, then decode in slices that end early
when a request finishes, so arrivals wait at most one slice for their prefill.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from tokenpool.schedulers.cost import CostModel
from tokenpool.schedulers.types import (SLO, Decode, DecodeDone, Job, Prefill, RequestInfo,
                                        Switch)

SLICE_S = 0.25
MAX_PREFILL_TOKENS = 16384


@dataclass(slots=True)
class ServingWorker:
    worker: int
    pinned: bool = False
    model: str | None = None  # loaded weights
    serving: bool = False  # holds `model`'s requests; new ones of that model come here
    pending: list[RequestInfo] = field(default_factory=list)
    running: dict[str, int] = field(default_factory=dict)  # request id -> context tokens

    @property
    def load(self) -> int:
        return len(self.pending) + len(self.running)


class RequestLevelScheduler:
    def __init__(self, workers: list[int], cost: CostModel, slo_of: Callable[[str], SLO],
                 shortest_first: bool = False, pinned: dict[str, list[int]] | None = None,
                 slice_s: float = SLICE_S, baseline_switch_overhead_s: float = 0.0,
                 name: str = "request-level"):
        self.name = name
        self.cost = cost
        self.baseline_switch_overhead_s = baseline_switch_overhead_s  # held after each switch
        self.slo_of = slo_of
        self.shortest_first = shortest_first
        self.slice_s = slice_s
        self.workers = {w: ServingWorker(w) for w in workers}
        self.waiting: dict[str, deque[RequestInfo]] = {}
        self.serving: dict[str, list[int]] = {}
        for model, ws in (pinned or {}).items():
            for w in ws:
                self.workers[w] = ServingWorker(w, pinned=True, model=model, serving=True)
            self.serving[model] = list(ws)
        self.num_unfinished_requests = 0
        self.busy: set[int] = set()  # workers holding pending or running requests
        self.static = pinned is not None
        self.draining: set[int] = set()  # finish what they hold, take nothing new

    def add_request(self, req: RequestInfo, now: float) -> None:
        self.num_unfinished_requests += 1
        holders = self.serving.get(req.model)
        if holders and self.draining:
            holders = [w for w in holders if w not in self.draining]
        if holders:
            target = min(holders, key=lambda w: (self.workers[w].load, w))
            self.workers[target].pending.append(req)
            self.busy.add(target)
        else:
            self.waiting.setdefault(req.model, deque()).append(req)

    def schedule(self, idle_workers: Iterable[int], now: float) -> list[Job]:
        idle = set(idle_workers)
        ready = idle & self.busy
        if self.waiting:  # free workers may take a waiting model
            ready |= {w for w in idle if not self.workers[w].pinned and w not in self.draining}
        jobs = []
        for worker in sorted(ready):
            job = self._next_job(self.workers[worker])
            if job is not None:
                jobs.append(job)
        return jobs

    def _next_job(self, w: ServingWorker) -> Job | None:
        units: list = []
        if not w.pending and not w.running and not w.pinned and self._take_model(w):
            units.append(Switch(w.worker, w.model, self.baseline_switch_overhead_s))
        if w.pending:
            units.append(self._prefill(w))
        elif w.running:
            units.append(Decode(w.worker, w.model, tuple(w.running), self.slice_s,
                                until_first_finish=True))
        return Job(w.worker, tuple(units)) if units else None

    def _prefill(self, w: ServingWorker) -> Prefill:
        batch, tokens = [], 0
        while w.pending and (not batch or tokens + w.pending[0].prompt_len <= MAX_PREFILL_TOKENS):
            req = w.pending.pop(0)
            batch.append(req)
            tokens += req.prompt_len
        decoding = tuple(w.running)  # the model's requests here ride along (a mixed batch)
        for req in batch:
            w.running[req.request_id] = req.prompt_len
        return Prefill(w.worker, w.model, tuple(r.request_id for r in batch), decoding)

    def _take_model(self, w: ServingWorker) -> bool:
        """A free worker takes the next model; True if it must switch to it."""
        if not self.waiting:
            return False
        if self.shortest_first:
            model = min(self.waiting, key=lambda m: (sum(r.prompt_len for r in self.waiting[m]),
                                                     self.waiting[m][0].arrival, m))
        else:
            model = min(self.waiting, key=lambda m: (self.waiting[m][0].arrival, m))
        w.pending = list(self.waiting.pop(model))
        w.serving = True
        self.busy.add(w.worker)
        self.serving.setdefault(model, []).append(w.worker)
        switch = w.model != model
        w.model = model
        return switch

    def update(self, results, now: float) -> None:
        for result in results:
            w = self.workers[result.worker]
            done = set(result.finished)
            if isinstance(result, DecodeDone):
                self._advance(w, result.request_ids, result.steps, done)
            else:  # a prompt's context counts from its first decode step
                self._advance(w, result.request_ids, 0, done)
                # Riding decodes got a token at every step of a chunked prefill.
                self._advance(w, result.decoded, result.decode_steps, done)
            if not w.pending and not w.running:
                self.busy.discard(w.worker)
                if not w.pinned and w.serving:
                    self._release(w)

    def _advance(self, w: ServingWorker, request_ids, steps: int, done: set[str]) -> None:
        for request_id in request_ids:
            if request_id in done:
                del w.running[request_id]
                self.num_unfinished_requests -= 1
            else:
                w.running[request_id] += steps

    def _release(self, w: ServingWorker) -> None:
        """All of the model's requests are done: the worker is free (its weights stay)."""
        w.serving = False
        holders = self.serving[w.model]
        holders.remove(w.worker)
        if not holders:
            del self.serving[w.model]

    def num_unfinished(self) -> int:
        return self.num_unfinished_requests

    # -- membership (the elastic pool; any role: a worker here does both) -------------------

    def add_worker(self, worker: int, role: str) -> None:
        self.draining.discard(worker)
        if worker in self.workers:
            return
        if not self.static:
            self.workers[worker] = ServingWorker(worker)
            return
        # `static` pins a new worker too: to the model waiting longest (it has no worker),
        # else to the one whose workers hold the most requests each.
        model = min(self.waiting, key=lambda m: (self.waiting[m][0].arrival, m)) \
            if self.waiting else max(self.serving, key=self._held_per_worker, default=None)
        if model is None:
            return
        w = self.workers[worker] = ServingWorker(worker, pinned=True, model=model, serving=True)
        self.serving.setdefault(model, []).append(worker)
        w.pending = list(self.waiting.pop(model, ()))
        if w.pending:
            self.busy.add(worker)

    def _held_per_worker(self, model: str) -> tuple[float, str]:
        holders = self.serving[model]
        return sum(self.workers[w].load for w in holders) / len(holders), model

    def drain_worker(self, worker: int) -> None:
        if worker in self.workers:
            self.draining.add(worker)

    def remove_worker(self, worker: int) -> None:
        """Forget `worker`; requests still pending there never started: placed again."""
        w = self.workers.pop(worker, None)
        if w is None:
            return
        self.draining.discard(worker)
        self.busy.discard(worker)
        if w.serving:
            self.serving[w.model].remove(worker)
            if not self.serving[w.model]:
                del self.serving[w.model]
        self.num_unfinished_requests -= len(w.pending)
        for req in w.pending:
            self.add_request(req, req.arrival)

    def holds(self, worker: int) -> int:
        w = self.workers.get(worker)
        return w.load if w is not None else 0

    def estimate(self, req: RequestInfo, slo: SLO) -> None:
        """None: the baselines predict nothing; admission bounds their queue only."""
        return None

    def worker_state(self, worker: int) -> None:
        return None


def static_placement(models: dict[str, float], workers: list[int]) -> dict[str, list[int]]:
    """Pin models to workers: one each by decreasing weight, the rest by largest remainder.

    `models` maps a model to its expected share of the load (e.g. its request rate). With
    fewer workers than models, the lightest models get none.
    """
    order = sorted(models, key=lambda m: (-models[m], m))
    served = order[: len(workers)]
    counts = {m: 1 for m in served}
    spare = len(workers) - len(served)
    total = sum(models[m] for m in served) or 1.0
    if spare:
        ideal = {m: models[m] / total * len(workers) for m in served}
        extra = {m: max(0.0, ideal[m] - 1) for m in served}
        floors = {m: int(extra[m]) for m in served}
        while sum(floors.values()) > spare:  # ideal rounding can overshoot a little
            m = max(floors, key=lambda x: (floors[x], x))
            floors[m] -= 1
        left = spare - sum(floors.values())
        by_remainder = sorted(served, key=lambda m: (-(extra[m] - floors[m]), m))
        for m in by_remainder[:left]:
            floors[m] += 1
        counts = {m: 1 + floors[m] for m in served}
    placement, next_worker = {}, iter(workers)
    for m in served:
        placement[m] = [next(next_worker) for _ in range(counts[m])]
    return placement
