"""Counters of the serving pool, kept by the controller and read by /pool and /metrics."""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from dataclasses import dataclass, field

from tokenpool.schedulers.types import SLO

# Upper bounds (s) of the switch-duration histogram: a GPU switch takes ms, a CPU one tens
# of ms, a cold read from disk seconds. Counted here rather than kept per switch, so the
# record stays the same size however long the server runs and however rarely it is scraped.
SWITCH_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


@dataclass(frozen=True, slots=True)
class WorkerView:
    id: int
    role: str
    device: str
    pid: int
    model: str | None
    state: str  # "idle" | "busy" | "draining" | "starting" | "dead"
    queued: int  # requests placed here, not prefilled yet
    running: int  # requests decoding here
    kv_pages_used: int
    switches: int
    failures: int
    restarts: int
    policy: object = None  # the policy's view of it (schedulers WorkerPolicyState), if any
    cached_pages: dict = field(default_factory=dict)  # model -> prefix-cache pages held here
    node: str = ""  # the Ray node id, or the host name of a local worker


@dataclass(frozen=True, slots=True)
class ModelView:
    id: str
    waiting: int
    running: int
    slo: SLO
    switches: int
    switch_seconds: float
    switch_counts: tuple[int, ...]  # per SWITCH_BUCKETS bound
    kv_swap_bytes: int
    rejected: int
    switch_bytes: int = 0  # weight bytes its switches copied (0 for one already prefetched)
    cached_pages: int = 0  # its prefix-cache pages, summed over the workers


@dataclass(frozen=True, slots=True)
class PoolSnapshot:
    """The pool as the controller last published it: what `GET /pool`, `/health` and
    `/metrics` read, without waiting on the controller."""

    workers: tuple[WorkerView, ...]
    models: tuple[ModelView, ...]
    cancelled: int
    loop_errors: int
    recomputed: int
    lost: int
    decode_step_ratio: float | None

    @property
    def num_held(self) -> int:
        return sum(m.waiting + m.running for m in self.models)

    def as_json(self) -> dict:
        """`GET /pool`'s body (DESIGN §6)."""
        return {"workers": [_worker_json(w) for w in self.workers],
                "models": [_model_json(m) for m in self.models],
                "cancelled": self.cancelled, "loop_errors": self.loop_errors,
                "recomputed": self.recomputed, "lost": self.lost,
                "decode_step_ratio": self.decode_step_ratio}


def _worker_json(w: WorkerView) -> dict:
    body = {"id": w.id, "node": w.node, "role": w.role, "device": w.device, "pid": w.pid, "model": w.model,
            "state": w.state, "queued": w.queued, "running": w.running,
            "kv_pages_used": w.kv_pages_used, "switches": w.switches, "failures": w.failures,
            "restarts": w.restarts, "cached_pages": dict(w.cached_pages)}
    if w.policy is not None:
        body.update(decode_slowdown=round(w.policy.decode_slowdown, 3),
                    decode_alpha=round(w.policy.decode_alpha, 3),
                    decode_requests=w.policy.decode_requests)
    return body


def _state(info, busy: bool, member: str | None) -> str:
    """A worker's state in /pool: "dead" (lost, until it is back and the controller has
    taken it in again), "starting", "busy", "draining" (idle, taking nothing new) or "idle"."""
    if member == "down" or not (info.alive or info.starting):
        return "dead"
    if member == "starting" or info.starting:
        return "starting"
    return "busy" if busy else member or "idle"


def _model_json(m: ModelView) -> dict:
    return {"id": m.id, "waiting": m.waiting, "running": m.running,
            "slo": {"ttft_s": m.slo.ttft_s, "tbt_s": m.slo.tbt_s}, "switches": m.switches,
            "switch_seconds": m.switch_seconds, "switch_counts": list(m.switch_counts),
            "kv_swap_bytes": m.kv_swap_bytes, "rejected": m.rejected,
            "switch_bytes": m.switch_bytes, "cached_pages": m.cached_pages,
            "bytes_per_switch": m.switch_bytes / m.switches if m.switches else None}


@dataclass(slots=True)
class ModelCounters:
    waiting: int = 0  # accepted, first token not out yet
    running: int = 0  # decoding
    switches: int = 0  # workers switched to this model
    switch_seconds: float = 0.0
    # switch_counts[i]: switches that took at most SWITCH_BUCKETS[i] (and more than the
    # bound before); the ones longer than the last bound are switches - sum(switch_counts).
    switch_counts: list[int] = field(default_factory=lambda: [0] * len(SWITCH_BUCKETS))
    kv_swap_bytes: int = 0
    rejected: int = 0
    switch_bytes: int = 0


@dataclass(slots=True)
class WorkerCounters:
    model: str | None = None
    busy: bool = False
    switches: int = 0
    kv_pages_used: int = 0
    failures: int = 0
    jobs: int = 0
    # model -> prefix-cache pages, as the last job left them. Replaced, never changed in
    # place, so a published snapshot may share it.
    cached_pages: dict = field(default_factory=dict)


@dataclass(slots=True)
class PoolStats:
    num_workers: int
    slos: dict  # model id -> SLO
    models: dict[str, ModelCounters] = field(default_factory=dict)
    workers: list[WorkerCounters] = field(default_factory=list)
    cancelled: int = 0
    loop_errors: int = 0  # controller loop steps that raised (bugs; logged with a traceback)
    recomputed: int = 0  # requests started again after their worker died
    lost: int = 0  # requests ended with an error after losing their worker too often
    # Decode turns' wall time, streaming included, and the cost model's prediction for the
    # same steps, summed since start: how much slower than its start-up profile the pool has
    # decoded under the load it had (what the simulator must be told to predict it).
    decode_measured_s: float = 0.0
    decode_predicted_s: float = 0.0

    def __post_init__(self):
        self.models = {m: ModelCounters() for m in self.slos}
        self.workers = [WorkerCounters() for _ in range(self.num_workers)]

    def reserve(self, num_workers: int) -> None:
        """Counters for worker ids up to `num_workers` (an elastic pool's max_workers)."""
        self.workers += [WorkerCounters() for _ in range(num_workers - len(self.workers))]

    @property
    def num_waiting(self) -> int:
        return sum(m.waiting for m in self.models.values())

    def arrived(self, model: str) -> None:
        self.models[model].waiting += 1

    def rejected(self, model: str) -> None:
        self.models[model].rejected += 1

    def prefilled(self, model: str) -> None:
        self.models[model].waiting -= 1
        self.models[model].running += 1

    def finished(self, model: str, prefilled: bool) -> None:
        counters = self.models[model]
        if prefilled:
            counters.running -= 1
        else:
            counters.waiting -= 1

    def busy(self, worker: int) -> None:
        self.workers[worker].busy = True
        self.workers[worker].jobs += 1

    def job_done(self, done) -> None:
        w = self.workers[done.worker]
        w.busy = False
        w.model = done.model
        w.kv_pages_used = done.kv_pages_used
        w.cached_pages = dict(done.cached_pages)
        for switch in done.switches:
            counters = self.models[switch.model]
            counters.switches += 1
            counters.switch_seconds += switch.seconds
            counters.switch_bytes += switch.bytes_copied
            w.switches += 1
            bucket = bisect_left(SWITCH_BUCKETS, switch.seconds)
            if bucket < len(SWITCH_BUCKETS):
                counters.switch_counts[bucket] += 1
        if done.kv_swap_bytes and done.model in self.models:
            self.models[done.model].kv_swap_bytes += done.kv_swap_bytes

    def decode_timed(self, measured_s: float, predicted_s: float) -> None:
        self.decode_measured_s += measured_s
        self.decode_predicted_s += predicted_s

    @property
    def decode_step_ratio(self) -> float | None:
        if self.decode_predicted_s <= 0.0:
            return None
        return self.decode_measured_s / self.decode_predicted_s

    def worker_lost(self, worker: int) -> None:
        w = self.workers[worker]
        w.busy, w.model, w.kv_pages_used = False, None, 0
        w.cached_pages = {}  # its cache died with it
        w.failures += 1

    def snapshot(self, infos, jobs: dict, requests, worker_state,
                 membership=lambda worker: None) -> PoolSnapshot:
        """`requests`: the core's Tracked requests; `worker_state(worker)`: the policy's view
        of a worker (None for policies without one); `membership(worker)`: the core's, where
        it is "down", "starting" or "draining" (None: up)."""
        queued, running = Counter(), Counter()
        for tracked in requests:
            if tracked.worker is not None:
                (running if tracked.decoding else queued)[tracked.worker] += 1
        workers = tuple(self._worker_view(info, info.id in jobs, queued[info.id],
                                          running[info.id], worker_state(info.id),
                                          membership(info.id))
                        for info in infos)
        cached = self._cached_pages_per_model()
        models = tuple(ModelView(model, c.waiting, c.running, self.slos[model], c.switches,
                                 c.switch_seconds, tuple(c.switch_counts), c.kv_swap_bytes,
                                 c.rejected, c.switch_bytes, cached[model])
                       for model, c in self.models.items())
        return PoolSnapshot(workers, models, self.cancelled, self.loop_errors,
                            self.recomputed, self.lost, self.decode_step_ratio)

    def _cached_pages_per_model(self) -> Counter:
        cached = Counter()
        for w in self.workers:
            cached.update(w.cached_pages)
        return cached

    def _worker_view(self, info, busy: bool, queued: int, running: int, policy,
                     member: str | None) -> WorkerView:
        w = self.workers[info.id]
        state = _state(info, busy, member)
        return WorkerView(info.id, info.role, info.device, info.pid, w.model, state, queued,
                          running, w.kv_pages_used, w.switches, w.failures, info.restarts,
                          policy, w.cached_pages, info.node)
