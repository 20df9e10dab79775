"""Quantized-weight kernels: exact dequantization against the gguf package, x @ W.T against
the dequantized matmul, on the CPU extension and the torch reference path alike."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants

from tokenpool.gpu_pool import quant_kernels as qk
from tokenpool.gpu_pool.kernel_build import build_directory, cpu_isa_flags
from tokenpool.gpu_pool.quant_reference import (dequantize_reference, quantize_int8,
                                                quantize_q4_1)
from tokenpool.memory.quant_formats import QUANT_FORMATS
from tokenpool.models.quantized import QuantizedTensor

kernel = qk.quant_kernel()
needs_kernel = pytest.mark.skipif(kernel is None, reason="no C++ toolchain to build the kernel")

FORMATS = ("q8_0", "q4_0", "q4_1", "q4_k", "q6_k", "int8")
# Rows not a multiple of any tile; columns an odd number of blocks (int8: of anything).
SHAPES = {"q8_0": (37, 32 * 7), "q4_0": (37, 32 * 9), "q4_1": (37, 32 * 3),
          "q4_k": (19, 256 * 3), "q6_k": (19, 256 * 2), "int8": (37, 97)}


def gguf_type(fmt: str) -> GGMLQuantizationType:
    return GGMLQuantizationType(QUANT_FORMATS[fmt].ggml_type)


def random_bytes(fmt: str, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Valid rows of `fmt`: quantized random floats where gguf can quantize, else random
    bytes whose float16 scales are finite and moderate."""
    if fmt == "int8":
        return quantize_int8(torch.from_numpy(rng.standard_normal((rows, cols)))).data.numpy()
    if fmt not in ("q4_k", "q6_k"):
        return quants.quantize(rng.standard_normal((rows, cols)).astype(np.float32),
                               gguf_type(fmt))
    layout = QUANT_FORMATS[fmt]
    blocks = rng.integers(0, 256, (rows, cols // 256, layout.block_bytes), dtype=np.uint8)
    scales = (rng.standard_normal(blocks.shape[:2] + (2,)) * 0.01).astype(np.float16)
    where = slice(0, 4) if fmt == "q4_k" else slice(208, 210)  # d, dmin / d
    blocks[..., where] = scales.view(np.uint8)[..., : where.stop - where.start]
    return blocks.reshape(rows, -1)


def expected(fmt: str, raw: np.ndarray, cols: int) -> np.ndarray:
    if fmt == "int8":  # tokenpool's own format: float32 row scale, then int8 values
        scale = raw[:, :4].copy().view(np.float32)
        return scale * raw[:, 4:].view(np.int8).astype(np.float32)
    return quants.dequantize(raw, gguf_type(fmt)).reshape(raw.shape[0], cols)


@pytest.fixture(params=FORMATS)
def weight(request):
    """(format, QuantizedTensor, its exact float32 values as gguf computes them)."""
    fmt = request.param
    rows, cols = SHAPES[fmt]
    raw = random_bytes(fmt, rows, cols, np.random.default_rng(FORMATS.index(fmt)))
    w = QuantizedTensor(torch.from_numpy(np.ascontiguousarray(raw)), fmt, (rows, cols))
    return fmt, w, torch.from_numpy(expected(fmt, raw, cols))


@pytest.fixture(params=["kernel", "reference"])
def path(request, monkeypatch):
    if request.param == "kernel":
        if kernel is None:
            pytest.skip("no C++ toolchain to build the kernel")
    else:
        monkeypatch.setattr(qk, "quant_kernel", lambda: None)
    return request.param


def assert_matmul_close(out: torch.Tensor, x: torch.Tensor, w: torch.Tensor, rel: float):
    """out == x @ w.T up to summation order: error within rel of sum |x||w| per entry."""
    exact = x.double() @ w.double().T
    scale = x.double().abs() @ w.double().abs().T
    err = (out.double() - exact).abs()
    assert out.shape == exact.shape
    assert (err <= rel * scale + rel * exact.abs() + 1e-30).all(), (err / scale).max()


def test_reference_dequantize_is_gguf_exactly(weight):
    fmt, w, values = weight
    assert torch.equal(dequantize_reference(w.data, fmt, w.cols), values)


def test_dequantize_is_gguf_exactly(weight, path):
    fmt, w, values = weight
    assert torch.equal(qk.dequantize(w), values)
    out = torch.full(w.shape, float("nan"))
    assert qk.dequantize(w, out=out) is out and torch.equal(out, values)


@pytest.mark.parametrize("rows", [1, 3, 8, 33])
@pytest.mark.parametrize("scratch", [False, True])
def test_quant_linear_matches_dequantized_matmul(weight, path, rows, scratch):
    fmt, w, values = weight
    x = torch.randn(rows, w.cols, generator=torch.Generator().manual_seed(rows))
    buffer = torch.empty(w.shape[0] * w.cols + 5) if scratch else None
    out = qk.quant_linear(x, w, buffer)
    assert out.dtype == torch.float32
    assert_matmul_close(out, x, values, 1e-5)
    low = qk.quant_linear(x.bfloat16(), w, buffer)
    assert low.dtype == torch.bfloat16
    assert_matmul_close(low, x.bfloat16().float(), values, 2 ** -7)


@needs_kernel
@pytest.mark.parametrize("fused_max_rows", [0, 10 ** 6])
def test_both_cpu_paths_at_every_batch(weight, monkeypatch, fused_max_rows):
    """The fused kernel and dequantize + BLAS each serve any number of rows."""
    fmt, w, values = weight
    monkeypatch.setattr(qk, "FUSED_MAX_ROWS", fused_max_rows)
    scratch = torch.empty(w.shape[0] * w.cols)
    for rows in (1, 2, 3, 4, 5, 6, 7, 8, 9, 17):
        x = torch.randn(rows, w.cols)
        assert_matmul_close(qk.quant_linear(x, w), x, values, 1e-5)
        assert_matmul_close(qk.quant_linear(x, w, scratch), x, values, 1e-5)


def test_leading_dimensions_and_row_slices(weight, path):
    """Rows of a quantized weight are byte ranges: slicing them slices the output."""
    fmt, w, values = weight
    x = torch.randn(2, 3, w.cols)
    full = qk.quant_linear(x, w)
    assert full.shape == (2, 3, w.shape[0])
    assert_matmul_close(full.view(6, -1), x.view(6, -1), values, 1e-5)
    assert_matmul_close(qk.quant_linear(x[0], w[5:16]), x[0], values[5:16], 1e-5)
    picked = torch.tensor([7, 0, 7, 3])
    assert_matmul_close(qk.quant_linear(x[1], w[picked]), x[1], values[picked], 1e-5)


@needs_kernel
def test_scratch_receives_the_weight_and_nothing_weight_sized_is_allocated(monkeypatch):
    """Given scratch, the BLAS path dequantizes into it: no weight-sized buffer per call."""
    rows, cols = 64, 256
    w = quantize_q4_1(torch.randn(rows, cols))
    scratch = torch.zeros(rows * cols + 100)
    out = qk.dequantize(w, out=qk._scratch_view(scratch, w.shape))
    assert out.data_ptr() == scratch.data_ptr()

    scratch.zero_()
    allocated = []  # the Python-side allocations of the call (the output is torch.mm's)
    real_empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: allocated.append(a) or real_empty(*a, **k))
    x = torch.randn(qk.FUSED_MAX_ROWS + 4, cols)
    qk.quant_linear(x, w, scratch)
    monkeypatch.undo()
    assert allocated == []
    assert torch.equal(scratch[: rows * cols].view(rows, cols), qk.dequantize(w))
    with pytest.raises(ValueError, match="scratch"):
        qk.quant_linear(x, w, torch.empty(rows * cols - 1))


def test_embedding_rows(weight, path):
    fmt, w, values = weight
    ids = torch.tensor([[3, 0, 3], [w.shape[0] - 1, 1, 2]])
    rows = qk.embedding_rows(w, ids, torch.bfloat16)
    assert rows.shape == (2, 3, w.cols) and rows.dtype == torch.bfloat16
    assert torch.equal(rows, values[ids].bfloat16())


def test_int8_quantizer_error_is_within_half_a_step():
    w = torch.randn(67, 131) * torch.logspace(-3, 1, 67)[:, None]
    w[5] = 0.0
    q = quantize_int8(w)
    scale = q.data[:, :4].contiguous().view(torch.float32)
    assert torch.equal(scale[:, 0], w.abs().amax(1) / 127)
    err = (dequantize_reference(q.data, "int8", 131) - w).abs()
    assert (err <= scale / 2 * (1 + 1e-5)).all()
    assert torch.equal(q.data[5], torch.zeros(4 + 131, dtype=torch.uint8))


def test_q4_1_quantizer_writes_gguf_bytes():
    rng = np.random.default_rng(7)
    w = rng.standard_normal((53, 32 * 11)).astype(np.float32) * rng.uniform(0.01, 3, (53, 1))
    w[3, :32] = 0.5  # a constant group: d = 0
    w = w.astype(np.float32)
    ours = quantize_q4_1(torch.from_numpy(w)).data.numpy()
    assert np.array_equal(ours, quants.quantize(w, GGMLQuantizationType.Q4_1))


@needs_kernel
def test_kernel_reports_its_instruction_set():
    assert qk.kernel_isa() in ("avx512", "avx2", "generic")
    assert set(kernel.formats) == set(QUANT_FORMATS)


def test_build_directory_depends_on_the_cpu(monkeypatch, tmp_path):
    """A -march=native build from another CPU model must never be loaded here."""
    source = qk.KERNEL_SOURCE
    here = build_directory("k", source, ("-O3",), (), tmp_path)
    assert here == build_directory("k", source, ("-O3",), (), tmp_path)
    other = cpu_isa_flags() + ("avx512_fp16",)
    monkeypatch.setattr("tokenpool.gpu_pool.kernel_build.cpu_isa_flags", lambda: other)
    assert build_directory("k", source, ("-O3",), (), tmp_path) != here


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("rows", [1, 40])
def test_cuda_path_equals_the_cpu_kernel(weight, rows):
    """On a GPU the weight's bytes live in device memory and the torch reference path
    dequantizes them there (into the engine's scratch) for one F.linear."""
    fmt, w, exact = weight
    x = torch.randn(rows, w.cols, generator=torch.Generator().manual_seed(rows))
    on_gpu = QuantizedTensor(w.data.cuda(), fmt, w.shape)
    scratch = torch.empty(w.shape[0] * w.cols, dtype=torch.float32, device="cuda")
    got = qk.quant_linear(x.cuda(), on_gpu, scratch).cpu()
    assert_matmul_close(got, x, exact, rel=1e-4)
    ids = torch.tensor([0, w.shape[0] - 1, 3], device="cuda")
    assert torch.equal(qk.embedding_rows(on_gpu, ids).cpu(), exact[ids.cpu()])
