"""Token-level prefill: grouped FCFS across prefill workers (Aegaeon, DESIGN §3.1).

Each prefill worker keeps a FIFO of groups, a group being waiting requests of one model (at
most `max_group_size`). A request joins a waiting group of its model with room on any
worker, else opens a group on the worker with the least estimated pending work (prefill time
plus switch time). With colocated roles a request decodes where it prefills, so placement
asks the decode side which workers to prefer (`decode_tiers`): those already decoding the
model with room in their round, then any with room. A worker the request would overload is
passed over while another has room: else a busy worker's groups wait longer, gather more
joiners, and make it busier still. A worker runs its groups in order, switches model only
between groups, and prefetches the next group's model while the current one runs.

With prefix caching (requests carry their prompt's page names), placement also asks a
`PrefixIndex` which worker probably holds the longest cached prefix of the prompt, and sends
the request there instead when its predicted TTFT there is no worse than where plain grouped
FCFS would put it. Work estimates and predicted TTFTs charge only the tokens the target
worker does not hold. Not "whenever the holder still meets the SLO": a popular model's
system prompt is cached on one worker first, and that rule piled the model's requests there
until their TTFTs neared the SLO (docs/sim.md, "Prefix caching").

Bookkeeping is incremental so that dispatch stays O(1) in the number of queued groups: open
groups are indexed by model, each queue keeps a running estimate of its pending work, and
the prefix index maps a page name to its holders (a lookup costs the prompt's pages).
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from tokenpool.schedulers.choices import FULL_SCAN_MAX, candidates
from tokenpool.schedulers.cost import CostModel
from tokenpool.schedulers.prefix_index import PAGE_TOKENS, PrefixIndex, reusable_tokens
from tokenpool.schedulers.types import Job, Prefetch, Prefill, RequestInfo, Switch

Tiers = list[set[int]]

@dataclass(slots=True)
class Group:
    model: str
    requests: list[RequestInfo] = field(default_factory=list)
    work: float = 0.0  # predicted seconds: its prefills, plus the switch it brought


@dataclass(slots=True)
class PrefillQueue:
    worker: int
    groups: deque[Group] = field(default_factory=deque)
    model: str | None = None  # loaded once the jobs handed out so far have run
    last_model: str | None = None  # the model of the last queued group (or `model`)
    work: float = 0.0  # predicted seconds of queued groups, switches included


class GroupedFCFSPrefill:
    def __init__(self, workers: list[int], cost: CostModel, max_group_size: int = 8,
                 batch_group: bool = False, seed: int = 0,
                 busy_elsewhere: Callable[[int], float] | None = None,
                 decode_tiers: Callable[[RequestInfo], Tiers] | None = None,
                 prefixes: PrefixIndex | None = None):
        """`prefixes`: where prompts' pages probably are (None: no cache-aware placement)."""
        self.cost = cost
        # Colocated roles: how busy a worker is with decoding, so new groups spread out
        # instead of piling onto the first worker whose prefill queue happens to be empty.
        self.busy_elsewhere = busy_elsewhere or (lambda worker: 0.0)
        self._colocated = busy_elsewhere is not None
        self.decode_tiers = decode_tiers
        self.max_group_size = max_group_size
        self.batch_group = batch_group  # one forward pass per group instead of per request
        self.queues = {w: PrefillQueue(w) for w in workers}
        self.open_groups: dict[str, list[tuple[PrefillQueue, Group]]] = {}
        self.nonempty: set[int] = set()  # workers with queued groups
        self.draining: set[int] = set()  # their queued groups run; no new ones come
        self.pen: list[RequestInfo] = []  # arrived while no worker took new work
        self._refresh()
        self._rng = random.Random(seed)
        self.prefixes = prefixes

    def _refresh(self) -> None:
        """The queues new requests may go to."""
        self._workers = [q for q in self.queues.values() if q.worker not in self.draining]
        self.accepting = [q.worker for q in self._workers]

    # -- membership (the elastic pool; protocol.Scheduler) -----------------------------------

    def add_worker(self, worker: int) -> None:
        self.draining.discard(worker)
        if worker not in self.queues:
            self.queues[worker] = PrefillQueue(worker)
            if self.prefixes is not None:
                self.prefixes.add_worker(worker, self.cost.kv_capacity_bytes)
        self._refresh()
        pen, self.pen = self.pen, []
        for req in pen:
            self.add_request(req)

    def drain_worker(self, worker: int) -> None:
        if worker in self.queues:
            self.draining.add(worker)
            self._refresh()
            self._close_groups_on(worker)

    def remove_worker(self, worker: int) -> None:
        """Forget `worker`; the groups still queued there never started: placed again."""
        queue = self.queues.pop(worker, None)
        if queue is None:
            return
        self.draining.discard(worker)
        self.nonempty.discard(worker)
        self._close_groups_on(worker)
        if self.prefixes is not None:
            self.prefixes.forget_worker(worker)
        self._refresh()
        for group in queue.groups:
            for req in group.requests:
                self.add_request(req)

    def holds(self, worker: int) -> int:
        queue = self.queues.get(worker)
        return sum(len(g.requests) for g in queue.groups) if queue is not None else 0

    def _close_groups_on(self, worker: int) -> None:
        for model in list(self.open_groups):
            joinable = [e for e in self.open_groups[model] if e[0].worker != worker]
            if joinable:
                self.open_groups[model] = joinable
            else:
                del self.open_groups[model]

    # -- placement ---------------------------------------------------------------------------

    def add_request(self, req: RequestInfo) -> None:
        if not self._workers:  # every prefill worker is down or draining
            self.pen.append(req)
            return
        model = req.model
        queue, group = self.target(req)
        work = self._own_work(req, queue.worker)
        if req.page_hashes and self.prefixes is not None:
            self.prefixes.record(queue.worker, req.page_hashes,
                                 self.cost.kv_bytes(model, PAGE_TOKENS))
        if group is not None:
            group.requests.append(req)
            group.work += work
            queue.work += work
            if len(group.requests) >= self.max_group_size:
                joinable = self.open_groups[model]
                joinable[:] = [e for e in joinable if e[1] is not group]
            return
        added = self._cost_of_new_group(queue, model) - queue.work + work
        group = Group(model, [req], added)
        queue.work += added
        queue.groups.append(group)
        queue.last_model = model
        self.nonempty.add(queue.worker)
        if self.max_group_size > 1:
            self.open_groups.setdefault(model, []).append((queue, group))

    def target(self, req: RequestInfo) -> tuple[PrefillQueue, Group | None]:
        """Where `req` would go: the open group it would join, or the queue of a new group."""
        # Colocated: O(workers) per request, as colocated roles are for small pools.
        tiers = self.decode_tiers(req) if self.decode_tiers else None
        queue, group = self._fcfs_target(req, tiers)
        if req.page_hashes and self.prefixes is not None:
            return self._cache_aware(req, tiers, queue, group)
        return queue, group

    def _fcfs_target(self, req: RequestInfo, tiers: Tiers | None
                     ) -> tuple[PrefillQueue, Group | None]:
        """Grouped FCFS's choice, blind to caches."""
        joinable = self.open_groups.get(req.model, ())
        for allowed in tiers or ():
            for queue, group in joinable:
                if queue.worker in allowed:
                    return queue, group
            if allowed:
                return self._soonest_start(req.model, allowed), None
        if joinable:  # any worker; all colocated ones are overloaded (admission sheds first)
            return joinable[0]
        return self._soonest_start(req.model), None

    def _cache_aware(self, req: RequestInfo, tiers: Tiers | None, queue: PrefillQueue,
                     group: Group | None) -> tuple[PrefillQueue, Group | None]:
        """The worker holding the longest cached prefix of `req` (colocated: of those whose
        decoding can take it) instead of FCFS's `queue`, when `req`'s predicted TTFT there is
        no worse: it then meets its SLO wherever FCFS's place would, and the hit saves the
        pool the prefix's compute."""
        allowed = set().union(*tiers) if tiers is not None else \
            set(self.accepting) if self.draining else None
        limit = (req.prompt_len - 1) // PAGE_TOKENS
        holders, pages = self.prefixes.longest(req.page_hashes, limit, allowed)
        if not pages or queue.worker in holders:
            return queue, group
        held = self._place_among(req.model, holders)
        if self.predicted_ttft(req, *held) <= self.predicted_ttft(req, queue, group):
            return held
        return queue, group

    def _place_among(self, model: str, workers: set[int]) -> tuple[PrefillQueue, Group | None]:
        """An open group of `model` on one of `workers`, else where a new one starts
        soonest among them (a few of them, when a popular prefix is cached on many)."""
        for queue, group in self.open_groups.get(model, ()):
            if queue.worker in workers:
                return queue, group
        if len(workers) > FULL_SCAN_MAX:
            workers = set(candidates(sorted(workers), self._rng))
        return self._soonest_start(model, workers), None

    def _soonest_start(self, model: str, allowed: set[int] | None = None) -> PrefillQueue:
        """The candidate queue where a new group of `model` would start soonest (ties: the
        lowest worker id). A plain loop, not min() with a key: it runs once per request."""
        switch = self.cost.switch_time(model)
        best, best_cost = None, 0.0
        queues = candidates(self._workers, self._rng) if allowed is None else \
            [self.queues[w] for w in allowed]
        for q in queues:
            cost = q.work + switch if model != q.last_model else q.work + 0.0
            if self._colocated:
                cost += self.busy_elsewhere(q.worker)
            if best is None or cost < best_cost or (cost == best_cost and q.worker < best.worker):
                best, best_cost = q, cost
        return best

    def _cost_of_new_group(self, queue: PrefillQueue, model: str) -> float:
        """The queue's pending work plus the switch a new group of `model` would add."""
        switch = self.cost.switch_time(model) if model != queue.last_model else 0.0
        return queue.work + switch

    def predicted_ttft(self, req: RequestInfo, queue: PrefillQueue | None = None,
                       group: Group | None = None) -> float:
        """Seconds until `req`'s first token where placement would put it, by the profile:
        `queue` and the open `group` it joins (None: a new group), from `target(req)`."""
        if queue is None:
            queue, group = self.target(req)
        own = self._own_work(req, queue.worker)
        ahead = queue.work if group is not None else self._cost_of_new_group(queue, req.model)
        return ahead + self.busy_elsewhere(queue.worker) + own

    def _own_work(self, req: RequestInfo, worker: int) -> float:
        """Predicted seconds of `req`'s own prefill on `worker`: what its cache lacks."""
        if not req.page_hashes or self.prefixes is None:
            return self.cost.prefill_time(req.model, [req.prompt_len])
        pages = self.prefixes.cached_pages(worker, req.page_hashes)
        cached = reusable_tokens(pages, req.prompt_len)
        return self.cost.prefill_time(req.model, [req.prompt_len], (cached,) if cached else ())

    def next_job(self, worker: int) -> Job | None:
        queue = self.queues[worker]
        if not queue.groups:
            return None
        group = queue.groups.popleft()
        self._close(queue, group)
        units: list = []
        if queue.model != group.model:
            units.append(Switch(worker, group.model))
            queue.model = group.model
        upcoming = next((g.model for g in queue.groups if g.model != group.model), None)
        if upcoming is not None:
            units.append(Prefetch(worker, upcoming))
        ids = [r.request_id for r in group.requests]
        if self.batch_group:
            units.append(Prefill(worker, group.model, tuple(ids)))
        else:
            units += [Prefill(worker, group.model, (i,)) for i in ids]
        return Job(worker, tuple(units))

    def _close(self, queue: PrefillQueue, group: Group) -> None:
        """The group starts: no more joiners, and its work leaves the queue's estimate."""
        joinable = self.open_groups.get(group.model)
        if joinable:
            self.open_groups[group.model] = [e for e in joinable if e[1] is not group]
            if not self.open_groups[group.model]:
                del self.open_groups[group.model]
        if queue.groups:
            queue.work = max(0.0, queue.work - group.work)
        else:
            queue.work = 0.0
            queue.last_model = group.model
            self.nonempty.discard(queue.worker)
