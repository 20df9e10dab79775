"""CPU fast paths: a fused paged decode-attention kernel, and GEMMs routed by shape.

The kernel is C++, built by kernel_build.py on first use (`make install` does it ahead) and
cached. If no compiler is available the engine falls back to the portable torch path, with a
warning.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tokenpool.gpu_pool.device import cpu_has_fast_bf16
from tokenpool.gpu_pool.kernel_build import build_extension

log = logging.getLogger("tokenpool.gpu_pool")

# Measured on the 2-core AVX2 EPYC (SmolLM2's 121 projections, float32):
# - one row: OpenBLAS's gemv streams weights near memory bandwidth, 33 ms vs MKL's 45-48 ms;
# - 2 to 256 rows: MKL is far faster on the transposed problem W @ x.T than on x @ W.T
#   (M=32: 100 ms vs 161 ms; the lm_head alone 86 vs 53 GFLOP/s), and the transposed result
#   is used as it is: elementwise ops and the next W @ x.T take its strides for free;
# - prefill-sized batches: the plain call is as fast and keeps outputs contiguous.
TRANSPOSED_MAX_ROWS = 256
# bfloat16 without AVX512-BF16/AMX, MKL's bf16 GEMM runs at ~16 GFLOP/s. From this many rows
# on, copying the weight into a float32 scratch buffer and running the float32 GEMM is much
# faster (M=8: 98 vs 132 ms per model pass; M=32: 126 vs 524 ms) with the same products
# (bf16 x bf16 is exact in float32); the result is rounded back to bfloat16. Below it, the
# plain bf16 call is memory-bound and wins.
UPCAST_MIN_ROWS = 8


KERNEL_SOURCE = Path(__file__).with_name("csrc") / "paged_attention.cpp"
KERNEL_CFLAGS = ("-O3", "-march=native", "-fopenmp", "-ffast-math")
KERNEL_LDFLAGS = ("-fopenmp",)


@functools.cache
def paged_attention_kernel():
    """The compiled extension module, or None when it cannot be built here."""
    try:
        return build_extension("tokenpool_paged_attention", KERNEL_SOURCE, KERNEL_CFLAGS,
                               KERNEL_LDFLAGS)
    except Exception as exc:  # no compiler, no ninja, or a build error
        log.warning("paged attention kernel unavailable, using the torch path: %s", exc)
        return None


def upcast_scratch(dtype: torch.dtype, device: torch.device,
                   numel: int) -> torch.Tensor | None:
    """A float32 buffer of `numel` for `linear`'s upcast path, when this CPU needs one.

    Allocated once per worker, sized for its largest weight: a fresh buffer per call would
    page-fault its way through hundreds of MB per step.
    """
    if dtype != torch.bfloat16 or device.type != "cpu" or cpu_has_fast_bf16():
        return None
    return torch.empty(numel, dtype=torch.float32)


def linear(x: torch.Tensor, weight: torch.Tensor,
           scratch: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T, routed to the fastest CPU BLAS call for the shape (see above)."""
    if x.device.type != "cpu":
        return F.linear(x, weight)
    rows = x.shape[0]
    if x.dtype == torch.bfloat16:
        if scratch is None or rows < UPCAST_MIN_ROWS:
            return F.linear(x, weight)
        wide = scratch[: weight.numel()].view(weight.shape).copy_(weight)
        return linear(x.float(), wide).to(torch.bfloat16)
    if rows > TRANSPOSED_MAX_ROWS:
        return F.linear(x, weight)
    if rows == 1 and x.dtype == torch.float32:
        return torch.from_numpy(np.matmul(x.numpy(), weight.numpy().T))
    return torch.mm(weight, x.T).T
