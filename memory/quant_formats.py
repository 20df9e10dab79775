"""Byte layouts of the weight formats a packed model may hold, by name.

A quantized weight [rows, cols] is stored row after row; each row is `cols / block_elems`
blocks of `block_bytes`, plus `row_extra` bytes ahead of them. Rows are independent, so a
row range (q, k and v of a fused projection; one expert of a stack) is a byte range, and
permuting rows permutes byte ranges. The GGUF formats are llama.cpp's blocks as its files
hold them (ggml-common.h); `int8` is tokenpool's own per-output-channel format.

Pure stdlib: memory/ sizes buffers, the kernels in gpu_pool/ read them.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenpool.errors import ConfigError


@dataclass(frozen=True, slots=True)
class QuantFormat:
    name: str
    block_elems: int  # weights per block, along a row
    block_bytes: int
    row_extra: int = 0  # bytes ahead of a row's blocks (int8's float32 row scale)
    ggml_type: int | None = None  # GGMLQuantizationType value, for formats a GGUF file holds

    def row_bytes(self, cols: int) -> int:
        if cols % self.block_elems:
            raise ValueError(f"{self.name}: a row of {cols} is not a whole number of "
                             f"{self.block_elems}-weight blocks")
        return self.row_extra + cols // self.block_elems * self.block_bytes

    def nbytes(self, rows: int, cols: int) -> int:
        return rows * self.row_bytes(cols)


QUANT_FORMATS = {f.name: f for f in (
    # float16 scale d, 32 int8: w = d * q
    QuantFormat("q8_0", 32, 34, ggml_type=8),
    # float16 d, 16 bytes of nibbles (low nibbles weights 0-15, high 16-31): w = d * (q - 8)
    QuantFormat("q4_0", 32, 18, ggml_type=2),
    # float16 d and m, 16 bytes of nibbles: w = d * q + m
    QuantFormat("q4_1", 32, 20, ggml_type=3),
    # 256 weights: float16 d, dmin; 12 bytes of 6-bit scales and mins for 8 groups of 32;
    # 128 bytes of nibbles: w = d * sc * q - dmin * mn
    QuantFormat("q4_k", 256, 144, ggml_type=12),
    # 256 weights: 128 bytes low nibbles, 64 bytes high 2 bits, 16 int8 scales, float16 d:
    # w = d * sc * (q - 32)
    QuantFormat("q6_k", 256, 210, ggml_type=14),
    # per row: float32 scale s, then cols int8: w = s * q
    QuantFormat("int8", 1, 1, row_extra=4),
)}

BY_GGML_TYPE = {f.ggml_type: f for f in QUANT_FORMATS.values() if f.ggml_type is not None}

# The fleet's `quantization:` values (and bench --quant): none dequantizes what a file holds;
# native keeps a GGUF's quantized tensors as they are; int8 and int4 quantize at load
# (int4: groups of 32 with a float16 scale and minimum, stored as q4_1 blocks).
QUANT_MODES = ("none", "native", "int8", "int4")
LOAD_FORMATS = {"int8": "int8", "int4": "q4_1"}


def check_mode(mode: str) -> str:
    if mode not in QUANT_MODES:
        raise ConfigError(f"quantization must be one of {', '.join(QUANT_MODES)}; got {mode!r}")
    return mode


def is_quantized(dtype: str) -> bool:
    return dtype in QUANT_FORMATS
