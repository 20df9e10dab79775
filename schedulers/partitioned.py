"""Pinned models: a few hot models keep workers of their own, the long tail pools on the rest.

`PartitionedScheduler` is one `Scheduler` made of several: each pinned model has its own
policy (the fleet's kind) over its dedicated workers, and every other model goes to one
policy over the remaining, pooled workers. Requests route by model, results and membership
by worker. A pinned partition only ever sees its one model: each of its workers loads it
once, as soon as it is idle (at start-up, before any request waits on it), and never
switches again. The inner policy's own Switch units on those workers are dropped: a real
worker would find the model in already (job_runner), but the simulated one would count and
charge them, and a colocated token-level policy sends one from its prefill side and one
from its decode side.

`split_workers` picks the workers: the first by id that both prefill and decode, in pin
order, since a partition of one model must do both on its own workers.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from tokenpool.errors import ConfigError
from tokenpool.schedulers.protocol import Estimate, Scheduler, WorkerPolicyState
from tokenpool.schedulers.types import SLO, Job, RequestInfo, Switch, UnitResult


@dataclass(frozen=True, slots=True)
class WorkerSplit:
    """Which workers each pinned model owns, and the pooled partition's roles."""

    pinned: dict[str, tuple[int, ...]]
    prefill: tuple[int, ...]  # pooled
    decode: tuple[int, ...]  # pooled

    @property
    def pooled(self) -> list[int]:
        return sorted(set(self.prefill) | set(self.decode))


def split_workers(pins: dict[str, int], prefill: Sequence[int], decode: Sequence[int],
                  unpinned_models: bool = True) -> WorkerSplit:
    """Give each pinned model (in `pins` order) its N workers, the first by id among those
    that both prefill and decode; the rest pool. `unpinned_models`: some model is not
    pinned, so the pool must keep a worker of each role for it."""
    pins = {m: n for m, n in pins.items() if n}
    bad = [m for m, n in pins.items() if not isinstance(n, int) or n < 0]
    if bad:
        raise ConfigError(f"pin of {bad[0]!r}: expected a whole number >= 0, got {pins[bad[0]]}")
    both = sorted(set(prefill) & set(decode))
    need = sum(pins.values())
    if need > len(both):
        raise ConfigError(f"pins need {need} workers that both prefill and decode; the pool has "
                          f"{len(both)} (pinned models need colocated workers: "
                          f"pool.prefill_workers: 0)")
    taken, pinned = iter(both), {}
    for model, n in pins.items():
        pinned[model] = tuple(next(taken) for _ in range(n))
    used = {w for ws in pinned.values() for w in ws}
    rest_p = tuple(w for w in prefill if w not in used)
    rest_d = tuple(w for w in decode if w not in used)
    if unpinned_models and not (rest_p and rest_d):
        raise ConfigError(f"pins take {need} of {len(set(prefill) | set(decode))} workers and "
                          "leave none to prefill or decode the unpinned models; pin fewer")
    return WorkerSplit(pinned, rest_p, rest_d)


@dataclass(slots=True)
class _Part:
    policy: Scheduler
    workers: set[int]  # members now (a drained worker stays until removed)
    model: str | None  # the pinned model; None: the pooled partition


class PartitionedScheduler:
    """Pinned partitions plus a pooled one (None where every model is pinned)."""

    def __init__(self, pinned: dict[str, tuple[Scheduler, Sequence[int]]],
                 pooled: tuple[Scheduler, Sequence[int]] | None):
        self.parts = [_Part(policy, set(ws), model) for model, (policy, ws) in pinned.items()]
        self.pooled = None if pooled is None else _Part(pooled[0], set(pooled[1]), None)
        if self.pooled is not None:
            self.parts.append(self.pooled)
        self.name = f"{self.parts[0].policy.name}+pins" if self.parts else "pins"
        self.by_model = {p.model: p for p in self.parts if p.model is not None}
        # A worker's partition, kept after it is removed: if it comes back it rejoins the
        # same one, so a pinned model gets its workers back after a restart.
        self.home = {w: p for p in self.parts for w in p.workers}
        # Pinned workers not yet told to load their model.
        self.unloaded = {w: p.model for p in self.parts if p.model for w in sorted(p.workers)}

    @property
    def pinned(self) -> dict[int, str]:
        """Each pinned worker's model, for a scaler choosing whom to drain (not these)."""
        return {w: p.model for p in self.parts if p.model for w in p.workers}

    def _part_of_model(self, model: str) -> _Part:
        part = self.by_model.get(model, self.pooled)
        if part is None:
            raise ValueError(f"model {model!r} is not pinned and no worker is pooled")
        return part

    # -- requests and work ---------------------------------------------------------------------

    def add_request(self, req: RequestInfo, now: float) -> None:
        self._part_of_model(req.model).policy.add_request(req, now)

    def schedule(self, idle_workers: Iterable[int], now: float) -> list[Job]:
        idle = idle_workers if isinstance(idle_workers, (set, frozenset)) else set(idle_workers)
        jobs: list[Job] = []
        for part in self.parts:
            mine = idle & part.workers
            if not mine:
                continue
            got = part.policy.schedule(mine, now)
            jobs += got if part.model is None else [self._pinned(j, part.model) for j in got]
        if self.unloaded:  # start-up: load each idle pinned worker's model before it is asked
            given = {j.worker for j in jobs}
            jobs += [self._pinned(Job(w, ()), self.unloaded[w])
                     for w in sorted(idle & self.unloaded.keys() - given)]
        return jobs

    def _pinned(self, job: Job, model: str) -> Job:
        """`job` on a pinned worker: its Switch units dropped, one load in front if the
        worker has not loaded `model` yet."""
        units = tuple(u for u in job.units if type(u) is not Switch)
        if self.unloaded.pop(job.worker, None) is not None:
            units = (Switch(job.worker, model),) + units
        return job if units == job.units else Job(job.worker, units)

    def update(self, results: Iterable[UnitResult], now: float) -> None:
        results = results if isinstance(results, (list, tuple)) else list(results)
        if not results:
            return
        home = self.home
        first = home[results[0].worker]
        if all(home[r.worker] is first for r in results):  # one job's results: the usual case
            first.policy.update(results, now)
            return
        for part in self.parts:
            mine = [r for r in results if home[r.worker] is part]
            if mine:
                part.policy.update(mine, now)

    def num_unfinished(self) -> int:
        return sum(p.policy.num_unfinished() for p in self.parts)

    def estimate(self, req: RequestInfo, slo: SLO) -> Estimate | None:
        return self._part_of_model(req.model).policy.estimate(req, slo)

    def worker_state(self, worker: int) -> WorkerPolicyState | None:
        part = self.home.get(worker)
        return None if part is None else part.policy.worker_state(worker)

    # -- membership: a pinned partition keeps its size; new workers pool -----------------------

    def add_worker(self, worker: int, role: str) -> None:
        part = self.home.get(worker, self.pooled)
        if part is None:
            raise ValueError(f"worker {worker} is new and no partition pools workers")
        if part.model is not None and worker not in part.workers:
            self.unloaded[worker] = part.model  # back after a loss: it holds no weights
        self.home[worker] = part
        part.workers.add(worker)  # (a draining one taken back keeps what it holds)
        part.policy.add_worker(worker, role)

    def drain_worker(self, worker: int) -> None:
        self.home[worker].policy.drain_worker(worker)

    def remove_worker(self, worker: int) -> None:
        part = self.home[worker]
        part.policy.remove_worker(worker)
        part.workers.discard(worker)
        self.unloaded.pop(worker, None)

    def holds(self, worker: int) -> int:
        part = self.home.get(worker)
        return 0 if part is None else part.policy.holds(worker)
