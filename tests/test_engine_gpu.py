"""The engine on CUDA: the same code as on CPU, checked against the CPU engine and HF.

Skipped without CUDA (see conftest). On CUDA the engine uses F.linear and gather + SDPA for
decode; the CPU tests exercise that decode path too (fused_kernels=False).
"""

from __future__ import annotations

import pytest
import torch

from helpers import agreed_prefix, hf_greedy, make_engine, random_prompts
from tokenpool.sampling import SamplingParams

pytestmark = pytest.mark.gpu
GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)


def test_cuda_float32_greedy_matches_hf(smollm2, hf_smollm2):
    engine = make_engine(smollm2, device="cuda", dtype="float32")
    prompts = random_prompts([9, 60, 130], seed=31)
    hf = hf_smollm2.to("cpu")
    for prompt, got in zip(prompts, engine.generate(prompts, GREEDY)):
        ref, gaps = hf_greedy(hf, prompt, 24)
        assert agreed_prefix(got, ref, gaps) >= 12
    assert engine.num_used_pages == 0


def test_cuda_bfloat16_serves_a_batch_and_frees_pages(smollm2):
    engine = make_engine(smollm2, device="cuda", dtype="bfloat16")
    assert engine.dtype == torch.bfloat16 and engine.device.type == "cuda"
    prompts = random_prompts([5, 40, 17, 90], seed=32)
    outputs = engine.generate(prompts, GREEDY)
    assert all(len(o) == 24 for o in outputs)
    seeded = SamplingParams(max_tokens=8, temperature=0.8, seed=5)
    assert engine.generate([prompts[0]], seeded) == engine.generate([prompts[0]], seeded)
    assert engine.num_used_pages == 0
