"""int8 and int4 at load for every family: the quantized engine computes exactly what a float
engine computes on the weights' quantize-dequantize round trip. That pins down which tensors
are quantized (q/k/v fused or not, Phi-3's fused projections, stacked experts, the tied
embedding as the output matmul) and that every one is read back right."""

from __future__ import annotations

import pytest
import torch

from helpers import make_engine
from tokenpool.gpu_pool.quant_kernels import dequantize
from tokenpool.gpu_pool.weights import QUANTIZERS
from tokenpool.memory.quant_formats import LOAD_FORMATS
from tokenpool.models.checkpoint import load_checkpoint
from tokenpool.models.quant_plan import plan_formats
from tokenpool.models.synth import write_synthetic_checkpoint
from tokenpool.models.tensor_layout import packed_sources

FAMILIES = ("llama", "qwen2", "gemma2", "phi3", "qwen3_moe", "mixtral")


@pytest.fixture(scope="module", params=FAMILIES)
def checkpoint(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    write_synthetic_checkpoint(path, family=request.param, num_layers=2, hidden_size=128,
                               num_heads=4, num_kv_heads=2, intermediate_size=256, seed=2)
    return load_checkpoint(path, progress=False)


def round_trip(ckpt, mode: str) -> dict[str, torch.Tensor]:
    """The checkpoint's weights with every tensor the mode quantizes replaced by its
    dequantized quantization."""
    tied = "lm_head.weight" not in ckpt.weights
    plan = plan_formats(ckpt.config, mode, tied)
    sources = packed_sources(ckpt.config, tied)
    quantize = QUANTIZERS[LOAD_FORMATS[mode]]
    weights = dict(ckpt.weights)
    for name in plan:
        for hf_name in sources[name]:
            weights[hf_name] = dequantize(quantize(weights[hf_name]))
    return weights


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_engine_equals_float_engine_on_round_tripped_weights(checkpoint, mode):
    cfg = checkpoint.config
    quantized = make_engine(checkpoint, quantization=mode, kv_cache_bytes=4 << 20)
    reference = make_engine(type(checkpoint)(cfg, round_trip(checkpoint, mode),
                                             checkpoint.tokenizer, checkpoint.source),
                            kv_cache_bytes=4 << 20)
    plain = make_engine(checkpoint, kv_cache_bytes=4 << 20)
    g = torch.Generator().manual_seed(1)
    for n in (1, 9, 150):  # 150 rows: past the fused kernel, through dequantize + GEMM
        prompt = torch.randint(100, cfg.vocab_size, (n,), generator=g).tolist()
        ref = reference.prompt_logits(prompt)
        got = quantized.prompt_logits(prompt)
        assert (got - ref).abs().max() <= 1e-4 * ref.abs().max(), n
        # and quantization did change something: the check above is not float vs float
        assert (plain.prompt_logits(prompt) - ref).abs().max() > 1e-4 * ref.abs().max()
