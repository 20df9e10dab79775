"""Serving quantized weights: x @ W.T, dequantization and embedding lookups from the bytes.

On CPUs a C++ extension (csrc/quant_linear.cpp, built like the paged-attention kernel) does
the work. Decode steps multiply a few activation rows by every weight, so they are bound by
reading the weights: the fused kernel reads the quantized bytes once (a quarter to an eighth
of float32's) and decodes them in cache. Prefill-sized batches are bound by arithmetic
instead, so the weight is dequantized into a float32 scratch buffer and BLAS takes over.

Elsewhere (CUDA) and when the extension cannot be built, the torch reference implementation
(quant_reference.py) dequantizes and F.linear multiplies. Activations are never quantized:
every path computes x @ dequantize(W).T in float32 or x's dtype, up to summation order.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch
import torch.nn.functional as F

from tokenpool.gpu_pool import cpu_ops
from tokenpool.gpu_pool.kernel_build import build_extension
from tokenpool.gpu_pool.quant_reference import dequantize_reference
from tokenpool.models.quantized import QuantizedTensor

log = logging.getLogger("tokenpool.gpu_pool")

KERNEL_SOURCE = Path(__file__).with_name("csrc") / "quant_linear.cpp"

# Up to this many activation rows the fused kernel beats dequantize + float32 BLAS (it reads
# the weight's bytes once and never writes a float copy); past it BLAS's cache blocking wins.
FUSED_MAX_ROWS = 128


@functools.cache
def quant_kernel():
    """The compiled extension module, or None when it cannot be built here."""
    try:
        return build_extension("tokenpool_quant_linear", KERNEL_SOURCE, cpu_ops.KERNEL_CFLAGS,
                               cpu_ops.KERNEL_LDFLAGS)
    except Exception as exc:  # no compiler, no ninja, or a build error
        log.warning("quantized-weight kernel unavailable, using the torch path: %s", exc)
        return None


def kernel_isa() -> str:
    """Which vector path the CPU kernel was compiled for ("avx512", "avx2", "generic"), or
    "torch" without it: benchmarks record it next to their numbers."""
    kernel = quant_kernel()
    return kernel.isa() if kernel is not None else "torch"


def _cpu_kernel(w: QuantizedTensor):
    """The extension, when it serves this weight: CPU bytes of a format it knows."""
    if not w.data.is_cpu:
        return None
    kernel = quant_kernel()
    return kernel if kernel is not None and w.fmt in kernel.formats else None


def _scratch_view(scratch: torch.Tensor | None, shape: tuple[int, int]) -> torch.Tensor | None:
    """The first rows * cols elements of the caller's buffer, as a [rows, cols] matrix."""
    if scratch is None:
        return None
    numel = shape[0] * shape[1]
    if scratch.numel() < numel or not scratch.is_contiguous():
        raise ValueError(f"scratch of {scratch.numel()} elements cannot hold {shape}")
    return scratch.view(-1)[:numel].view(shape)


def dequantize(w: QuantizedTensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """float32 [rows, cols] of a 2-D quantized weight, written into `out` when given.

    `out` lets the engine reuse one buffer for every weight instead of allocating (and
    page-faulting) the size of a float32 weight per call.
    """
    if len(w.shape) != 2:
        raise ValueError(f"dequantize takes a 2-D weight, got {w.shape}")
    kernel = _cpu_kernel(w)
    if kernel is None:
        weight = dequantize_reference(w.data, w.fmt, w.cols)
        return weight if out is None else out.copy_(weight)
    if out is None:
        out = torch.empty(w.shape, dtype=torch.float32)
    kernel.dequantize(w.data, kernel.formats[w.fmt], w.cols, out)
    return out


def quant_linear(x: torch.Tensor, w: QuantizedTensor,
                 scratch: torch.Tensor | None = None) -> torch.Tensor:
    """x @ dequantize(w).T as [..., N] in x's dtype (float32, bfloat16 or float16).

    `scratch` is a preallocated buffer of at least N * K elements (float32 on CPU) that the
    dequantize-then-GEMM paths write the weight into; given it, no weight-sized memory is
    allocated per call.
    """
    cols = x.shape[-1]
    if cols != w.cols or len(w.shape) != 2:
        raise ValueError(f"x [..., {cols}] does not match the weight {w.shape}")
    # Decode steps call this ~120 times a token: the common 2-D float32 case skips the
    # reshapes and casts (a microsecond each).
    x2 = x if x.dim() == 2 else x.reshape(-1, cols)
    kernel = _cpu_kernel(w)
    if kernel is None or not x.is_cpu:
        out = _reference_linear(x2, w, scratch)
    else:
        out = _cpu_linear(kernel, x2.float().contiguous(), w, scratch)
    if out.dtype != x.dtype:
        out = out.to(x.dtype)
    return out if x.dim() == 2 else out.reshape(*x.shape[:-1], w.shape[0])


def _cpu_linear(kernel, x: torch.Tensor, w: QuantizedTensor,
                scratch: torch.Tensor | None) -> torch.Tensor:
    """The fused kernel for few rows, dequantize + float32 BLAS (cpu_ops.linear) for more."""
    if x.shape[0] <= FUSED_MAX_ROWS:
        out = torch.empty((x.shape[0], w.shape[0]), dtype=torch.float32)
        kernel.quant_linear(x, w.data, kernel.formats[w.fmt], out)
        return out
    weight = dequantize(w, out=_scratch_view(scratch, w.shape))
    return cpu_ops.linear(x, weight)


def _reference_linear(x: torch.Tensor, w: QuantizedTensor,
                      scratch: torch.Tensor | None) -> torch.Tensor:
    """Torch ops on any device: the weight dequantized (into scratch, in its dtype, when
    given) and one F.linear in that dtype."""
    weight = dequantize_reference(w.data, w.fmt, w.cols)
    if scratch is not None:
        weight = _scratch_view(scratch, w.shape).copy_(weight)
    else:
        weight = weight.to(x.dtype)
    return F.linear(x.to(weight.dtype), weight)


def embedding_rows(w: QuantizedTensor, ids: torch.Tensor,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rows `ids` of a quantized embedding table as [*ids.shape, cols] in `dtype`.

    Only the looked-up rows are decoded: indexing the bytes gathers whole rows, since every
    format's rows are independent.
    """
    rows = w[ids.reshape(-1).to(w.device)]
    return dequantize(rows).to(dtype).reshape(*ids.shape, w.cols)
