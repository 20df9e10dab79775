"""The serving controller: a thin threaded shell that drives the controller core on the wall
clock over a pool of real workers.

The edge never waits on it: `submit` and `cancel` only queue (admission's answer comes back as
the request's first event), and `snapshot()` returns what the loop last published. One loop
thread owns the core; the pool's threads queue job ends and failures for it. Tokens take the
short path: a worker's step outputs go from the pool's thread straight to each request's sink
(the proxy's queue), never through the loop.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from tokenpool.controller.core import ControllerCore
from tokenpool.controller.core_types import (Arrival, CoreStep, Failed, Rejected,
                                             WorkerJoined, WorkerLost)
from tokenpool.controller.page_names import PageNamer
from tokenpool.controller.pool_stats import PoolSnapshot
from tokenpool.controller.serving_types import ServeRequest, TokenEvent
from tokenpool.errors import UnavailableError
from tokenpool.gpu_pool.protocol import JobDone, StepOutputs
from tokenpool.schedulers.scaling import Grow
from tokenpool.schedulers.types import RequestInfo

Sink = Callable[[TokenEvent], None]
log = logging.getLogger(__name__)
IDLE_WAKE_S = 0.5  # how long an idle loop sleeps
# The snapshot is republished at most this often: building one walks every request held, and
# a busy loop steps hundreds of times a second.
PUBLISH_EVERY_S = 0.05


@dataclass(slots=True)
class Stream:
    """A request's way to its client, until its final event."""

    sink: Sink | None  # None once the client is gone or has its final event
    emitted: list[int] = field(default_factory=list)  # the tokens its client has


class ServingController:
    def __init__(self, pool, page_names: PageNamer | None = None):
        """`page_names`: names each prompt's KV pages for cache-aware placement (None:
        requests carry none)."""
        self.pool = pool
        self.page_names = page_names
        self.core: ControllerCore | None = None
        self._started = time.monotonic()  # the core's clock: seconds since this
        self._wake = threading.Event()
        self._inbox: deque = deque()  # Arrival | str (a cancel), from the edge
        # JobDone | WorkerJoined | (worker, error), from the pool's threads
        self._results: deque = deque()
        self._streams: dict[str, Stream] = {}
        self._snapshot: PoolSnapshot | None = None
        self._published_at = 0.0
        self._thread: threading.Thread | None = None
        self._closing = False

    # -- life ---------------------------------------------------------------------------------

    def start(self, core: ControllerCore) -> None:
        """Serve with `core` (the pool is started already: it profiled the cost the policy
        needs); requests are accepted from now on."""
        self.core = core
        self._publish()
        self._thread = threading.Thread(target=self._loop, name="tokenpool-controller",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop scheduling; the pool and the requests held are left as they are."""
        self._closing = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def close(self) -> None:
        self.stop()
        for request_id, stream in list(self._streams.items()):
            self._end(stream, "the server is shutting down", request_id)
        self.pool.close()

    # -- the edge's side (any thread; never blocks) -------------------------------------------

    def submit(self, req: ServeRequest, sink: Sink) -> None:
        """Queue `req`; its events go to `sink`, the first of them a refusal if admission
        sheds it. Raises UnavailableError when the server is not serving."""
        if self._closing or self._thread is None:
            raise UnavailableError("the server is not accepting requests")
        self._streams[req.request_id] = Stream(sink)
        names = self.page_names(req.model, req.prompt_ids) if self.page_names else ()
        info = RequestInfo(req.request_id, req.model, len(req.prompt_ids),
                           time.monotonic() - self._started, req.params.max_tokens, names)
        self._inbox.append(Arrival(info, req.slo, (req.prompt_ids, req.params)))
        self._wake.set()

    def cancel(self, request_id: str) -> None:
        """The client is gone: drop its events; its worker frees its pages on its next job."""
        stream = self._streams.get(request_id)
        if stream is None or stream.sink is None:
            return
        stream.sink = None
        self._inbox.append(request_id)
        self._wake.set()

    def snapshot(self) -> PoolSnapshot:
        """The pool as the loop last published it, at most PUBLISH_EVERY_S after its last
        step."""
        return self._snapshot

    # -- the pool's side (its threads) --------------------------------------------------------

    def on_step(self, out: StepOutputs) -> None:
        for output in out.outputs:
            stream = self._streams.get(output.request_id)
            sink = stream.sink if stream is not None else None
            if sink is None:
                continue
            if output.finished:
                stream.sink = None
            else:  # only this worker's thread appends, and only while the request is on it
                stream.emitted.extend(output.new_token_ids)
            sink(TokenEvent.of(output, out.emitted_at))

    def on_done(self, done: JobDone) -> None:
        self._results.append(done)
        self._wake.set()

    def on_failure(self, worker: int, error: BaseException) -> None:
        self._results.append((worker, error))
        self._wake.set()

    def on_joined(self, worker: int) -> None:
        self._results.append(WorkerJoined(worker))
        self._wake.set()

    # -- the loop -----------------------------------------------------------------------------

    def _loop(self) -> None:
        stale = False  # a step ran since the last publish
        while not self._closing:
            self._wake.wait(timeout=PUBLISH_EVERY_S if stale else IDLE_WAKE_S)
            self._wake.clear()
            try:
                self._apply(self.core.step(time.monotonic() - self._started,
                                           *self._drain()))
            except Exception:  # a bug must not stop the loop: later requests still run,
                # and a request it stranded ends at its proxy timeout with an error.
                self.core.stats.loop_errors += 1
                log.exception("controller loop step failed")
            stale = time.monotonic() - self._published_at < PUBLISH_EVERY_S
            if not stale:
                self._publish()

    def _drain(self) -> tuple[list, list, list]:
        arrivals, cancels, results = [], [], []
        while self._inbox:
            item = self._inbox.popleft()
            (cancels if type(item) is str else arrivals).append(item)
        while self._results:
            item = self._results.popleft()
            results.append(self._lost(*item) if type(item) is tuple else item)
        return arrivals, cancels, results

    def _lost(self, worker: int, error: BaseException) -> WorkerLost:
        open_streams = {rid: tuple(s.emitted) for rid, s in list(self._streams.items())
                        if s.sink is not None}
        return WorkerLost(worker, str(error), open_streams)

    def _apply(self, step: CoreStep) -> None:
        for job in step.jobs:
            self.pool.run(job.job.worker, job)
        for decision in step.scale:
            if type(decision) is Grow:
                log.info("pool grows: starting workers %s", list(decision.workers))
                self.pool.add_workers(decision.workers)
            else:
                log.info("pool shrinks: retiring drained worker %d", decision.worker)
                self.pool.retire(decision.worker)
        for event in step.events:
            stream = self._streams.get(event.request_id)
            if type(event) is Rejected:
                self._streams.pop(event.request_id, None)
                if stream is not None and stream.sink is not None:
                    stream.sink(TokenEvent.rejected(event.request_id, event.reason,
                                                    event.retry_after_s))
            elif type(event) is Failed and stream is not None:
                self._end(stream, event.message, event.request_id)
        for request_id in step.ended:
            stream = self._streams.pop(request_id, None)
            if stream is not None:  # ended without a final output: say so
                self._end(stream, "the request ended without a final token", request_id)

    @staticmethod
    def _end(stream: Stream, message: str, request_id: str) -> None:
        sink, stream.sink = stream.sink, None
        if sink is not None:
            sink(TokenEvent(request_id, finished=True, finish_reason="error", error=message,
                            emitted_at=time.monotonic()))

    def _publish(self) -> None:
        self._snapshot = self.core.snapshot(self.pool.workers())
        self._published_at = time.monotonic()
