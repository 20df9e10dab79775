"""One worker's memory, materialised: the arena on its device, host swap space, and views.

`memory/` decides the layout and keeps the books; this module makes the two allocations a
worker ever does (the arena on its device and the host swap space) and hands out views:
KV caches per page shape, weight slots, and the scratch buffers (CPU bf16 upcast; quantized
weights dequantized for batch-sized matmuls). Nothing here allocates
again after start-up.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenpool.gpu_pool.cpu_ops import upcast_scratch
from tokenpool.gpu_pool.kv_cache import PagedKVCache
from tokenpool.gpu_pool.weights import (Formats, largest_quantized_numel,
                                        largest_tensor_numel, packed_index)
from tokenpool.memory.arena import ArenaLayout, ModelFootprint, plan_worker_arena
from tokenpool.memory.config import MemoryConfig
from tokenpool.memory.packing import PackIndex
from tokenpool.memory.prefix_cache import PrefixCache
from tokenpool.memory.slabs import BLOCK_SIZE, PageShape, ShapePages, SlabPool
from tokenpool.models.config import ModelConfig


@dataclass(frozen=True, slots=True)
class ModelLayout:
    """A model as memory sees it: its config, serving dtype and packed layout."""

    model_id: str
    config: ModelConfig
    dtype: torch.dtype
    index: PackIndex

    @classmethod
    def of(cls, model_id: str, config: ModelConfig, dtype: torch.dtype,
           tied: bool | None = None, formats: Formats | None = None) -> "ModelLayout":
        return cls(model_id, config, dtype, packed_index(config, dtype, tied, formats))

    @property
    def page_shape(self) -> PageShape:
        c = self.config
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return PageShape(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, itemsize)

    @property
    def footprint(self) -> ModelFootprint:
        return ModelFootprint(self.model_id, self.index.nbytes, self.page_shape.page_bytes)


def plan_arena(models: list[ModelLayout], config: MemoryConfig, kv_cache_bytes: int,
               num_slots: int) -> ArenaLayout:
    """A worker's arena for `models`, as `WorkerMemory` allocates it."""
    return plan_worker_arena([m.footprint for m in models], config.arena_bytes, kv_cache_bytes,
                             config.slab_bytes, num_slots)


def kv_pages(arena: ArenaLayout, shape: PageShape) -> int:
    """Pages of `shape` the arena's KV slabs hold when every slab holds that shape: what an
    engine's `memory.pages.capacity` is. A slab's tail too small for a page holds none."""
    return SlabPool(arena.num_slabs, arena.slab_bytes).capacity(shape)


def max_model_len(config: ModelConfig, limit: int | None, num_pages: int) -> int:
    """The longest sequence (prompt plus output) an engine takes: `limit` (the engine's
    max_model_len; None: the model's), the model's positions, and its `num_pages` of KV."""
    positions = config.context_length
    return min(limit or positions, positions, num_pages * BLOCK_SIZE)


@dataclass(frozen=True, slots=True)
class EngineMemory:
    """What one model's engine uses of its worker's memory."""

    kv: PagedKVCache
    pages: PrefixCache  # the shape's pages, shared and retained by prefix name
    swap_kv: PagedKVCache | None  # host copy space for swapped-out pages; None: no swapping
    swap_pages: ShapePages | None
    scratch: torch.Tensor | None
    quant_scratch: torch.Tensor | None


class WorkerMemory:
    def __init__(self, models: list[ModelLayout], device: torch.device, config: MemoryConfig,
                 kv_cache_bytes: int, num_slots: int):
        self.device = device
        self.models = {m.model_id: m for m in models}
        self.layout = plan_arena(models, config, kv_cache_bytes, num_slots)
        slab = self.layout.slab_bytes
        # Zeroed once so every page is resident: the first switch must not page-fault.
        self.arena = torch.zeros(self.layout.total_bytes, dtype=torch.uint8, device=device)
        kv = self.layout.kv
        self.kv_region = self.arena[kv.offset: kv.end]
        self.slots = [self.arena[s.offset: s.end] for s in self.layout.slots]
        self.kv_pool = SlabPool(self.layout.num_slabs, slab)
        swap_slabs = config.swap_bytes // slab
        self.swap_region = torch.empty(swap_slabs * slab, dtype=torch.uint8,
                                       pin_memory=device.type == "cuda")
        self.swap_pool = SlabPool(swap_slabs, slab)
        self._scratch = self._make_scratch(models)
        quant_numel = max(largest_quantized_numel(m.index) for m in models)
        self._quant_scratch = torch.empty(quant_numel, dtype=torch.float32, device=device) \
            if quant_numel else None
        self._engine_memory: dict[PageShape, tuple] = {}

    def _make_scratch(self, models: list[ModelLayout]) -> torch.Tensor | None:
        bf16 = [m for m in models if m.dtype == torch.bfloat16]
        if not bf16:
            return None
        numel = max(largest_tensor_numel(m.index) for m in bf16)
        return upcast_scratch(torch.bfloat16, self.device, numel)

    def engine_memory(self, model_id: str) -> EngineMemory:
        """Views for one model; models with the same page shape share them."""
        m = self.models[model_id]
        shape = m.page_shape
        if shape not in self._engine_memory:
            slab = self.layout.slab_bytes
            kv = PagedKVCache(self.kv_region, shape, slab, m.dtype)
            swap = PagedKVCache(self.swap_region, shape, slab, m.dtype) \
                if self.swap_pool.num_slabs else None
            self._engine_memory[shape] = (kv, PrefixCache(self.kv_pool, shape), swap,
                                          ShapePages(self.swap_pool, shape) if swap else None)
        kv, pages, swap, swap_pages = self._engine_memory[shape]
        scratch = self._scratch if m.dtype == torch.bfloat16 else None
        return EngineMemory(kv, pages, swap, swap_pages, scratch, self._quant_scratch)

    def usage(self) -> dict[str, dict[str, int]]:
        """Bytes used and free per region, for metrics."""
        kv_used, kv_cached = self.kv_pool.used_bytes, self.kv_pool.retained_bytes
        swap_used = self.swap_pool.used_bytes
        return {
            # cached: prefix-cache pages no request holds, freed as soon as pages are short
            "kv": {"used": kv_used, "cached": kv_cached,
                   "free": self.layout.kv.size - kv_used - kv_cached},
            "swap": {"used": swap_used, "free": self.swap_region.numel() - swap_used},
        }
