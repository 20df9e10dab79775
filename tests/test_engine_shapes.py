"""Synthetic checkpoints of varied shapes load and generate exactly what HF generates."""

from __future__ import annotations

import pytest
import torch

from helpers import agreed_prefix, hf_greedy, random_prompts
from tokenpool.gpu_pool.engine import EngineConfig, LLMEngine
from tokenpool.models import load_checkpoint, write_synthetic_checkpoint
from tokenpool.sampling import SamplingParams

SHAPES = [  # layers, hidden, heads, kv heads, ffn, tied
    (2, 128, 4, 1, 256, True),  # multi-query
    (3, 192, 6, 6, None, False),  # multi-head, untied lm_head
    (2, 256, 8, 2, 512, True),  # grouped-query
    (1, 96, 3, 3, 160, False),  # head_dim 32
]


@pytest.mark.parametrize("layers, hidden, heads, kv_heads, ffn, tied", SHAPES)
def test_synthetic_shape_generates_like_hf(tmp_path, layers, hidden, heads, kv_heads, ffn, tied):
    transformers = pytest.importorskip("transformers")
    path = write_synthetic_checkpoint(
        tmp_path / "ckpt", num_layers=layers, hidden_size=hidden, num_heads=heads,
        num_kv_heads=kv_heads, intermediate_size=ffn, seed=layers * hidden,
        tie_word_embeddings=tied)
    ckpt = load_checkpoint(path, progress=False)
    assert (ckpt.config.num_hidden_layers, ckpt.config.num_key_value_heads) == (layers, kv_heads)
    assert ("lm_head.weight" in ckpt.weights) is not tied
    engine = LLMEngine.from_checkpoint(ckpt, EngineConfig(dtype="float32",
                                                          kv_cache_bytes=16 << 20))
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts = random_prompts([3, 21, 50], seed=hidden)
    ours = engine.generate(prompts, SamplingParams(max_tokens=16, temperature=0,
                                                   ignore_eos=True))
    for prompt, got in zip(prompts, ours):
        ref, gaps = hf_greedy(hf, prompt, 16)
        assert agreed_prefix(got, ref, gaps) >= 8
    assert engine.num_used_pages == 0
