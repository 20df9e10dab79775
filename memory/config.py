"""The `memory:` block of a fleet file."""

from __future__ import annotations

from dataclasses import dataclass

from tokenpool.errors import ConfigError


@dataclass(frozen=True, slots=True)
class MemoryConfig:
    # One worker's whole arena: KV slabs plus its weight slots. None: the engine's
    # kv_cache_bytes of KV plus the slots, whatever the models need.
    arena_bytes: int | None = None
    slab_bytes: int = 64 << 20  # KV slab size; a page of every model must fit in one
    # Node-wide budget for packed weights in the host cache; least recently used models are
    # evicted past it and read from disk again when needed.
    host_cache_bytes: int = 32 << 30
    # Where the host cache's files live: a tmpfs. One mounted with huge=always published 7x
    # faster in docs/host-cache.md.
    host_cache_dir: str = "/dev/shm"
    swap_bytes: int = 1 << 30  # host KV swap space per worker (preempted / swapped batches)
    prefetch: bool = True  # a second weight slot, filled in the background with the next model

    @property
    def num_slots(self) -> int:
        """Weight slots in a worker's arena: the active model's, and the prefetch one."""
        return 2 if self.prefetch else 1

    def __post_init__(self):
        for name in ("slab_bytes", "host_cache_bytes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"memory.{name} must be >= 1, got {getattr(self, name)}")
        if self.swap_bytes < 0:
            raise ConfigError(f"memory.swap_bytes must be >= 0, got {self.swap_bytes}")
        if self.arena_bytes is not None and self.arena_bytes < self.slab_bytes:
            raise ConfigError(f"memory.arena_bytes ({self.arena_bytes}) is smaller than one "
                              f"slab ({self.slab_bytes})")
