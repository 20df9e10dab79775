"""Aegaeon's token-level scheduler: grouped-FCFS prefill plus weighted round robin decode.

Prefill and decode roles may sit on different workers (disaggregated, as in the paper) or on
the same ones (colocated: a worker runs its prefill groups first, for TTFT, then its turns).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

from tokenpool.schedulers.cost import CostModel
from tokenpool.schedulers.decode import WeightedRoundRobinDecode
from tokenpool.schedulers.prefill import GroupedFCFSPrefill
from tokenpool.schedulers.prefix_index import PrefixIndex
from tokenpool.schedulers.protocol import Estimate, WorkerPolicyState
from tokenpool.schedulers.quota import ALPHA_FLOOR, Q_MAX_S
from tokenpool.schedulers.types import (SLO, DecodeDone, Job, Prefill, PrefillDone,
                                        RequestInfo)


class TokenLevelScheduler:
    name = "token-level"

    def __init__(self, prefill_workers: list[int], decode_workers: list[int], cost: CostModel,
                 slo_of: Callable[[str], SLO], max_group_size: int = 8,
                 q_max_s: float = Q_MAX_S, batch_prefill: bool = False):
        self.slo_of = slo_of
        self.decode = WeightedRoundRobinDecode(decode_workers, cost, q_max_s)
        self.colocated = bool(set(prefill_workers) & set(decode_workers))
        self.prefill = GroupedFCFSPrefill(
            prefill_workers, cost, max_group_size, batch_prefill,
            busy_elsewhere=self._decode_backlog if self.colocated else None,
            decode_tiers=self._decode_tiers if self.colocated else None,
            # A prefill worker's whole KV region may hold cached pages: it hands its
            # requests' KV off (disaggregated), or the engine evicts cached pages as decodes
            # need the room (colocated), so the guess errs towards hits.
            prefixes=PrefixIndex(prefill_workers, cost.kv_capacity_bytes))
        self.requests: dict[str, RequestInfo] = {}

    def _decode_backlog(self, worker: int) -> float:
        """The longest a colocated worker's decoding keeps a new prefill waiting: one turn,
        its last round's longest, since the worker takes prefill work first between jobs.
        Not the whole round, which over-predicts TTFT and sheds requests that would have met
        it (docs/bench/serving.md, "Why the policies are cut as they are")."""
        w = self.decode.workers.get(worker)
        return w.turn_s if w is not None and w.requests else 0.0

    def _decode_tiers(self, req: RequestInfo) -> list[set[int]]:
        """Colocated workers to try for `req`, one a tier, best first: those whose next round
        with it meets every TBT SLO at their measured step times (a worker admission would
        shed on is no place for it while another has room), lightest next round first by the
        profile's step times with the 0.5 floor left out, a worker already holding the model
        first while under that floor. Why each choice: docs/bench/serving.md, "Why the
        policies are cut as they are"."""
        decode, tbt, model = self.decode, self.slo_of(req.model).tbt_s, req.model
        queued = {q.worker for q, _ in self.prefill.open_groups.get(model, ())}
        holding = decode.holders.get(model, set()) | queued
        loads = []
        for w in self.prefill.accepting:
            if decode.alpha_with(w, req, tbt, measured=True) > 1.0:
                continue
            load = decode.alpha_with(w, req, tbt, floor=0.0)
            loads.append((load > ALPHA_FLOOR or w not in holding, load, w))
        return [{w} for *_, w in sorted(loads)]

    def add_request(self, req: RequestInfo, now: float) -> None:
        self.requests[req.request_id] = req
        self.prefill.add_request(req)

    def schedule(self, idle_workers: Iterable[int], now: float) -> list[Job]:
        idle = idle_workers if isinstance(idle_workers, (set, frozenset)) else set(idle_workers)
        prefill, decode = self.prefill, self.decode
        # Most calls find one idle worker, or none, with work: keep them cheap.
        ready = idle & decode.active
        if prefill.nonempty:
            ready |= idle & prefill.nonempty
        if not ready:
            return []
        jobs = []
        for worker in sorted(ready) if len(ready) > 1 else ready:
            job = None
            if worker in prefill.queues:
                job = prefill.next_job(worker)
                if job is not None and worker in decode.workers:
                    job = self._with_decodes(job)
            if job is None and worker in decode.workers:
                job = decode.next_job(worker)
            if job is not None:
                jobs.append(job)
        return jobs

    def _with_decodes(self, job: Job) -> Job:
        """A colocated worker's prefill job, its first Prefill also stepping the requests
        decoding its model there (resident ones: a swapped-out batch waits for its turn).
        While the worker has streams to decode, each Prefill takes one engine step: a prompt
        longer than a step's budget gets its first chunk now and the rest in its model's
        turns, so no stream of any model waits out a whole long prompt."""
        w = self.decode.workers[job.worker]
        if not w.requests:
            return job
        units, riders_given = list(job.units), False
        for i, unit in enumerate(units):
            if type(unit) is Prefill:
                ids = () if riders_given else tuple(
                    r.request_id for r in w.requests.values()
                    if r.model == unit.model and r.resident)
                units[i] = Prefill(unit.worker, unit.model, unit.request_ids, ids, max_steps=1)
                riders_given = True
        return Job(job.worker, tuple(units))

    def update(self, results, now: float) -> None:
        for result in results:
            if isinstance(result, DecodeDone):  # the common case: most jobs are turns
                self.decode.decoded(result.worker, result.request_ids, result.steps,
                                    result.finished, result.seconds)
                for request_id in result.finished:
                    self.requests.pop(request_id, None)
            elif isinstance(result, PrefillDone):
                self._prefilled(result)

    def _prefilled(self, result: PrefillDone) -> None:
        done = set(result.finished)
        if result.decoded:
            finished = tuple(r for r in result.decoded if r in done)
            self.decode.decoded(result.worker, result.decoded, result.decode_steps, finished)
            for request_id in finished:
                self.requests.pop(request_id, None)
        for request_id in result.request_ids:
            req = self.requests[request_id]
            if request_id in done:
                del self.requests[request_id]
                continue
            self.decode.place(request_id, req.model, req.prompt_len + 1,
                              self.slo_of(req.model).tbt_s, local=result.worker)

    def num_unfinished(self) -> int:
        return len(self.requests)

    def estimate(self, req: RequestInfo, slo: SLO) -> Estimate:
        """`req`'s TTFT on the prefill worker placement picks, scaled by how much slower
        than the profile that worker has lately stepped, and the next-round alpha of the
        decode worker it would go to (colocated: the same worker; else the best one)."""
        if not self.prefill.accepting:  # every prefill worker is down or draining
            return Estimate(math.inf, math.inf)
        queue, group = self.prefill.target(req)
        ttft = self.prefill.predicted_ttft(req, queue, group) * self.decode.slowdown(queue.worker)
        on = queue.worker if self.colocated else None
        return Estimate(ttft, self.decode.predicted_alpha(req, slo.tbt_s, on))

    def worker_state(self, worker: int) -> WorkerPolicyState | None:
        w = self.decode.workers.get(worker)
        if w is None:
            return None
        return WorkerPolicyState(w.slowdown, w.alpha, len(w.requests), self.decode.load(worker))

    # -- membership (the elastic pool) -----------------------------------------------------

    def add_worker(self, worker: int, role: str) -> None:
        """Roles as the pool's others are cut: both on a colocated pool, one of them on a
        disaggregated one (the prefill side's placement is built for one or the other)."""
        expected = ("prefill+decode",) if self.colocated else ("prefill", "decode")
        if role not in expected:
            raise ValueError(f"worker {worker}: role {role!r} on a "
                             f"{'colocated' if self.colocated else 'disaggregated'} pool")
        if "prefill" in role:
            self.prefill.add_worker(worker)
        if "decode" in role:
            self.decode.add_worker(worker)

    def drain_worker(self, worker: int) -> None:
        self.prefill.drain_worker(worker)
        self.decode.drain_worker(worker)

    def remove_worker(self, worker: int) -> None:
        self.prefill.remove_worker(worker)
        self.decode.remove_worker(worker)

    def holds(self, worker: int) -> int:
        w = self.decode.workers.get(worker)
        return self.prefill.holds(worker) + (len(w.requests) if w is not None else 0)
