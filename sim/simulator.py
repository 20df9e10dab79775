"""The discrete-event simulator: the controller core on a virtual clock.

Events are request arrivals and job completions. The core takes them exactly as it does from
real workers (admission, dispatch, finishing); here each job goes to a simulated worker,
which computes from the cost model when it ends and what came of it.

An elastic pool (`Elastic`) runs the core's scaling rule too: a `Grow` starts fresh simulated
workers that join `start_s` later, a `Retire` removes one, and the core is also stepped every
`check_s` so the rule sees quiet stretches. Device time counts every worker up or starting.
"""

from __future__ import annotations

import gc
import heapq
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

from tokenpool.controller.core import ControllerCore, CoreConfig
from tokenpool.controller.core_types import Arrival, WorkerJoined
from tokenpool.controller.pool_stats import PoolStats
from tokenpool.gpu_pool.protocol import JobDone
from tokenpool.schedulers.cost import CostModel
from tokenpool.schedulers.scaling import Grow, ScalingRule
from tokenpool.schedulers.types import RequestInfo
from tokenpool.sim.timelines import TokenTimeline
from tokenpool.sim.worker import SimRequest, SimWorker
from tokenpool.sim.workload import WorkloadRequest

MAX_TOKENS = 4096  # the cap a simulated client asks for; workloads carry no max_tokens


@dataclass(frozen=True, slots=True)
class Elastic:
    """An elastic pool: the rule, worker ids below `max_workers` with their roles, and how
    long a grown worker takes to start."""

    rule: ScalingRule
    max_workers: int
    role_of: Callable[[int], str]
    start_s: float


@dataclass(frozen=True, slots=True)
class SimOutcome:
    timelines: list[TokenTimeline]
    workers: list[SimWorker]  # every worker that was ever up, retired ones included
    end_time: float
    device_s: float = 0.0  # device seconds: workers up or starting, integrated over the run
    pool_sizes: list[tuple[float, int]] = field(default_factory=list)  # (time, workers) steps


class _Simulation:
    """Arrivals and simulated jobs, in time order, through one core."""

    def __init__(self, workload: list[WorkloadRequest], core: ControllerCore,
                 workers: dict[int, SimWorker], slo_of):
        self.workload = workload
        self.core = core
        self.workers = workers
        self.slo_of = slo_of
        self.requests: dict[str, SimRequest] = {}
        self.timelines: list[TokenTimeline] = []
        self._running: list[tuple[float, int, list]] = []  # (end time, worker, results)
        self.pool: _ElasticPool | None = None

    def run(self) -> float:
        """Serve the whole workload (sorted by arrival); returns the end time."""
        workload, running, step, pool = self.workload, self._running, self.core.step, self.pool
        n, i, now = len(workload), 0, 0.0
        while i < n or running or (pool is not None and pool.joins):
            arrivals = []
            while i < n and workload[i].arrival_s <= now:
                arrivals.append(self._arrive(workload[i]))
                i += 1
            done = pool.joined(now) if pool is not None else []
            while running and running[0][0] <= now:
                _, worker, results = heapq.heappop(running)
                done.append(JobDone(worker, results))
            out = step(now, arrivals, (), done)
            for job in out.jobs:
                end, results = self.workers[job.job.worker].run(job.job, now)
                heapq.heappush(running, (end, job.job.worker, results))
            if out.scale:
                pool.apply(out.scale, now)
            # On to the next event: an arrival or a job's end, whichever comes first.
            ends = running[0][0] if running else None
            if pool is not None:  # or a join, or the rule's next look
                ends = pool.next_event(now, ends)
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


class _ElasticPool:
    """The simulated pool's side of `Grow` and `Retire`, and its device time."""

    def __init__(self, sim: _Simulation, elastic: Elastic, cost: CostModel, num_workers: int):
        self.sim, self.elastic, self.cost = sim, elastic, cost
        self.joins: dict[int, float] = {}  # starting worker -> when it joins
        self.charged: dict[int, float] = {w: 0.0 for w in range(num_workers)}  # -> since
        self.device_s = 0.0
        self.sizes: list[tuple[float, int]] = [(0.0, num_workers)]
        self.ever = list(sim.workers.values())

    def apply(self, decisions: list, now: float) -> None:
        for decision in decisions:
            if type(decision) is Grow:
                for w in decision.workers:
                    self.joins[w] = now + self.elastic.start_s
                    self.charged[w] = now
            else:
                w = decision.worker
                self.joins.pop(w, None)
                self.sim.workers.pop(w, None)
                self.device_s += now - self.charged.pop(w)
        self.sizes.append((now, len(self.charged)))

    def joined(self, now: float) -> list:
        """Workers whose start-up is over: fresh devices, nothing cached."""
        due = sorted(w for w, t in self.joins.items() if t <= now)
        for w in due:
            del self.joins[w]
            worker = self.sim.workers[w] = SimWorker(w, self.cost, self.sim.requests)
            self.ever.append(worker)
        return [WorkerJoined(w) for w in due]

    def next_event(self, now: float, ends: float | None) -> float:
        """The sooner of `ends`, the next join and the rule's next look."""
        soonest = now + self.elastic.rule.config.check_s
        if self.joins:
            soonest = min(soonest, min(self.joins.values()))
        return soonest if ends is None else min(ends, soonest)

    def close(self, end: float) -> float:
        return self.device_s + sum(end - since for since in self.charged.values())


def simulate(workload: list[WorkloadRequest], scheduler, num_workers: int, cost: CostModel,
             slo_of, elastic: Elastic | None = None) -> SimOutcome:
    """Run `workload` (sorted by arrival) through `scheduler` on simulated workers; with
    `elastic`, `num_workers` is the pool at the start."""
    stats = PoolStats(num_workers, {w.model: slo_of(w.model) for w in workload})
    config = CoreConfig(num_workers)
    if elastic is not None:
        config = CoreConfig(num_workers, max_workers=elastic.max_workers,
                            scaling=elastic.rule, role_of=elastic.role_of)
    sim = _Simulation(workload, ControllerCore(scheduler, config, stats), {}, slo_of)
    sim.workers = {i: SimWorker(i, cost, sim.requests) for i in range(num_workers)}
    if elastic is not None:
        sim.pool = _ElasticPool(sim, elastic, cost, num_workers)
    with _no_cyclic_gc():
        end = sim.run()
    if sim.pool is None:
        return SimOutcome(sim.timelines, list(sim.workers.values()), end, num_workers * end)
    return SimOutcome(sim.timelines, sim.pool.ever, end, sim.pool.close(end), sim.pool.sizes)


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
