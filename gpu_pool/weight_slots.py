"""A worker's weight slots: which model each holds, synchronous loads, background prefetch.

A slot receives a model as one copy of its packed bytes to an offset from the slot's bump
allocator (reset first: the previous model is dropped as a whole), and is then bound as views.
With two slots, the spare one is filled in a background thread while the active model
computes; switching to it is then a pointer swap. Nothing here allocates framework memory:
the bytes already exist in the arena and the host cache.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch

from tokenpool.gpu_pool.decoder import DecoderWeights
from tokenpool.gpu_pool.weight_copy import WeightCopier
from tokenpool.gpu_pool.weights import bind_weights
from tokenpool.gpu_pool.worker_memory import WorkerMemory
from tokenpool.memory.arena import BumpAllocator


class WeightSlots:
    def __init__(self, memory: WorkerMemory, copier: WeightCopier,
                 host_bytes: Callable[[str], torch.Tensor]):
        self.memory = memory
        self.copier = copier
        self.host_bytes = host_bytes  # model id -> its packed bytes in host memory (uint8)
        self.allocators = [BumpAllocator(region) for region in memory.layout.slots]
        self.holds: list[str | None] = [None] * len(self.allocators)
        self.active = 0
        self._weights: dict[int, DecoderWeights] = {}
        # A model lands at the same offset of a slot every time (the slot's allocator is reset
        # first), so its views there are made once rather than on every switch.
        self._views: dict[tuple[int, str], DecoderWeights] = {}
        self._copy_done: dict[int, object] = {}  # CUDA events of copies still in flight
        self._prefetch: threading.Thread | None = None
        self._prefetch_error: BaseException | None = None

    @property
    def spare(self) -> int | None:
        return None if len(self.holds) < 2 else 1 - self.active

    def load(self, model_id: str) -> bool:
        """Make `model_id` the active slot's model; True if no copy was needed."""
        self.wait_prefetch()
        if self.holds[self.active] == model_id:
            return True
        spare = self.spare
        if spare is not None and self.holds[spare] == model_id:
            self.active = spare
            prefetched = True
        else:
            self._fill(self.active, model_id)
            prefetched = False
        self.copier.wait(self._copy_done.pop(self.active, None))
        return prefetched

    def weights(self) -> DecoderWeights:
        return self._weights[self.active]

    def prefetch(self, model_id: str) -> bool:
        """Start filling the spare slot with `model_id`; False if there is nothing to do."""
        spare = self.spare
        if spare is None or model_id in self.holds:
            return False
        self.wait_prefetch()
        self.holds[spare] = None  # not usable until the copy is complete
        self._prefetch = threading.Thread(target=self._fill_in_background,
                                          args=(spare, model_id), daemon=True,
                                          name=f"prefetch-{model_id}")
        self._prefetch.start()
        return True

    def wait_prefetch(self) -> None:
        if self._prefetch is not None:
            self._prefetch.join()
            self._prefetch = None
        if self._prefetch_error is not None:
            error, self._prefetch_error = self._prefetch_error, None
            raise RuntimeError("prefetching weights failed") from error

    def usage(self) -> dict[str, dict[str, int]]:
        return {a.region.name: {"used": a.used, "free": a.free} for a in self.allocators}

    def _fill_in_background(self, slot: int, model_id: str) -> None:
        try:
            self._fill(slot, model_id)
        except BaseException as exc:  # surfaced by the next wait_prefetch
            self._prefetch_error = exc

    def _fill(self, slot: int, model_id: str) -> None:
        layout = self.memory.models[model_id]
        nbytes = layout.index.nbytes
        self.holds[slot] = None
        self._weights.pop(slot, None)
        allocator = self.allocators[slot]
        allocator.reset()
        start = allocator.alloc(nbytes)
        dst = self.memory.arena[start: start + nbytes]
        self._copy_done[slot] = self.copier.copy(self.host_bytes(model_id), dst)
        if (slot, model_id) not in self._views:
            self._views[slot, model_id] = bind_weights(layout.config, layout.index, dst)
        self._weights[slot] = self._views[slot, model_id]
        self.holds[slot] = model_id
