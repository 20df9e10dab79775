"""CPU fast paths: a fused paged decode-attention kernel, and GEMMs routed by shape.

The kernel is C++ built on first use with torch's extension builder (cached afterwards). If
no compiler is available the engine falls back to the portable torch path, with a warning.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger("tokenpool.gpu_pool")

# Measured on the 2-core AVX2 EPYC (SmolLM2's 121 projections, float32):
# - one row: OpenBLAS's gemv streams weights near memory bandwidth, 33 ms vs MKL's 45-48 ms;
# - 2 to 256 rows: MKL is far faster on the transposed problem W @ x.T than on x @ W.T
#   (M=32: 100 ms vs 161 ms; the lm_head alone 86 vs 53 GFLOP/s), and the transposed result
#   is used as it is: elementwise ops and the next W @ x.T take its strides for free;
# - prefill-sized batches: the plain call is as fast and keeps outputs contiguous.
TRANSPOSED_MAX_ROWS = 256


@functools.cache
def paged_attention_kernel():
    """The compiled extension module, or None when it cannot be built here."""
    try:
        from torch.utils.cpp_extension import load

        source = Path(__file__).with_name("csrc") / "paged_attention.cpp"
        return load(name="tokenpool_paged_attention", sources=[str(source)],
                    extra_cflags=["-O3", "-march=native", "-fopenmp", "-ffast-math"],
                    extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as exc:  # no compiler, no ninja, or a build error
        log.warning("paged attention kernel unavailable, using the torch path: %s", exc)
        return None


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T, routed to the fastest CPU BLAS call for the shape (see above)."""
    rows = x.shape[0]
    if x.device.type != "cpu" or rows > TRANSPOSED_MAX_ROWS:
        return F.linear(x, weight)
    if rows == 1 and x.dtype == torch.float32:
        return torch.from_numpy(np.matmul(x.numpy(), weight.numpy().T))
    return torch.mm(weight, x.T).T
