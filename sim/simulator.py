"""The discrete-event simulator: the controller's loop on a virtual clock.

Events are request arrivals and job completions. `controller.loop.run` hands them to the
scheduler exactly as it does with real workers; here each job goes to a simulated worker,
which computes from the cost model when it ends and what came of it.
"""

from __future__ import annotations

import gc
import heapq
from contextlib import contextmanager
from dataclasses import dataclass

from tokenpool.controller import loop
from tokenpool.sim.timelines import TokenTimeline
from tokenpool.sim.workload import WorkloadRequest
from tokenpool.sim.worker import SimRequest, SimWorker
from tokenpool.schedulers.cost import CostModel
from tokenpool.schedulers.types import Job, RequestInfo


MAX_TOKENS = 4096  # the cap a simulated client asks for; workloads carry no max_tokens


@dataclass(frozen=True, slots=True)
class SimOutcome:
    timelines: list[TokenTimeline]
    workers: list[SimWorker]
    end_time: float


class SimExecutor:
    """Runs jobs on simulated workers; completions wait in a heap until the clock gets there."""

    def __init__(self, workers: list[SimWorker]):
        self.workers = workers
        self._done: list[tuple[float, int, list]] = []  # (end time, worker, results)

    def start(self, job: Job, now: float) -> None:
        end, results = self.workers[job.worker].run(job, now)
        heapq.heappush(self._done, (end, job.worker, results))

    def next_done(self) -> float | None:
        return self._done[0][0] if self._done else None

    def collect(self, now: float) -> list[tuple[int, list]]:
        if not self._done or self._done[0][0] > now:
            return []
        finished = []
        while self._done and self._done[0][0] <= now:
            _, worker, results = heapq.heappop(self._done)
            finished.append((worker, results))
        return finished


def simulate(workload: list[WorkloadRequest], scheduler, num_workers: int, cost: CostModel,
             slo_of) -> SimOutcome:
    """Run `workload` (sorted by arrival) through `scheduler` on simulated workers."""
    requests: dict[str, SimRequest] = {}
    truth = {w.request_id: w for w in workload}
    timelines: list[TokenTimeline] = []

    def arrive(info: RequestInfo) -> None:
        w = truth.pop(info.request_id)
        slo = slo_of(w.model)
        timeline = TokenTimeline(w.arrival_s, slo.ttft_s, slo.tbt_s)
        timelines.append(timeline)
        requests[w.request_id] = SimRequest(w.request_id, w.model, w.prompt_len, w.output_len,
                                            timeline)

    workers = [SimWorker(i, cost, requests) for i in range(num_workers)]
    # Schedulers see the prompt and a token cap, never the true output length.
    arrivals = ((w.arrival_s, RequestInfo(w.request_id, w.model, w.prompt_len, w.arrival_s,
                                          MAX_TOKENS)) for w in workload)
    with _no_cyclic_gc():
        end = loop.run(scheduler, SimExecutor(workers), loop.VirtualClock(), num_workers,
                       arrivals, arrive)
    return SimOutcome(timelines, workers, end)


@contextmanager
def _no_cyclic_gc():
    """Pause the cyclic garbage collector for the run.

    A run builds millions of long-lived objects (timelines, their gap lists, requests) and
    no reference cycles worth collecting; the collector's repeated passes over them took
    about half the wall time of the 1,000-model hour. Reference counting still frees
    everything that dies.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
