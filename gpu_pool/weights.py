"""A model's weights in packed form: laid out, filled from a checkpoint, bound as views.

`packed_index` says where every engine tensor (q/k/v and gate/up already fused, cast to the
serving dtype, or quantized as models/quant_plan.py plans) sits in one buffer. `pack_weights` writes a checkpoint's tensors straight into
such a buffer, wherever it lives: the node's host cache or a worker's weight slot.
`bind_weights` turns a buffer holding a packed model into `DecoderWeights` of views, which is
all a model switch does besides the copy: whatever the family, no module is rebuilt.
"""

from __future__ import annotations

from itertools import groupby
from math import prod

import torch

from tokenpool.gpu_pool.decoder import DecoderWeights, LayerWeights
from tokenpool.gpu_pool.device import DTYPES, dtype_name
from tokenpool.gpu_pool.quant_reference import (dequantize_reference, quantize_int8,
                                                quantize_q4_1)
from tokenpool.memory.packing import PART_SEP, PackIndex, TensorEntry
from tokenpool.memory.quant_formats import QUANT_FORMATS
from tokenpool.models.config import ModelConfig
from tokenpool.models.quant_plan import Segment
from tokenpool.models.quantized import QuantizedTensor, RowParts
from tokenpool.models.tensor_layout import layer_roles, packed_sources, role_shapes

Formats = dict[str, tuple[Segment, ...]]  # quant_plan.plan_formats
QUANTIZERS = {"int8": quantize_int8, "q4_1": quantize_q4_1}  # quant_formats.LOAD_FORMATS


def is_tied(cfg: ModelConfig, names) -> bool:
    return cfg.tie_word_embeddings or "lm_head.weight" not in names


def packed_index(cfg: ModelConfig, dtype: torch.dtype, tied: bool | None = None,
                 formats: Formats | None = None) -> PackIndex:
    """Where each tensor goes. `tied` defaults to the config's tie_word_embeddings;
    `formats` (quant_plan.plan_formats) names the tensors held quantized."""
    tied = cfg.tie_word_embeddings if tied is None else tied
    vocab_shape = (cfg.vocab_size, cfg.hidden_size)
    shapes = {"embed": vocab_shape, "norm": (cfg.hidden_size,)}
    if not tied:
        shapes["lm_head"] = vocab_shape
    for i in range(cfg.num_hidden_layers):
        shapes |= {f"layers.{i}.{role}": shape for role, shape in role_shapes(cfg, i).items()}
    specs = []
    for name, shape in shapes.items():
        specs += _entry_specs(name, shape, dtype_name(dtype), (formats or {}).get(name))
    return PackIndex.layout(specs)


def _entry_specs(name: str, shape: tuple[int, ...], dtype: str,
                 segments: tuple[Segment, ...] | None) -> list[tuple]:
    if segments is None:
        return [(name, dtype, shape)]
    if len(segments) == 1:
        return [(name, segments[0][0] or dtype, shape)]
    return [(f"{name}{PART_SEP}{j}", fmt or dtype, (rows, *shape[1:]))
            for j, (fmt, rows) in enumerate(segments)]


def entry_view(buffer: torch.Tensor, entry: TensorEntry) -> torch.Tensor | QuantizedTensor:
    """The tensor `entry` describes, as a view of the uint8 `buffer` (no copy)."""
    raw = buffer[entry.offset: entry.offset + entry.nbytes]
    if entry.dtype in QUANT_FORMATS:
        rows = prod(entry.shape[:-1])
        return QuantizedTensor(raw.view(rows, -1), entry.dtype, (rows, entry.shape[-1]))
    return raw.view(DTYPES[entry.dtype]).view(entry.shape)


def pack_weights(cfg: ModelConfig, state_dict: dict, index: PackIndex,
                 buffer: torch.Tensor) -> None:
    """Write an HF-named state dict into `buffer` as `index` lays it out: fusing, casting,
    quantizing float sources into quantized entries, copying quantized ones as bytes."""
    sources = packed_sources(cfg, "lm_head" not in {e.tensor_name for e in index.entries})
    for name, entries in groupby(index.entries, key=lambda e: e.tensor_name):
        parts = iter(sources[name])
        for entry in entries:
            dest, row = entry_view(buffer, entry), 0
            while row < entry.shape[0]:
                hf_name = next(parts, None)
                if hf_name is None:
                    break
                part = state_dict[hf_name]
                _write_rows(dest, row, part, entry.dtype)
                row += part.shape[0]
            if row != entry.shape[0]:
                raise ValueError(f"{entry.name}: sources give {row} rows, "
                                 f"expected {entry.shape[0]}")


def _write_rows(dest, row: int, part, dtype: str) -> None:
    rows = slice(row, row + part.shape[0])
    if dtype not in QUANT_FORMATS:
        if isinstance(part, QuantizedTensor):
            part = dequantize_reference(part.data, part.fmt, part.cols)
        dest[rows].copy_(part)
        return
    if isinstance(part, QuantizedTensor) and part.fmt != dtype:
        part = dequantize_reference(part.data, part.fmt, part.cols)  # e.g. a Q4_1 GGUF as int8
    if not isinstance(part, QuantizedTensor):
        if dtype not in QUANTIZERS:
            raise ValueError(f"float weights cannot be quantized to {dtype} at load")
        part = QUANTIZERS[dtype](part)
    dest.data[rows].copy_(part.data)


def bind_weights(cfg: ModelConfig, index: PackIndex, buffer: torch.Tensor) -> DecoderWeights:
    """DecoderWeights whose tensors are views into `buffer`, which holds a packed model; a
    tensor packed in parts of different formats is bound as their RowParts."""
    views = {}
    for name, entries in groupby(index.entries, key=lambda e: e.tensor_name):
        parts = [entry_view(buffer, e) for e in entries]
        views[name] = parts[0] if len(parts) == 1 else RowParts(tuple(parts))
    layers = [LayerWeights(**{role: views[f"layers.{i}.{role}"]
                              for role in layer_roles(cfg, i)})
              for i in range(cfg.num_hidden_layers)]
    return DecoderWeights(embed=views["embed"], layers=layers, norm=views["norm"],
                        lm_head=views.get("lm_head", views["embed"]))


def largest_tensor_numel(index: PackIndex) -> int:
    return max(prod(e.shape) for e in index.entries)


def largest_quantized_numel(index: PackIndex) -> int:
    """Weights in the largest quantized entry (0: none): the float32 scratch a batch-sized
    matmul dequantizes it into."""
    return max((prod(e.shape) for e in index.entries if e.dtype in QUANT_FORMATS), default=0)
