"""A worker: one device whose arena is shared by an engine per fleet model.

Each model keeps its own requests (waiting, running, swapped) in its own `LLMEngine`; only the
model switched in may step. `switch` copies a model's packed weights into the arena (or takes
the prefetched slot) and rebinds that engine's views. KV pages of every model stay in the
shared slabs across switches unless a batch is swapped out to make room.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from tokenpool.gpu_pool.device import dtype_name, resolve_device
from tokenpool.gpu_pool.engine import EngineConfig, LLMEngine
from tokenpool.gpu_pool.weight_copy import WeightCopier
from tokenpool.gpu_pool.weight_slots import WeightSlots
from tokenpool.gpu_pool.worker_memory import ModelLayout, WorkerMemory
from tokenpool.memory.config import MemoryConfig


@dataclass(frozen=True, slots=True)
class SwitchRecord:
    model_id: str
    seconds: float
    bytes_copied: int  # 0 when the weights were already there (active or prefetched)
    prefetched: bool


class Worker:
    def __init__(self, models: list[ModelLayout], host_bytes: Callable[[str], torch.Tensor],
                 engine_config: EngineConfig = EngineConfig(),
                 memory_config: MemoryConfig = MemoryConfig(),
                 tokenizers: dict | None = None):
        self.device = resolve_device(engine_config.device)
        self.memory = WorkerMemory(models, self.device, memory_config,
                                   engine_config.kv_cache_bytes, memory_config.num_slots)
        self.slots = WeightSlots(self.memory, WeightCopier(self.device), host_bytes)
        tokenizers = tokenizers or {}
        self.engines = {
            m.model_id: LLMEngine(
                m.config, None, dataclasses.replace(engine_config, dtype=dtype_name(m.dtype)),
                tokenizers.get(m.model_id), memory=self.memory.engine_memory(m.model_id),
                model_id=m.model_id, weight_bytes=m.index.nbytes)
            for m in models}
        self.active: str | None = None
        self.num_switches = 0
        self.switch_seconds = 0.0

    def engine(self, model_id: str) -> LLMEngine:
        return self.engines[model_id]

    def switch(self, model_id: str) -> SwitchRecord:
        """Make `model_id` the model this worker computes with."""
        if model_id not in self.engines:
            raise KeyError(f"model {model_id!r} is not on this worker")
        if model_id == self.active:
            return SwitchRecord(model_id, 0.0, 0, False)
        start = time.perf_counter()
        prefetched = self.slots.load(model_id)
        if self.active is not None:
            self.engines[self.active].bind(None)
        self.engines[model_id].bind(self.slots.weights())
        self.active = model_id
        seconds = time.perf_counter() - start
        self.num_switches += 1
        self.switch_seconds += seconds
        copied = 0 if prefetched else self.memory.models[model_id].index.nbytes
        return SwitchRecord(model_id, seconds, copied, prefetched)

    def prefetch(self, model_id: str) -> bool:
        """Copy `model_id`'s weights into the spare slot in the background."""
        return self.slots.prefetch(model_id)

    def cached_pages(self) -> dict[str, int]:
        """Pages in the prefix cache per model (held or retained), models with none left out."""
        counts: dict[str, int] = {}
        for cache in {id(e.memory.pages): e.memory.pages for e in self.engines.values()}.values():
            counts.update(cache.cached_pages())
        return counts

    def usage(self) -> dict[str, dict[str, int]]:
        """Bytes used and free per arena region and swap space."""
        return {**self.memory.usage(), **self.slots.usage()}

    def close(self) -> None:
        self.slots.wait_prefetch()
