"""The discrete-event simulator: the controller's loop on a virtual clock.

Events are request arrivals and job completions. At each event time the scheduler hears
about what happened (`add_request`, `update`) and hands jobs to idle workers (`schedule`), the
same calls the controller makes with real workers. A simulated worker computes when its job
ends and what came of it from the cost model.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

from tokenpool.controller.metrics import TokenTimeline
from tokenpool.controller.workload import WorkloadRequest
from tokenpool.gpu_pool.sim_worker import SimRequest, SimWorker
from tokenpool.schedulers.cost import CostModel
from tokenpool.schedulers.types import SLO, RequestInfo


@dataclass(frozen=True, slots=True)
class SimOutcome:
    timelines: list[TokenTimeline]
    workers: list[SimWorker]
    end_time: float


def simulate(workload: list[WorkloadRequest], scheduler, num_workers: int, cost: CostModel,
             slo_of) -> SimOutcome:
    """Run `workload` (sorted by arrival) through `scheduler` on simulated workers."""
    requests: dict[str, SimRequest] = {}
    workers = [SimWorker(w, cost, requests) for w in range(num_workers)]
    idle = set(range(num_workers))
    done: list[tuple[float, int, list]] = []  # (end time, worker, results): a heap
    timelines = []
    now = 0.0
    i = 0
    while i < len(workload) or done:
        now = min(workload[i].arrival_s if i < len(workload) else float("inf"),
                  done[0][0] if done else float("inf"))
        while i < len(workload) and workload[i].arrival_s <= now:
            i = _arrive(workload[i], scheduler, requests, timelines, slo_of, now, i)
        while done and done[0][0] <= now:
            _, worker, results = heapq.heappop(done)
            idle.add(worker)
            scheduler.update(results, now)
        for job in scheduler.schedule(idle, now):
            end, results = workers[job.worker].run(job, now)
            idle.discard(job.worker)
            heapq.heappush(done, (end, job.worker, results))
    return SimOutcome(timelines, workers, now)


def _arrive(w: WorkloadRequest, scheduler, requests, timelines, slo_of, now, i) -> int:
    slo: SLO = slo_of(w.model)
    timeline = TokenTimeline(w.arrival_s, slo.ttft_s, slo.tbt_s)
    timelines.append(timeline)
    requests[w.request_id] = SimRequest(w.request_id, w.model, w.prompt_len, w.output_len,
                                        timeline)
    scheduler.add_request(RequestInfo(w.request_id, w.model, w.prompt_len, w.arrival_s,
                                      w.output_len), now)
    return i + 1
