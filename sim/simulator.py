"""The discrete-event simulator: the controller core on a virtual clock.

Events are request arrivals and job completions. The core takes them exactly as it does from
real workers (admission, dispatch, finishing); here each job goes to a simulated worker,
which computes from the cost model when it ends and what came of it.
"""

from __future__ import annotations

import gc
import heapq
from contextlib import contextmanager
from dataclasses import dataclass

from tokenpool.controller.core import ControllerCore, CoreConfig
from tokenpool.controller.core_types import Arrival
from tokenpool.controller.pool_stats import PoolStats
from tokenpool.gpu_pool.protocol import JobDone
from tokenpool.schedulers.cost import CostModel
from tokenpool.schedulers.types import RequestInfo
from tokenpool.sim.timelines import TokenTimeline
from tokenpool.sim.worker import SimRequest, SimWorker
from tokenpool.sim.workload import WorkloadRequest

MAX_TOKENS = 4096  # the cap a simulated client asks for; workloads carry no max_tokens


@dataclass(frozen=True, slots=True)
class SimOutcome:
    timelines: list[TokenTimeline]
    workers: list[SimWorker]
    end_time: float


class _Simulation:
    """Arrivals and simulated jobs, in time order, through one core."""

    def __init__(self, workload: list[WorkloadRequest], core: ControllerCore,
                 workers: list[SimWorker], slo_of):
        self.workload = workload
        self.core = core
        self.workers = workers
        self.slo_of = slo_of
        self.requests: dict[str, SimRequest] = {}
        self.timelines: list[TokenTimeline] = []
        self._running: list[tuple[float, int, list]] = []  # (end time, worker, results)

    def run(self) -> float:
        """Serve the whole workload (sorted by arrival); returns the end time."""
        workload, running, step = self.workload, self._running, self.core.step
        n, i, now = len(workload), 0, 0.0
        while i < n or running:
            arrivals = []
            while i < n and workload[i].arrival_s <= now:
                arrivals.append(self._arrive(workload[i]))
                i += 1
            done = []
            while running and running[0][0] <= now:
                _, worker, results = heapq.heappop(running)
                done.append(JobDone(worker, results))
            for job in step(now, arrivals, (), done).jobs:
                end, results = self.workers[job.job.worker].run(job.job, now)
                heapq.heappush(running, (end, job.job.worker, results))
            # On to the next event: an arrival or a job's end, whichever comes first.
            ends = running[0][0] if running else None
            if i < n and (ends is None or workload[i].arrival_s < ends):
                now = max(now, workload[i].arrival_s)
            elif ends is not None:
                now = max(now, ends)
        return now

    def _arrive(self, w: WorkloadRequest) -> Arrival:
        slo = self.slo_of(w.model)
        timeline = TokenTimeline(w.arrival_s, slo.ttft_s, slo.tbt_s)
        self.timelines.append(timeline)
        self.requests[w.request_id] = SimRequest(w.request_id, w.model, w.prompt_len,
                                                 w.output_len, timeline, w.page_hashes)
        # Schedulers see the prompt and a token cap, never the true output length.
        return Arrival(RequestInfo(w.request_id, w.model, w.prompt_len, w.arrival_s,
                                   MAX_TOKENS, w.page_hashes), slo)


def simulate(workload: list[WorkloadRequest], scheduler, num_workers: int, cost: CostModel,
             slo_of) -> SimOutcome:
    """Run `workload` (sorted by arrival) through `scheduler` on simulated workers."""
    stats = PoolStats(num_workers, {w.model: slo_of(w.model) for w in workload})
    core = ControllerCore(scheduler, CoreConfig(num_workers), stats)
    sim = _Simulation(workload, core, [], slo_of)
    sim.workers = [SimWorker(i, cost, sim.requests) for i in range(num_workers)]
    with _no_cyclic_gc():
        end = sim.run()
    return SimOutcome(sim.timelines, sim.workers, end)


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
