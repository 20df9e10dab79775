"""The controller core: admission, dispatch, finishing and recovery, once, for every clock.

`ControllerCore.step(now, arrivals, cancels, results)` takes what happened since the last
step and returns the jobs to start and what to tell clients. It has no threads, locks or
clocks: the simulator drives it on a virtual clock over simulated workers (sim/simulator.py),
and `tokenpool serve` from one thin threaded shell over real workers (controller/service.py).
Token streaming never passes through it: the shell hands a worker's step outputs straight to
each request's stream.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from tokenpool.controller import recovery
from tokenpool.controller.core_types import (Arrival, CoreStep, Failed, Rejected, Tracked,
                                             WorkerJoined, WorkerLost)
from tokenpool.controller.elastic import PoolMembers
from tokenpool.controller.page_names import PageNamer
from tokenpool.controller.pool_stats import PoolSnapshot, PoolStats
from tokenpool.gpu_pool.pool import WorkerInfo
from tokenpool.gpu_pool.protocol import JobDone, JobInput
from tokenpool.schedulers.admission import SLOAdmission
from tokenpool.schedulers.protocol import Scheduler
from tokenpool.schedulers.scaling import ScalingRule
from tokenpool.schedulers.types import Decode, Job, Prefill, PrefillDone, SwapIn


@dataclass(slots=True)
class CoreConfig:
    num_workers: int
    prefill_only: frozenset[int] = field(default_factory=frozenset)  # export KV after prefill
    admission: SLOAdmission | None = None  # None: admit everything (the simulator)
    # Names a retried request's prompt pages (controller.page_names.PageNamer); None: a
    # retry keeps the names of its first try.
    page_names: PageNamer | None = None
    # The elastic pool: worker ids below max_workers (None: num_workers, a fixed pool), the
    # rule that grows and shrinks it (None: only losses and rejoins change it), and each
    # id's role (PoolConfig.role on a real pool).
    max_workers: int | None = None
    scaling: ScalingRule | None = None
    role_of: Callable[[int], str] = field(default=lambda worker: "prefill+decode")
    # Workers the scaling rule leaves alone: the ones pinned models own (never drained, and
    # not what growth is measured on, since new workers join the pooled ones).
    unscaled: frozenset[int] = frozenset()


class ControllerCore:
    def __init__(self, scheduler: Scheduler, config: CoreConfig, stats: PoolStats,
                 cost=None):
        """`cost`: the policy's CostModel, to set measured decode turns against (None: not
        measured, as in simulation)."""
        self.scheduler = scheduler
        self.config = config
        self.stats = stats
        self.cost = cost
        self.requests: dict[str, Tracked] = {}
        self.cancelled: set[str] = set()
        self.handoffs: dict = {}  # request id -> SequenceHandoff between prefill and decode
        self.idle = set(range(config.num_workers))
        self.jobs: dict[int, Job] = {}
        self.prefill_only = set(config.prefill_only)
        self.members = PoolMembers(scheduler, config.num_workers,
                                   config.max_workers or config.num_workers, config.role_of,
                                   config.scaling, config.unscaled)
        stats.reserve(self.members.max_workers)

    def step(self, now: float, arrivals: Iterable[Arrival] = (), cancels: Iterable[str] = (),
             results: Iterable[JobDone | WorkerLost | WorkerJoined] = ()) -> CoreStep:
        out = CoreStep([], [], [])
        for arrival in arrivals:
            self._arrive(arrival, now, out)
        for request_id in cancels:
            self._cancel(request_id)
        for result in results:
            kind = type(result)
            if kind is WorkerLost:
                self._lose_worker(result, now, out)
            elif kind is WorkerJoined:
                self._join(result.worker, now)
            else:
                self._finish_job(result, now, out)
        if self.members.rule is not None:
            self.members.scale(now, self.idle, out.scale)
        if self.idle:
            for job in self.scheduler.schedule(self.idle, now):
                self._dispatch(job, now, out)
        return out

    # -- requests ------------------------------------------------------------------------------

    def _arrive(self, arrival: Arrival, now: float, out: CoreStep) -> None:
        info = arrival.info
        admission, rule = self.config.admission, self.members.rule
        if admission is not None:
            verdict = admission.decide(self.scheduler, info, arrival.slo,
                                       self.stats.num_waiting)
            if rule is not None:
                rule.arrived(now, not verdict.admit)
            if not verdict.admit:
                self.stats.rejected(info.model)
                out.events.append(Rejected(info.request_id, verdict.reason,
                                           verdict.retry_after_s))
                return
        elif rule is not None:  # no admission (the simulator): admission's TTFT test
            estimate = self.scheduler.estimate(info, arrival.slo)
            rule.arrived(now, estimate is not None and
                         estimate.predicted_ttft_s > arrival.slo.ttft_s)
        self.requests[info.request_id] = Tracked(arrival, now)
        self.stats.arrived(info.model)
        self.scheduler.add_request(info, now)

    def _cancel(self, request_id: str) -> None:
        """The client is gone: the worker holding it aborts it on its next job, frees its
        pages, and reports it finished so the policy forgets it."""
        if request_id in self.requests and request_id not in self.cancelled:
            self.cancelled.add(request_id)
            self.stats.cancelled += 1

    def _forget(self, request_id: str, out: CoreStep) -> None:
        tracked = self.requests.pop(request_id, None)
        self.handoffs.pop(request_id, None)
        if tracked is None:
            return
        self.stats.finished(tracked.arrival.info.model, tracked.decoding)
        self.cancelled.discard(request_id)
        out.ended.append(request_id)

    # -- jobs ----------------------------------------------------------------------------------

    def _dispatch(self, job: Job, now: float, out: CoreStep) -> None:
        self.idle.discard(job.worker)
        self.jobs[job.worker] = job
        self.stats.busy(job.worker)
        self.members.started(job.worker, now)
        out.jobs.append(self._job_input(job))

    def _job_input(self, job: Job) -> JobInput:
        prompts, handoffs, resumed = {}, {}, {}
        requests = self.requests
        for unit in job.units:
            kind = type(unit)
            if kind is Prefill:
                for rid in unit.request_ids:
                    tracked = requests[rid]
                    tracked.worker = job.worker
                    if tracked.arrival.prompt is not None:
                        prompts[rid] = tracked.arrival.prompt
                    if tracked.resumed:
                        resumed[rid] = tracked.resumed
            elif kind is Decode or kind is SwapIn:
                for rid in unit.request_ids:
                    requests[rid].worker = job.worker
                    if rid in self.handoffs:
                        handoffs[rid] = self.handoffs.pop(rid)
        cancelled = tuple(rid for rid in self.cancelled
                          if requests[rid].worker in (job.worker, None)) \
            if self.cancelled else ()
        return JobInput(job, prompts, handoffs, cancelled, job.worker in self.prefill_only,
                        resumed)

    def _finish_job(self, done: JobDone, now: float, out: CoreStep) -> None:
        if done.worker in self.members.up:
            self.idle.add(done.worker)
        self.jobs.pop(done.worker, None)
        self.members.finished(done.worker, now)
        if done.handoffs:
            self.handoffs.update(done.handoffs)
            for rid in done.handoffs:  # its state now lives here, until a decode worker takes it
                self.requests[rid].worker = None
        self.stats.job_done(done)
        if self.cost is not None:
            for t in done.decode_timings:
                predicted = self.cost.decode_step_time(t.model, t.batch, t.context) * t.steps
                self.stats.decode_timed(t.seconds, predicted)
        for rid, message in done.errors.items():
            out.events.append(Failed(rid, message))
        self.scheduler.update(done.results, now)
        for result in done.results:
            if type(result) is PrefillDone:
                self._prefilled(result.request_ids)
            for rid in result.finished:
                self._forget(rid, out)

    def _prefilled(self, request_ids: tuple[str, ...]) -> None:
        for rid in request_ids:
            tracked = self.requests.get(rid)
            if tracked is not None and not tracked.decoding:
                tracked.decoding = True
                self.stats.prefilled(tracked.arrival.info.model)

    def _lose_worker(self, lost: WorkerLost, now: float, out: CoreStep) -> None:
        """The worker died, and the state of every request it held with it: each is
        started again elsewhere from its prompt plus the tokens its client has. The worker
        is down, out of the policy, until its pool brings it back (`WorkerJoined`)."""
        worker = lost.worker
        self.stats.worker_lost(worker)
        job = self.jobs.pop(worker, None)
        on_it = [rid for rid, t in self.requests.items() if t.worker == worker]
        self.scheduler.update(recovery.finished_results(worker, job, on_it, self.requests), now)
        self.members.lost(worker, self.idle, out.scale)  # before the retries are placed
        for rid in on_it:
            tracked = self.requests[rid]
            streamed = lost.streamed.get(rid)
            if streamed is not None and tracked.retries < recovery.MAX_RETRIES:
                self._retry(tracked, streamed, now)
                continue
            if streamed is not None:  # still wanted, but lost too often
                self.stats.lost += 1
                out.events.append(Failed(rid, recovery.give_up_message(worker, lost.error)))
            self._forget(rid, out)  # its client has its end already: a final event, or gone

    def _join(self, worker: int, now: float) -> None:
        if self.members.joined(worker, now, self.idle) and \
                self.config.role_of(worker) == "prefill":
            self.prefill_only.add(worker)  # it exports KV after prefill, as at start

    def _retry(self, tracked: Tracked, streamed: tuple[int, ...], now: float) -> None:
        tracked.worker = None
        tracked.retries += 1
        self.stats.recomputed += 1
        tracked.resumed = streamed
        self.scheduler.add_request(recovery.retry_info(tracked, self.config.page_names), now)

    # -- the operator's view -----------------------------------------------------------------

    def snapshot(self, infos: list[WorkerInfo]) -> PoolSnapshot:
        return self.stats.snapshot(infos, self.jobs, self.requests.values(),
                                   self.scheduler.worker_state, self.members.state_of)
