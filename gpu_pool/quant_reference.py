"""Quantized weights in plain torch ops: the CUDA path, the fallback, and the quantizers.

Dequantization follows llama.cpp's block layouts (memory/quant_formats.py) and gives exactly
the gguf package's values: each weight is a float16 scale times a small integer (plus a
float16 minimum), computed in float32 where the product is exact, so no device or kernel
order can change a bit. Everything here runs on whatever device the bytes are on.

The quantizers are how `quantization: int8 | int4` turn float checkpoints into served
weights at load time; they run vectorised on the weights' device (a 49152 x 576 embedding
in a fraction of a second), and q4_1's bytes match gguf.quants.quantize exactly, so a weight
quantized here and one llama.cpp's tools wrote are interchangeable.
"""

from __future__ import annotations

import torch

from tokenpool.memory.quant_formats import QUANT_FORMATS
from tokenpool.models.quantized import QuantizedTensor


def _f16(raw: torch.Tensor) -> torch.Tensor:
    """Float16 values from [..., 2] little-endian bytes, as float32 [..., 1].

    The bytes are copied first: a view as float16 needs even offsets, which a slice of a
    block (or an odd-length int8 row) does not promise.
    """
    return raw.contiguous().view(torch.float16).float()


def _f32(raw: torch.Tensor) -> torch.Tensor:
    return raw.contiguous().view(torch.float32)


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[..., n] bytes -> [..., 2n] float: the n low nibbles, then the n high ones."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1).float()


def _q8_0(b: torch.Tensor) -> torch.Tensor:
    return _f16(b[..., :2]) * b[..., 2:].view(torch.int8).float()


def _q4_0(b: torch.Tensor) -> torch.Tensor:
    return _f16(b[..., :2]) * (_nibbles(b[..., 2:]) - 8.0)


def _q4_1(b: torch.Tensor) -> torch.Tensor:
    return _f16(b[..., :2]) * _nibbles(b[..., 4:]) + _f16(b[..., 2:4])


def _q4_k_scales(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 8 six-bit scales and minimums packed into 12 bytes (ggml's get_scale_min_k4)."""
    d, m, md = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = torch.cat([d & 63, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 63, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc.float(), mn.float()


def _q4_k(b: torch.Tensor) -> torch.Tensor:
    d, dmin = _f16(b[..., 0:2]), _f16(b[..., 2:4])
    sc, mn = _q4_k_scales(b[..., 4:16])
    qs = b[..., 16:].unflatten(-1, (4, 32))  # four 64-weight groups: low nibbles, then high
    q = torch.stack([qs & 0x0F, qs >> 4], dim=-2).flatten(-3, -2).float()  # [..., 8, 32]
    w = (d * sc).unsqueeze(-1) * q - (dmin * mn).unsqueeze(-1)
    return w.flatten(-2)


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    ql = b[..., :128].unflatten(-1, (2, 1, 64))  # two 128-weight halves
    qh = b[..., 128:192].unflatten(-1, (2, 1, 32))
    scales = b[..., 192:208].view(torch.int8).float()
    d = _f16(b[..., 208:210])
    shifts = torch.tensor([0, 4], dtype=torch.uint8, device=b.device).view(2, 1)
    low = ((ql >> shifts) & 0x0F).flatten(-2).unflatten(-1, (4, 32))  # [..., 2, 4, 32]
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=b.device).view(4, 1)
    high = (qh >> shifts) & 0x03  # [..., 2, 4, 32]
    q = ((low | (high << 4)).float() - 32.0).flatten(-3).unflatten(-1, (16, 16))
    return ((d * scales).unsqueeze(-1) * q).flatten(-2)


_BLOCK_DECODERS = {"q8_0": _q8_0, "q4_0": _q4_0, "q4_1": _q4_1, "q4_k": _q4_k, "q6_k": _q6_k}


def dequantize_reference(data: torch.Tensor, fmt: str, cols: int) -> torch.Tensor:
    """float32 [..., rows, cols] from uint8 [..., rows, row_bytes] of format `fmt`."""
    layout = QUANT_FORMATS[fmt]
    if data.shape[-1] != layout.row_bytes(cols):
        raise ValueError(f"{fmt}: rows of {data.shape[-1]} bytes do not hold {cols} weights")
    if fmt == "int8":
        return _f32(data[..., :4]) * data[..., 4:].view(torch.int8).float()
    blocks = data.unflatten(-1, (cols // layout.block_elems, layout.block_bytes))
    return _BLOCK_DECODERS[fmt](blocks).flatten(-2)


def quantize_int8(w: torch.Tensor) -> QuantizedTensor:
    """Symmetric per-output-row int8: s = max|w| / 127, q = round(w / s), w ~ s * q.

    One scale per row keeps the matmul a plain row-scaled integer dot product and is
    accurate enough for 8 bits (the error is at most s / 2 per weight).
    """
    w = w.detach().float()
    scale = w.abs().amax(dim=-1, keepdim=True) / 127.0
    q = torch.where(scale > 0, w / scale, torch.zeros((), device=w.device))
    q = q.round().clamp(-127, 127).to(torch.int8)
    data = torch.cat([scale.view(torch.uint8), q.view(torch.uint8)], dim=-1)
    return QuantizedTensor(data, "int8", tuple(w.shape))


def quantize_q4_1(w: torch.Tensor) -> QuantizedTensor:
    """4-bit groups of 32 with a float16 scale d = (max - min) / 15 and minimum m: q4_1.

    Written as gguf.quants' Q4_1.quantize_blocks is, operation for operation in float32
    (q = trunc((w - min) / d + 0.5) with 1/d taken once), so the bytes are identical.
    """
    w = w.detach().float()
    if w.shape[-1] % 32:
        raise ValueError(f"q4_1 needs rows of whole 32-weight groups, got {w.shape[-1]}")
    blocks = w.unflatten(-1, (w.shape[-1] // 32, 32))
    lo = blocks.amin(dim=-1, keepdim=True)
    d = (blocks.amax(dim=-1, keepdim=True) - lo) / 15.0
    inv = torch.where(d == 0, torch.zeros((), device=w.device), torch.ones_like(d).div(d))
    q = torch.trunc((blocks - lo) * inv + 0.5).clamp(0, 15).to(torch.uint8)
    packed = q[..., :16] | (q[..., 16:] << 4)
    halves = [t.half().view(torch.uint8) for t in (d, lo)]
    data = torch.cat([*halves, packed], dim=-1).flatten(-2)
    return QuantizedTensor(data, "q4_1", tuple(w.shape))
