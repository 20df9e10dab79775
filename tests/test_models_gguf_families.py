"""GGUF twins of every family case: same config, same weights, same greedy tokens as the HF dir.

Each case of tests/family_checkpoints.py is written as an HF dir and converted to GGUF the way
llama.cpp's converter does (tests/gguf_twins.py). Where the converter drops something or
llama.cpp assumes a value the file cannot state, the twin is a different model from the HF
dir; CONVERTER_LOSSES records those as the config.json edits that make the HF dir the model
the twin describes, and the config fields they change. The twin is compared with that.

llama.cpp's qwen3moe has experts in every layer, so the Qwen3-MoE cases' dense layer
(mlp_only_layers) cannot be converted; ALL_MOE makes each of them with experts everywhere.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import gguf
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from helpers import random_prompts
from tokenpool.gpu_pool.engine import LLMEngine
from tokenpool.gpu_pool.engine_config import EngineConfig
from tokenpool.models.checkpoint import Checkpoint, load_checkpoint, read_model_info
from tokenpool.models.hf_loader import hf_config

pytest.importorskip("transformers")

from gguf_family_cases import CONVERTER_LOSSES, GGUF_CASES, GREEDY, Twin, twins  # noqa: F401


@dataclass
class Loaded:
    twin: Twin
    hf: Checkpoint
    gguf: Checkpoint


@pytest.fixture(scope="module", params=GGUF_CASES, ids=GGUF_CASES)
def loaded(request, twins) -> Loaded:
    twin = twins(request.param)
    return Loaded(twin, load_checkpoint(twin.reference, progress=False),
                  load_checkpoint(twin.gguf, progress=False))


def test_config_equals_hf_twins(loaded):
    assert loaded.gguf.config == loaded.hf.config
    assert read_model_info(loaded.twin.gguf)[0] == loaded.gguf.config


def test_converter_losses_change_only_what_they_name(loaded):
    original = hf_config(loaded.twin.hf_dir)
    changed = {f.name for f in dataclasses.fields(original)
               if getattr(original, f.name) != getattr(loaded.gguf.config, f.name)}
    loss = CONVERTER_LOSSES.get(loaded.twin.name)
    assert changed == (loss.fields if loss else set()), loss and loss.why


def _as_used(name: str, w: torch.Tensor, gemma_norms: bool) -> torch.Tensor:
    """Gemma's norms scale by 1 + w: exact through the converter's +1 and our -1, w itself
    not (w + 1 rounds w's low bits in float32)."""
    return 1 + w if gemma_norms and name.endswith("norm.weight") else w


def test_weights_equal_hf_exactly(loaded):
    ours, theirs = loaded.gguf.weights, loaded.hf.weights
    assert set(ours) == set(theirs)
    gemma = loaded.gguf.config.gemma_norms
    for name, w in ours.items():
        assert w.dtype == torch.float32 and w.is_contiguous(), name
        assert torch.equal(_as_used(name, w, gemma), _as_used(name, theirs[name], gemma)), name


def _greedy(checkpoint: Checkpoint, prompts: list[list[int]]) -> list[list[int]]:
    config = EngineConfig(dtype="float32", device="cpu", kv_cache_bytes=16 << 20)
    return LLMEngine.from_checkpoint(checkpoint, config).generate(prompts, GREEDY)


def test_greedy_tokens_equal_hf_dir(loaded):
    # 30 + 16 tokens pass every sliding window (12-16) and fit llama-dynamic's 48 positions.
    prompts = random_prompts((7, 30), seed=5)
    assert _greedy(loaded.gguf, prompts) == _greedy(loaded.hf, prompts)


# -- a mixed-type file -------------------------------------------------------------------------

@pytest.mark.parametrize("name, types", [
    ("llama", {Q.F32, Q.Q8_0}), ("gemma3", {Q.F32, Q.Q8_0}),
    ("qwen3-moe-all-layers", {Q.F32, Q.Q8_0, Q.F16})])
def test_q8_0_twin_loads_mixed_types(twins, name, types):
    """Norms (and the MoE router) stay F32, matrices Q8_0 (F16 where rows are not whole
    blocks: down_exps' 48): the Q/K un-permutation, Gemma's norm offset and the split of
    stacked experts apply after dequantization (a wrong permutation is ~140% off, Q8_0 under
    1%)."""
    twin = twins(name, Q.Q8_0)
    assert {t.tensor_type for t in gguf.GGUFReader(twin.gguf).tensors} == types
    ckpt, f32 = load_checkpoint(twin.gguf, progress=False), load_checkpoint(
        twins(name).gguf, progress=False)
    assert ckpt.config == f32.config
    for key, w in f32.weights.items():
        got = ckpt.weights[key]
        if w.ndim == 1:
            assert torch.equal(got, w), key
        else:
            assert float((got - w).norm() / w.norm()) < 0.01, key
    assert all(len(out) == 16 for out in _greedy(ckpt, random_prompts((9,), seed=1)))
