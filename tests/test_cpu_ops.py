"""The CPU fast paths agree with the portable torch computations they replace."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers import make_engine, random_prompts
from tokenpool.gpu_pool.cpu_ops import linear, paged_attention_kernel, upcast_scratch
from tokenpool.sampling import SamplingParams

kernel = paged_attention_kernel()
needs_kernel = pytest.mark.skipif(kernel is None, reason="no C++ toolchain to build the kernel")


def reference_decode(q, k_cache, v_cache, tables, lens, window=None, softcap=None):
    """Gather each sequence's pages, mask outside its context (and window), attend with GQA,
    written out in float64 so it shares no code with the engine's paths."""
    b, width = tables.shape
    block, kv_heads, dim = k_cache.shape[1:]
    groups = q.shape[1] // kv_heads
    keys = k_cache[tables.flatten()].view(b, width * block, kv_heads, dim).double()
    values = v_cache[tables.flatten()].view(b, width * block, kv_heads, dim).double()
    keys, values = (t.repeat_interleave(groups, dim=2).transpose(1, 2) for t in (keys, values))
    scores = torch.einsum("bhd,bhtd->bht", q.double(), keys) * dim ** -0.5
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    pos = torch.arange(width * block)[None]
    visible = pos < lens[:, None]
    if window is not None:
        visible &= pos >= lens[:, None] - window
    scores = scores.masked_fill(~visible[:, None, :], float("-inf"))
    return torch.einsum("bht,bhtd->bhd", scores.softmax(-1), values).float()


@needs_kernel
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("window, softcap", [(None, None), (20, None), (None, 5.0), (7, 2.0)])
@pytest.mark.parametrize("heads, kv_heads, lengths", [
    (9, 3, [1, 16, 17, 300]), (4, 4, [5, 64]), (8, 1, [33] * 7), (6, 2, [129]),
])
def test_paged_decode_kernel_matches_reference(dtype, tol, window, softcap, heads, kv_heads,
                                               lengths):
    g = torch.Generator().manual_seed(len(lengths) * heads)
    dim, block = 64, 16
    width = max(-(-n // block) for n in lengths)
    pages = width * len(lengths) + 5
    k_cache = torch.randn(pages, block, kv_heads, dim, generator=g).to(dtype)
    v_cache = torch.randn(pages, block, kv_heads, dim, generator=g).to(dtype)
    # Scattered, non-overlapping pages per sequence, as a block manager hands them out.
    order = torch.randperm(pages, generator=g)[: width * len(lengths)]
    tables = order.view(len(lengths), width)
    lens = torch.tensor(lengths)
    q = torch.randn(len(lengths), heads, dim, generator=g).to(dtype)
    # The kernel takes element offsets of pages from a base page (pages live in slabs).
    offsets = tables * (block * kv_heads * dim)
    got = kernel.paged_decode_attention(q, k_cache[0], v_cache[0], offsets, lens, dim ** -0.5,
                                        window or 0, softcap or 0.0)
    want = reference_decode(q.float(), k_cache.float(), v_cache.float(), tables, lens, window,
                            softcap)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)


@pytest.mark.parametrize("rows", [1, 2, 3, 8, 32, 257, 600])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_routing_matches_f_linear(rows, dtype):
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 96, generator=g).to(dtype)
    w = torch.randn(160, 96, generator=g).to(dtype)
    got = linear(x, w, upcast_scratch(w.dtype, w.device, w.numel()))
    assert got.shape == (rows, 160) and got.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(got.float(), F.linear(x.float(), w.float()), atol=tol, rtol=tol)


@needs_kernel
def test_engine_with_and_without_fused_kernels_agree(smollm2, engine):
    prompts = random_prompts([7, 40, 95, 16], seed=21)
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    portable = make_engine(smollm2, fused_kernels=False)
    assert portable.runner.decode_kernel is None and engine.runner.decode_kernel is not None
    assert engine.generate(prompts, params) == portable.generate(prompts, params)


@needs_kernel
@pytest.mark.parametrize("case", ["gemma2", "mistral"])
def test_fused_and_portable_paths_agree_on_windows_and_soft_caps(tmp_path, case):
    """Gemma 2 (soft-capped scores, alternating 16-token windows) and Mistral (every layer
    windowed): the kernel and the gather + mask path give the same tokens past the window."""
    from family_checkpoints import write_case
    from tokenpool.models.checkpoint import load_checkpoint

    ckpt = load_checkpoint(write_case(case, tmp_path / case), progress=False)
    prompts = random_prompts([5, 40, 70], seed=3)
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    fused = make_engine(ckpt)
    portable = make_engine(ckpt, fused_kernels=False)
    assert fused.runner.decode_kernel is not None and portable.runner.decode_kernel is None
    assert fused.generate(prompts, params) == portable.generate(prompts, params)


@needs_kernel
def test_a_builder_killed_mid_build_does_not_hang_later_loads():
    """A killed builder leaves torch's lock file in the build directory; torch alone would
    wait on it forever (every worker of the machine stuck starting). Loading must go on."""
    import subprocess
    import sys

    from tokenpool.gpu_pool.cpu_ops import KERNEL_CFLAGS, KERNEL_LDFLAGS, KERNEL_SOURCE
    from tokenpool.gpu_pool.kernel_build import TORCH_BATON, build_directory

    baton = build_directory("tokenpool_paged_attention", KERNEL_SOURCE, KERNEL_CFLAGS,
                            KERNEL_LDFLAGS) / TORCH_BATON
    baton.touch()  # exactly what a builder killed between taking and dropping it leaves
    code = ("from tokenpool.gpu_pool.cpu_ops import paged_attention_kernel as k; "
            "assert k() is not None")
    # A hang is the failure this guards against: the timeout turns it into one.
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    assert not baton.exists()
