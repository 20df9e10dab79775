"""The `pool:` block of a fleet file: how many workers, their roles, and where they run."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from tokenpool.errors import ConfigError
from tokenpool.schedulers.scaling import interleaved_role


@dataclass(frozen=True, slots=True)
class PoolConfig:
    # local: every worker is a thread of the serving process; ray: one Ray actor per worker.
    backend: Literal["local", "ray"] = "local"
    num_workers: int = 2  # workers at start (an elastic pool then moves within min..max)
    # An elastic pool's bounds (None: num_workers, a fixed pool). The scaling rule
    # (schedulers/scaling.py) grows towards max_workers and drains down to min_workers.
    min_workers: int | None = None
    max_workers: int | None = None
    # 0: colocated roles, every worker prefills and decodes. N > 0: the first N workers
    # prefill only and hand KV to the others, which decode only (Aegaeon's disaggregation);
    # an elastic pool's workers past num_workers keep that prefill share (role()).
    prefill_workers: int = 0
    # Ray only. None: start a local cluster (dashboard off); "auto": join the running one
    # (`ray start --head` on the head node); or a cluster address such as "ray://host:10001".
    ray_address: str | None = None
    num_cpus: int | None = None  # CPUs of a local Ray cluster; default: what the workers need
    cpus_per_worker: float = 1.0  # Ray CPU slots per worker on CPU nodes (num_gpus=1 on GPU)
    # Ray only, CPU nodes: a custom resource each worker actor asks one unit of, so workers
    # go only to nodes that declare it (`ray start --resources='{"tokenpool_worker": 2}'`)
    # and Ray's autoscaler knows what kind of node a pending worker needs. None: CPUs only.
    worker_resource: str | None = None
    torch_threads: int = 1  # intra-op threads per worker
    max_restarts: int = -1  # Ray restarts a dead worker actor this often (-1: always)
    object_store_bytes: int = 256 << 20  # a local Ray cluster's object store
    # Tasks a local Ray cluster's GCS keeps events of (for `ray list tasks`), ~0.5 KiB each.
    # Every job is an actor task, many a second, so Ray's 100,000 would grow the GCS by
    # ~50 MiB over the server's first hour before it levels off.
    ray_task_events: int = 10_000

    def __post_init__(self):
        if self.num_workers < 1:
            raise ConfigError(f"pool.num_workers must be >= 1, got {self.num_workers}")
        if not 0 <= self.prefill_workers < self.num_workers or \
                (self.prefill_workers and self.num_workers < 2):
            raise ConfigError(f"pool.prefill_workers must be 0 (colocated) or between 1 and "
                              f"num_workers - 1 ({self.num_workers - 1}); "
                              f"got {self.prefill_workers}")
        low, high = self.workers_range
        if not 1 <= low <= self.num_workers <= high:
            raise ConfigError(f"pool needs 1 <= min_workers ({low}) <= num_workers "
                              f"({self.num_workers}) <= max_workers ({high})")
        if self.torch_threads < 1 or self.cpus_per_worker <= 0:
            raise ConfigError("pool.torch_threads must be >= 1 and pool.cpus_per_worker > 0")

    @property
    def workers_range(self) -> tuple[int, int]:
        """(min_workers, max_workers), either one defaulting to num_workers."""
        return (self.num_workers if self.min_workers is None else self.min_workers,
                self.num_workers if self.max_workers is None else self.max_workers)

    @property
    def elastic(self) -> bool:
        return self.workers_range != (self.num_workers, self.num_workers)

    @property
    def prefill_ids(self) -> tuple[int, ...]:
        return tuple(range(self.prefill_workers or self.num_workers))

    @property
    def decode_ids(self) -> tuple[int, ...]:
        return tuple(range(self.prefill_workers, self.num_workers))

    def role(self, worker: int) -> str:
        """Worker ids past num_workers (an elastic pool's growth) interleave the roles so
        that every prefix of ids keeps the initial prefill share: prefill grows with decode."""
        if not self.prefill_workers:
            return "prefill+decode"
        if worker >= self.num_workers:
            return interleaved_role(worker, self.prefill_workers, self.num_workers)
        return "prefill" if worker < self.prefill_workers else "decode"
