"""The serving controller: the policies' loop on the wall clock, over a pool of real workers.

It is `controller/loop.py`'s schedule -> dispatch -> update, made online: requests arrive
from the proxy at any time (`submit`), clients cancel (`cancel`), and jobs end when the pool
says so (`on_done`, from the pool's threads). One lock guards the policy and the request
table; the loop thread holds it only while it updates and schedules, never while a job runs.

Tokens take the short path: a worker's step outputs go from the pool's thread straight to
each request's sink (the proxy's queue), not through the loop.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from tokenpool.controller import recovery
from tokenpool.controller.loop import WallClock
from tokenpool.controller.pool_stats import PoolStats
from tokenpool.controller.serving_types import ServeRequest, TokenEvent
from tokenpool.gpu_pool.protocol import JobDone, JobInput, StepOutputs
from tokenpool.errors import OverloadedError, UnavailableError
from tokenpool.schedulers.admission import SLOAdmission
from tokenpool.schedulers.types import Decode, Job, Prefill, PrefillDone, RequestInfo, SwapIn

Sink = Callable[[TokenEvent], None]
log = logging.getLogger(__name__)


@dataclass(slots=True)
class Tracked:
    """A request the controller holds, until the policy has forgotten it."""

    request: ServeRequest
    sink: Sink | None  # None once the client is gone or has its finished event
    admitted: float  # on the controller's clock
    worker: int | None = None  # where its state lives, once a job took it
    decoding: bool = False  # past prefill
    # The tokens its client has: should its worker die, a new prefill starts from them.
    emitted: list[int] = field(default_factory=list)
    retries: int = 0  # times it was started again after losing its worker


class ServingController:
    def __init__(self, scheduler, pool, admission: SLOAdmission, roles, slos: dict):
        """`slos`: model id -> SLO, for every model the proxy may submit."""
        self.scheduler = scheduler
        self.cost = None  # the policy's cost model: what decode turns are timed against
        self.pool = pool
        self.admission = admission
        self.prefill_only = set(roles.prefill) - set(roles.decode)
        self.clock = WallClock()
        self.stats = PoolStats(pool.config.num_workers, slos)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._done: deque = deque()  # JobDone or (worker, error), from the pool's threads
        self._requests: dict[str, Tracked] = {}
        self._cancelled: set[str] = set()
        self._handoffs: dict = {}  # request id -> SequenceHandoff between prefill and decode
        self._idle = set(range(pool.config.num_workers))
        self._jobs: dict[int, Job] = {}
        self._thread: threading.Thread | None = None
        self._closing = False

    # -- life ---------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the pool, then the loop (the scheduler must be set by then)."""
        self.pool.start(self)
        self.start_loop()

    def start_loop(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="tokenpool-controller",
                                        daemon=True)
        self._thread.start()

    def stop_loop(self) -> None:
        """Stop scheduling; the pool and the requests held are left as they are."""
        self._closing = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def close(self) -> None:
        self.stop_loop()
        with self._lock:
            for rid in list(self._requests):
                self._fail(rid, "the server is shutting down")
        self.pool.close()

    # -- the proxy's side (any thread) --------------------------------------------------------

    def submit(self, req: ServeRequest, sink: Sink) -> None:
        """Accept `req` or raise OverloadedError / UnavailableError; events go to `sink`."""
        if self._closing or self._thread is None:
            raise UnavailableError("the server is not accepting requests")
        with self._lock:
            now = self.clock.now()
            info = RequestInfo(req.request_id, req.model, len(req.prompt_ids), now,
                               req.params.max_tokens)
            verdict = self.admission.decide(self.scheduler, info, req.slo,
                                            self.stats.num_waiting)
            if not verdict.admit:
                self.stats.rejected(req.model)
                raise OverloadedError(verdict.reason, verdict.retry_after_s)
            self._requests[req.request_id] = Tracked(req, sink, now)
            self.stats.arrived(req.model)
            self.scheduler.add_request(info, now)
        self._wake.set()

    def cancel(self, request_id: str) -> None:
        """The client is gone: drop its events; the worker frees its pages on its next job."""
        with self._lock:
            tracked = self._requests.get(request_id)
            if tracked is None or tracked.sink is None:
                return
            tracked.sink = None
            self._cancelled.add(request_id)
            self.stats.cancelled += 1
        self._wake.set()

    # -- the pool's side (its threads) --------------------------------------------------------

    def on_step(self, out: StepOutputs) -> None:
        for output in out.outputs:
            tracked = self._requests.get(output.request_id)
            sink = tracked.sink if tracked is not None else None
            if sink is None:
                continue
            if output.finished:
                tracked.sink = None
            else:  # only this worker's thread appends, and only while the request is on it
                tracked.emitted.extend(output.new_token_ids)
            sink(TokenEvent.of(output, out.emitted_at))

    def on_done(self, done: JobDone) -> None:
        self._done.append(done)
        self._wake.set()

    def on_failure(self, worker: int, error: BaseException) -> None:
        self._done.append((worker, error))
        self._wake.set()

    # -- the loop -----------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._closing:
            self._wake.wait(timeout=0.5)
            self._wake.clear()
            with self._lock:
                try:
                    self._step(self.clock.now())
                except Exception:  # a bug must not stop the loop: later requests still run,
                    # and a request it stranded ends at its proxy timeout with an error.
                    self.stats.loop_errors += 1
                    log.exception("controller loop step failed")

    def _step(self, now: float) -> None:
        while self._done:
            item = self._done.popleft()
            if isinstance(item, JobDone):
                self._finish_job(item, now)
            else:
                self._lose_worker(*item, now)
        self._dispatch(now)

    def _dispatch(self, now: float) -> None:
        if not self._idle:
            return
        for job in self.scheduler.schedule(self._idle, now):
            self._idle.discard(job.worker)
            self._jobs[job.worker] = job
            self.stats.busy(job.worker)
            self.pool.run(job.worker, self._job_input(job))

    def _job_input(self, job: Job) -> JobInput:
        prompts, handoffs, resumed = {}, {}, {}
        for unit in job.units:
            if type(unit) is Prefill:
                for rid in unit.request_ids:
                    tracked = self._requests[rid]
                    tracked.worker = job.worker
                    prompts[rid] = (tracked.request.prompt_ids, tracked.request.params)
                    if tracked.emitted:
                        resumed[rid] = tuple(tracked.emitted)
            elif type(unit) in (Decode, SwapIn):
                for rid in unit.request_ids:
                    self._requests[rid].worker = job.worker
                    if rid in self._handoffs:
                        handoffs[rid] = self._handoffs.pop(rid)
        cancelled = tuple(rid for rid in self._cancelled
                          if self._requests[rid].worker in (job.worker, None))
        return JobInput(job, prompts, handoffs, cancelled, job.worker in self.prefill_only,
                        resumed)

    def _finish_job(self, done: JobDone, now: float) -> None:
        self._idle.add(done.worker)
        self._jobs.pop(done.worker, None)
        self._handoffs.update(done.handoffs)
        for rid in done.handoffs:  # its state now lives here, until a decode worker takes it
            self._requests[rid].worker = None
        self.stats.job_done(done)
        self._time_decodes(done)
        for rid, message in getattr(done, "errors", {}).items():
            self._fail(rid, message)
        self.scheduler.update(done.results, now)
        for result in done.results:
            if type(result) is PrefillDone:
                for rid in result.request_ids:
                    if rid in self._requests and not self._requests[rid].decoding:
                        self._requests[rid].decoding = True
                        self.stats.prefilled(self._requests[rid].request.model)
            for rid in result.finished:
                self._forget(rid)

    def _time_decodes(self, done: JobDone) -> None:
        if self.cost is None:
            return
        for t in done.decode_timings:
            predicted = self.cost.decode_step_time(t.model, t.batch, t.context) * t.steps
            self.stats.decode_timed(t.seconds, predicted)

    def _forget(self, rid: str) -> None:
        tracked = self._requests.pop(rid, None)
        self._handoffs.pop(rid, None)
        if tracked is None:
            return
        self.stats.finished(tracked.request.model, tracked.decoding)
        if rid in self._cancelled:
            self._cancelled.discard(rid)
        elif tracked.sink is not None:  # finished without a final output: say so
            self._fail(rid, "the request ended without a final token")

    def _fail(self, rid: str, message: str) -> None:
        tracked = self._requests.get(rid)
        if tracked is None or tracked.sink is None:
            return
        sink, tracked.sink = tracked.sink, None
        sink(TokenEvent(rid, finished=True, finish_reason="error", error=message,
                        emitted_at=time.monotonic()))

    def _lose_worker(self, worker: int, error: BaseException, now: float) -> None:
        """The worker died (the pool restarts it), and the state of every request it held
        with it: each is started again from its prompt plus the tokens its client has."""
        self.stats.worker_lost(worker)
        job = self._jobs.pop(worker, None)
        lost = [rid for rid, t in self._requests.items() if t.worker == worker]
        self._idle.add(worker)
        self.scheduler.update(recovery.finished_results(worker, job, lost, self._requests), now)
        for rid in lost:
            tracked = self._requests[rid]
            if recovery.can_retry(tracked):
                self._retry(tracked, now)
                continue
            if tracked.sink is not None:
                self.stats.lost += 1
                self._fail(rid, recovery.give_up_message(worker, error))
            self._forget(rid)  # ended for its client already: a final event, or cancelled

    def _retry(self, tracked: Tracked, now: float) -> None:
        tracked.worker = None
        tracked.retries += 1
        self.stats.recomputed += 1
        self.scheduler.add_request(recovery.retry_info(tracked), now)

    # -- the operator's view ------------------------------------------------------------------

    def snapshot(self) -> dict:
        """The pool as `GET /pool` shows it, plus the counters behind /metrics."""
        with self._lock:
            snapshot = self.stats.snapshot(self.pool.workers(), self._jobs, self._requests)
            decode = getattr(self.scheduler, "decode", None)  # token-level policies
            for worker in snapshot["workers"] if decode is not None else ():
                if worker["id"] in decode.workers:
                    state = decode.workers[worker["id"]]
                    worker["decode_slowdown"] = round(state.slowdown, 3)
                    worker["decode_alpha"] = round(state.alpha, 3)
                    worker["decode_requests"] = len(state.requests)
            return snapshot
