"""Small factories and reference runners shared by tests."""

from __future__ import annotations

import os
from contextlib import contextmanager

import pytest
import torch

from tokenpool.gpu_pool.engine import EngineConfig, LLMEngine
from tokenpool.gpu_pool.weights import pack_weights
from tokenpool.gpu_pool.worker import Worker
from tokenpool.gpu_pool.worker_memory import ModelLayout
from tokenpool.memory.config import MemoryConfig

NEAR_TIE = 0.01  # HF top-2 logit gap below which float rounding may flip the greedy choice


def random_prompts(lengths, seed=0, vocab=49152) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    # Skip the first ids: SmolLM2's special tokens live there.
    return [torch.randint(100, vocab, (n,), generator=g).tolist() for n in lengths]


def hf_greedy(model, prompt_ids: list[int], new_tokens: int) -> tuple[list[int], list[float]]:
    """HF's greedy tokens from raw logits, and per step the gap between its two best logits.

    A plain loop over HF's forward with its own KV cache: `generate(min_new_tokens=...)` would
    mask EOS, so it is not a neutral reference when EOS is ignored.
    """
    import inspect

    # transformers 5 renames past_key_values to cache (the old name goes in 5.40)
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters \
        else "past_key_values"
    tokens, gaps = [], []
    ids, past = torch.tensor([prompt_ids]), None
    with torch.inference_mode():
        for _ in range(new_tokens):
            out = model(ids, use_cache=True, **{cache_arg: past})
            logits = out.logits[0, -1].float()
            top2 = logits.topk(2).values
            gaps.append(float(top2[0] - top2[1]))
            tokens.append(int(logits.argmax()))
            past = out.past_key_values if hasattr(out, "past_key_values") else out.cache
            ids = torch.tensor([[tokens[-1]]])
    return tokens, gaps


def agreed_prefix(ours: list[int], ref: list[int], gaps: list[float]) -> int:
    """Length of the compared prefix. Fails unless any divergence sits at a near tie."""
    for i, (a, b) in enumerate(zip(ours, ref)):
        if a != b:
            assert gaps[i] < NEAR_TIE, (
                f"diverged at step {i}: ours {a}, HF {b}, HF top-2 gap {gaps[i]:.4f} "
                f"is not a near tie\nours {ours}\nref  {ref}")
            return i
    assert len(ours) == len(ref), f"length differs: {len(ours)} vs {len(ref)}"
    return len(ours)


def make_engine(checkpoint, **overrides) -> LLMEngine:
    defaults = {"dtype": "float32", "kv_cache_bytes": 64 << 20}
    return LLMEngine.from_checkpoint(checkpoint, EngineConfig(**{**defaults, **overrides}))


_READERS: dict = {}


@contextmanager
def parse_gguf_once():
    """transformers builds a gguf.GGUFReader for the config, again for the weights and again
    for the tokenizer, each 5-10 s for SmolLM2 on 2 cores. Hand it the same (read-only) reader
    instead; what it reads is unchanged."""
    gguf = pytest.importorskip("gguf")
    real = gguf.GGUFReader

    def shared(path, *args, **kwargs):
        key = (str(path), args, tuple(sorted(kwargs.items())))
        if key not in _READERS:
            _READERS[key] = real(path, *args, **kwargs)
        return _READERS[key]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gguf, "GGUFReader", shared)
        yield


def worker_over(checkpoints: dict, *, kv_cache_bytes: int = 4 << 20, slab_bytes: int = 1 << 20,
                swap_bytes: int = 4 << 20, max_num_seqs: int = 64, prefetch: bool = False,
                **engine) -> Worker:
    """A worker over its own arena with one engine per checkpoint (model id -> checkpoint);
    `engine`: other EngineConfig settings."""
    layouts, packed = [], {}
    for name, ckpt in checkpoints.items():
        layout = ModelLayout.of(name, ckpt.config, torch.float32)
        buffer = torch.empty(layout.index.nbytes, dtype=torch.uint8)
        pack_weights(ckpt.config, ckpt.weights, layout.index, buffer)
        layouts.append(layout)
        packed[name] = buffer
    config = EngineConfig(dtype="float32", kv_cache_bytes=kv_cache_bytes,
                          max_num_seqs=max_num_seqs, **engine)
    memory = MemoryConfig(slab_bytes=slab_bytes, swap_bytes=swap_bytes, prefetch=prefetch)
    return Worker(layouts, packed.__getitem__, config, memory,
                  {name: ckpt.tokenizer for name, ckpt in checkpoints.items()})


@contextmanager
def packed_fleet(fleet, namespace: str, budget_bytes: int | None = None):
    """A fleet's FleetWeights over a real /dev/shm host cache (`budget_bytes`, else the
    fleet's), populated; the cache's files are removed afterwards."""
    from tokenpool.gpu_pool.fleet_weights import FleetModels, FleetWeights
    from tokenpool.memory.host_cache import HostModelCache

    budget = fleet.memory.host_cache_bytes if budget_bytes is None else budget_bytes
    cache = HostModelCache(budget, f"{namespace}{os.getpid()}")
    try:
        weights = FleetWeights(FleetModels(fleet), cache)
        weights.populate(progress=False)
        yield weights
    finally:
        cache.close()
        cache.destroy()


# Two tiny synthetic Llamas on one local worker; CACHE: the host cache's directory.
TINY_FLEET = """\
models:
  - {id: t0, source: "synth:2,64,4,2@1"}
  - {id: t1, source: "synth:2,64,4,2@2"}
engine: {device: cpu, dtype: float32, kv_cache_bytes: 16MiB}
memory: {slab_bytes: 4MiB, host_cache_bytes: 256MiB, swap_bytes: 8MiB, host_cache_dir: CACHE}
pool: {backend: local, num_workers: 1}
slo: {ttft_s: 30, tbt_s: 5}
"""


def synthetic_checkpoints(root, shapes: dict) -> dict:
    """model id -> a loaded synthetic checkpoint of each shape (write_synthetic_checkpoint's
    arguments), written under `root`, seeded 5, 6, ... in order."""
    from tokenpool.models.checkpoint import load_checkpoint
    from tokenpool.models.synth import write_synthetic_checkpoint

    return {name: load_checkpoint(write_synthetic_checkpoint(root / name, seed=i + 5, **shape),
                                  progress=False)
            for i, (name, shape) in enumerate(shapes.items())}
