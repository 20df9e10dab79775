"""Token-level prefill: grouped FCFS across prefill workers (Aegaeon, DESIGN §3.1).

Each prefill worker keeps a FIFO of groups, a group being waiting requests of one model (at
most `max_group_size`). A request joins a waiting group of its model with room on any
worker, else opens a group on the worker with the least estimated pending work (prefill time
plus switch time). A worker runs its groups in order, switches model only between groups, and
prefetches the next group's model while the current one runs.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from tokenpool.schedulers.cost import CostModel
from tokenpool.schedulers.types import Job, Prefetch, Prefill, RequestInfo, Switch


@dataclass(slots=True)
class Group:
    model: str
    requests: list[RequestInfo] = field(default_factory=list)


@dataclass(slots=True)
class PrefillQueue:
    worker: int
    groups: deque[Group] = field(default_factory=deque)
    model: str | None = None  # what the worker has loaded (after the jobs handed out)


class GroupedFCFSPrefill:
    def __init__(self, workers: list[int], cost: CostModel, max_group_size: int = 8,
                 batch_group: bool = False):
        self.cost = cost
        self.max_group_size = max_group_size
        self.batch_group = batch_group  # one forward pass per group instead of per request
        self.queues = {w: PrefillQueue(w) for w in workers}

    def add_request(self, req: RequestInfo) -> None:
        for queue in self.queues.values():
            for group in queue.groups:
                if group.model == req.model and len(group.requests) < self.max_group_size:
                    group.requests.append(req)
                    return
        target = min(self.queues.values(), key=lambda q: (self._pending_work(q, req.model),
                                                            q.worker))
        target.groups.append(Group(req.model, [req]))

    def _pending_work(self, queue: PrefillQueue, new_model: str) -> float:
        """Predicted seconds of queued work, plus the switch a new group of `new_model` costs."""
        work, model = 0.0, queue.model
        for group in queue.groups:
            if group.model != model:
                work += self.cost.switch_time(group.model)
                model = group.model
            work += self.cost.prefill_time(group.model, [r.prompt_len for r in group.requests])
        if new_model != model:
            work += self.cost.switch_time(new_model)
        return work

    def next_job(self, worker: int) -> Job | None:
        queue = self.queues[worker]
        if not queue.groups:
            return None
        group = queue.groups.popleft()
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

    def num_waiting(self) -> int:
        return sum(len(g.requests) for q in self.queues.values() for g in q.groups)
