"""A quantized weight as bytes: what a GGUF file holds, and what a packed model binds.

`data` is uint8 [..., rows, row_bytes] in one of memory/quant_formats.py's layouts; `shape`
is the logical float shape [..., rows, cols]. Row slices and leading-dimension indexing are
views of the bytes, so q/k/v parts, experts and embedding rows never need dequantizing to be
picked out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenpool.memory.quant_formats import QUANT_FORMATS, QuantFormat


@dataclass(frozen=True, slots=True)
class QuantizedTensor:
    data: torch.Tensor  # uint8 [..., rows, row_bytes]
    fmt: str  # a QUANT_FORMATS name
    shape: tuple[int, ...]  # [..., rows, cols]

    def __post_init__(self):
        expected = (*self.shape[:-1], self.format.row_bytes(self.shape[-1]))
        if self.data.dtype != torch.uint8 or tuple(self.data.shape) != expected:
            raise ValueError(f"{self.fmt} {self.shape}: bytes are {self.data.dtype} "
                             f"{tuple(self.data.shape)}, expected uint8 {expected}")

    @property
    def format(self) -> QuantFormat:
        return QUANT_FORMATS[self.fmt]

    @property
    def cols(self) -> int:
        return self.shape[-1]

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def nbytes(self) -> int:
        return self.data.numel()

    def __getitem__(self, index) -> "QuantizedTensor":
        """Rows (or leading entries) by int, slice or index tensor; columns stay whole."""
        data = self.data[index]
        rows = data.shape[:-1]
        return QuantizedTensor(data, self.fmt, (*rows, self.cols))

    def view_rows(self, *leading: int) -> "QuantizedTensor":
        """Split the rows into `leading` dimensions (-1 allowed), like Tensor.view."""
        data = self.data.view(*leading, self.data.shape[-1])
        return QuantizedTensor(data, self.fmt, (*data.shape[:-1], self.cols))

    def unbind(self, dim: int = 0) -> tuple["QuantizedTensor", ...]:
        if dim != 0:
            raise ValueError("a quantized tensor unbinds along its leading dimension only")
        return tuple(self[i] for i in range(self.shape[0]))

    def contiguous(self) -> "QuantizedTensor":
        return QuantizedTensor(self.data.contiguous(), self.fmt, self.shape)


@dataclass(frozen=True, slots=True)
class RowParts:
    """A weight stored as row ranges of different formats, stacked in order: a GGUF's fused
    q/k/v whose parts were quantized differently. A matmul runs per part and concatenates."""

    parts: tuple  # torch.Tensor or QuantizedTensor, each [rows_i, cols]

    @property
    def shape(self) -> tuple[int, ...]:
        return (sum(p.shape[0] for p in self.parts), self.parts[0].shape[-1])
