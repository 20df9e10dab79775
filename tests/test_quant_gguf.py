"""A GGUF that mixes every quantized type we serve, as llama-quantize's K presets do, served
natively: each tensor stays in its own format (q, k and v of one layer in two), and the
model computes what the same file dequantized computes."""

from __future__ import annotations

import pytest
import torch
from gguf import GGMLQuantizationType as Q

from gguf_twins import write_twin
from helpers import make_engine
from tokenpool.gpu_pool.quant_kernels import FUSED_MAX_ROWS
from tokenpool.models.checkpoint import load_checkpoint
from tokenpool.models.quantized import QuantizedTensor, RowParts
from tokenpool.models.synth import write_synthetic_checkpoint
from tokenpool.sampling import SamplingParams

# GGUF tensor name part -> type: K-quants where rows are whole 256-blocks, the rest 32-blocks.
TYPES = {"token_embd": Q.Q4_K, "attn_q": Q.Q4_K, "attn_k": Q.Q4_K,
         "attn_v": Q.Q6_K, "attn_output": Q.Q4_0, "ffn_gate": Q.Q4_1, "ffn_up": Q.Q4_1,
         "ffn_down": Q.Q6_K}


def type_of(name: str) -> Q:
    if name == "output.weight":
        return Q.Q8_0
    return next((t for part, t in TYPES.items() if part in name), Q.F32)


@pytest.fixture(scope="module")
def mixed_gguf(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mixed")
    write_synthetic_checkpoint(tmp / "hf", family="llama", num_layers=2, hidden_size=256,
                               num_heads=4, num_kv_heads=2, intermediate_size=512,
                               tie_word_embeddings=False, seed=5)
    return write_twin(tmp / "hf", tmp / "mixed.gguf", type_of)


@pytest.fixture(scope="module")
def engines(mixed_gguf):
    stored = load_checkpoint(mixed_gguf, progress=False, quantized=True)
    floats = load_checkpoint(mixed_gguf, progress=False)
    return (make_engine(stored, quantization="native", kv_cache_bytes=8 << 20),
            make_engine(floats, kv_cache_bytes=8 << 20))


def test_every_tensor_keeps_its_files_format(engines):
    weights = engines[0].forward.weights
    assert (weights.embed.fmt, weights.lm_head.fmt) == ("q4_k", "q8_0")
    layer = weights.layers[0]
    assert isinstance(layer.qkv, RowParts)  # q and k in Q4_K, v in Q6_K: two row ranges
    assert [(p.fmt, p.shape[0]) for p in layer.qkv.parts] == [("q4_k", 256 + 128),
                                                               ("q6_k", 128)]
    assert (layer.o.fmt, layer.gate_up.fmt, layer.down.fmt) == ("q4_0", "q4_1", "q6_k")
    assert not isinstance(layer.attn_norm, QuantizedTensor)


def test_native_logits_equal_the_dequantized_files(engines):
    native, floats = engines
    g = torch.Generator().manual_seed(0)
    for n in (1, 7, 40):
        prompt = torch.randint(100, 49152, (n,), generator=g).tolist()
        ref = floats.prompt_logits(prompt)
        got = native.prompt_logits(prompt)
        assert (got - ref).abs().max() <= 1e-4 * ref.abs().max(), n


def test_a_batch_equals_the_dequantized_file(engines):
    """Twenty prompts prefill as one step of more rows than the fused kernel takes, so every
    format also runs dequantize-into-scratch + GEMM; their decode steps run the fused kernel."""
    native, floats = engines
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    prompts = [[100 + 7 * i + j for j in range(10)] for i in range(20)]
    assert sum(map(len, prompts)) > FUSED_MAX_ROWS
    ref = floats.generate(prompts, params)
    got = native.generate(prompts, params)
    same = sum(a == b for a, b in zip(got, ref))
    # random weights leave near-ties now and then; the logits test above is the tight one
    assert same >= 18, (got, ref)
