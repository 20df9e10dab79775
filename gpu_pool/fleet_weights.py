"""The fleet's packed weights: layouts from checkpoint headers, bytes from the host cache.

Reading a model's config and tokenizer needs no weights (a GGUF header or config.json), so a
fleet file is checked against the arena when it loads. Weights are read from disk only to
fill the node's host cache, once per model (aliases of one checkpoint are packed from one
read), and again only after the cache evicted them.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch
from tqdm import tqdm

from tokenpool.errors import ConfigError
from tokenpool.gpu_pool.device import resolve_device, resolve_dtype
from tokenpool.gpu_pool.weights import pack_weights
from tokenpool.gpu_pool.worker_memory import (ModelLayout, kv_pages, max_model_len,
                                              plan_arena)
from tokenpool.memory.arena import ArenaLayout, ArenaTooSmallError
from tokenpool.memory.host_cache import HostModelCache
from tokenpool.memory.packing import PackIndex
from tokenpool.models.checkpoint import load_checkpoint, read_model_info, read_weight_formats
from tokenpool.models.locate import resolve_source
from tokenpool.models.quant_plan import plan_formats


def host_tensor(buffer) -> torch.Tensor:
    """A uint8 tensor over a (read-only) host buffer, without copying it."""
    with warnings.catch_warnings():  # read-only is intended: switches only read from it
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(buffer, dtype=torch.uint8)


class FleetModels:
    """Every model of a fleet as memory sees it, plus its tokenizer."""

    def __init__(self, fleet):
        self.fleet = fleet
        self.device = resolve_device(fleet.engine.device)
        self.sources = {m.id: resolve_source(m.source, fleet.base_dir) for m in fleet.models}
        infos: dict[Path, tuple] = {}
        self.layouts: dict[str, ModelLayout] = {}
        self.tokenizers = {}
        for spec in fleet.models:
            path = self.sources[spec.id]
            if path not in infos:
                infos[path] = (*read_model_info(path), read_weight_formats(path))
            config, tokenizer, stored = infos[path]
            engine = fleet.engine_config(spec.id)
            dtype = resolve_dtype(engine.dtype, self.device)
            tied = config.tie_word_embeddings
            formats = plan_formats(config, engine.quantization, tied, stored)
            self.layouts[spec.id] = ModelLayout.of(spec.id, config, dtype, tied, formats)
            self.tokenizers[spec.id] = tokenizer

    def arena(self) -> ArenaLayout:
        """One worker's arena, laid out as the worker lays it out (`gpu_pool.worker`)."""
        fleet = self.fleet
        return plan_arena(list(self.layouts.values()), fleet.memory,
                          fleet.engine.kv_cache_bytes, fleet.memory.num_slots)

    def kv_pages(self) -> dict[str, int]:
        """Model id -> the KV pages of its shape one worker holds (its engine's capacity)."""
        arena = self.arena()
        return {m: kv_pages(arena, layout.page_shape) for m, layout in self.layouts.items()}

    def max_model_lens(self) -> dict[str, int]:
        """Model id -> the context (prompt plus output) a worker's engine of it takes."""
        limit = self.fleet.engine.max_model_len
        return {m: max_model_len(self.layouts[m].config, limit, pages)
                for m, pages in self.kv_pages().items()}

    def check_fits(self) -> None:
        """Refuse a fleet whose models cannot fit a worker's arena, naming model and sizes."""
        mem = self.fleet.memory
        if not Path(mem.host_cache_dir).is_dir():
            raise ConfigError(f"memory.host_cache_dir: {mem.host_cache_dir} is not a directory")
        try:
            self.arena()
        except ArenaTooSmallError as exc:
            raise ConfigError(f"memory: {exc}") from exc
        for m in self.layouts.values():
            if m.index.nbytes > mem.host_cache_bytes:
                raise ConfigError(f"memory: model {m.model_id!r} packs to {m.index.nbytes} B, "
                                  f"more than memory.host_cache_bytes ({mem.host_cache_bytes})")


class FleetWeights:
    """Packed weights of a fleet in a node's host cache, loaded from disk on demand."""

    def __init__(self, models: FleetModels, cache: HostModelCache):
        self.models = models
        self.cache = cache
        self.cache.loader = self.load
        self._checkpoint = None  # the last checkpoint read, reused by its aliases

    def host_bytes(self, model_id: str) -> torch.Tensor:
        index, buffer = self.cache.get(model_id)
        if index != self.models.layouts[model_id].index:
            raise ValueError(f"the host cache {self.cache.namespace!r} holds {model_id!r} "
                             "packed in another layout (dtype or quantization)")
        return host_tensor(buffer)

    def load(self, model_id: str) -> tuple[PackIndex, object]:
        """The host cache's loader: read the checkpoint and pack it into the cache's buffer."""
        layout = self.models.layouts[model_id]
        checkpoint = self._read(self.models.sources[model_id])

        def fill(buffer) -> None:
            pack_weights(layout.config, checkpoint.weights, layout.index,
                       torch.frombuffer(buffer, dtype=torch.uint8))

        return layout.index, fill

    def populate(self, progress: bool = True) -> list[str]:
        """Pack models into the cache in fleet order while they fit its budget; their ids.

        The rest are packed on first use, evicting the least recently used.
        """
        ids = [m for m in self.models.layouts if not self.cache.contains(m)]
        packed = []
        for model_id in tqdm(ids, desc="packing fleet", unit="model", delay=1.0,
                             file=sys.stderr, disable=not progress or not ids):
            nbytes = self.models.layouts[model_id].index.nbytes
            if self.cache.used_bytes + nbytes > self.cache.budget_bytes:
                continue
            self.cache.get(model_id)
            packed.append(model_id)
        self._checkpoint = None
        return packed

    def _read(self, path: Path):
        """The checkpoint at `path`, a GGUF's quantized tensors kept as they are: packing
        dequantizes those its model holds in floats."""
        if self._checkpoint is None or self._checkpoint[0] != path:
            self._checkpoint = (path, load_checkpoint(path, progress=False, quantized=True))
        return self._checkpoint[1]
