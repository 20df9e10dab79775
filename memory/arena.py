"""The layout of a worker's arena: `[KV slabs | active weights | prefetch weights]`.

One buffer is allocated per worker at start-up (by gpu_pool, which owns devices); this module
decides where everything goes in it and keeps the accounts. Weights are placed by a bump
allocator that is reset as a whole when a slot receives another model, so a switch never frees
or allocates anything piecemeal and cannot fragment.
"""

from __future__ import annotations

from dataclasses import dataclass

ALIGN = 256  # bytes; what CUDA's allocator guarantees, and a cache-line multiple on CPUs


def align_up(n: int, align: int = ALIGN) -> int:
    return -(-n // align) * align


class ArenaTooSmallError(ValueError):
    """The arena cannot hold what was asked of it."""


@dataclass(frozen=True, slots=True)
class Region:
    name: str
    offset: int
    size: int

    @property
    def end(self) -> int:
        return self.offset + self.size


class BumpAllocator:
    """Hands out aligned ranges of a region in order; only `reset()` gives them back."""

    def __init__(self, region: Region, align: int = ALIGN):
        self.region = region
        self.align = align
        self._next = region.offset

    @property
    def used(self) -> int:
        return self._next - self.region.offset

    @property
    def free(self) -> int:
        return self.region.size - self.used

    def alloc(self, nbytes: int) -> int:
        """The absolute offset of `nbytes` fresh bytes."""
        if nbytes < 0:
            raise ValueError(f"cannot allocate {nbytes} B")
        start = align_up(self._next, self.align)
        if start + nbytes > self.region.end:
            raise ArenaTooSmallError(f"{self.region.name}: {nbytes} B asked, "
                                     f"{self.region.end - start} B left")
        self._next = start + nbytes
        return start

    def reset(self) -> None:
        self._next = self.region.offset


@dataclass(frozen=True, slots=True)
class ArenaLayout:
    kv: Region
    slots: tuple[Region, ...]  # weight slots: the active one and, with prefetch, a spare
    slab_bytes: int

    @property
    def total_bytes(self) -> int:
        return max([self.kv.end] + [s.end for s in self.slots])

    @property
    def num_slabs(self) -> int:
        return self.kv.size // self.slab_bytes

    @classmethod
    def plan(cls, arena_bytes: int, slot_bytes: int, num_slots: int,
             slab_bytes: int) -> "ArenaLayout":
        """Weight slots of `slot_bytes` each at the top; whole slabs of KV below them."""
        slot_bytes = align_up(slot_bytes)
        weights = slot_bytes * num_slots
        kv_bytes = (arena_bytes - weights) // ALIGN * ALIGN // slab_bytes * slab_bytes
        if kv_bytes < slab_bytes:
            raise ArenaTooSmallError(
                f"arena of {arena_bytes} B: {num_slots} weight slot(s) of {slot_bytes} B leave "
                f"{max(0, arena_bytes - weights)} B, less than one {slab_bytes} B KV slab")
        kv = Region("kv", 0, kv_bytes)
        base = align_up(kv_bytes)
        slots = tuple(Region(f"weights{i}", base + i * slot_bytes, slot_bytes)
                      for i in range(num_slots))
        return cls(kv, slots, slab_bytes)


@dataclass(frozen=True, slots=True)
class ModelFootprint:
    """What a model needs from a worker: its packed weights and one KV page."""

    model_id: str
    weight_bytes: int
    page_bytes: int


def plan_worker_arena(models: list[ModelFootprint], arena_bytes: int | None,
                      kv_bytes: int, slab_bytes: int, num_slots: int) -> ArenaLayout:
    """Lay out a worker's arena for a fleet, or refuse with the model and sizes at fault.

    With `arena_bytes` None the arena is `kv_bytes` of KV plus the slots. A KV region smaller
    than one slab becomes a single slab of its own size, so small engines stay small.
    """
    slot_bytes = max(m.weight_bytes for m in models)
    if arena_bytes is None:
        if kv_bytes < slab_bytes:
            slab_bytes = max(ALIGN, kv_bytes // ALIGN * ALIGN)
        arena_bytes = kv_bytes // slab_bytes * slab_bytes + num_slots * align_up(slot_bytes)
    for m in models:
        if m.page_bytes > slab_bytes:
            raise ArenaTooSmallError(
                f"model {m.model_id!r}: a KV page of {m.page_bytes} B does not fit a "
                f"{slab_bytes} B slab; raise memory.slab_bytes")
        room = arena_bytes - slab_bytes
        if num_slots * align_up(m.weight_bytes) > room:
            raise ArenaTooSmallError(
                f"model {m.model_id!r}: {num_slots} weight slot(s) of {m.weight_bytes} B plus "
                f"one {slab_bytes} B KV slab exceed the {arena_bytes} B arena; raise "
                f"memory.arena_bytes or turn memory.prefetch off")
    return ArenaLayout.plan(arena_bytes, slot_bytes, num_slots, slab_bytes)
