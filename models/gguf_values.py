"""Values out of a GGUF file: metadata numbers as written, required keys, tensors as torch."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from tokenpool.errors import CheckpointError
from tokenpool.models.gguf_file import GGUFTensor

# Stored float types are kept as they are; everything else is dequantized to float32.
FLOAT_TYPES = {
    GGMLQuantizationType.F32: torch.float32,
    GGMLQuantizationType.F16: torch.float16,
    GGMLQuantizationType.BF16: torch.bfloat16,
}


def f32(value: float) -> float:
    """A float32 metadata value as the decimal it was written from (1e-06, not 9.99e-07)."""
    return float(str(np.float32(value)))


def require(meta: dict[str, Any], key: str, path) -> Any:
    if key not in meta:
        raise CheckpointError(f"{path}: GGUF metadata has no {key!r}")
    return meta[key]


def uniform(meta: dict[str, Any], key: str, path, default: Any = None) -> Any:
    """A per-model value some files store per layer: one value, or an array of equal ones."""
    value = meta.get(key, default) if default is not None else require(meta, key, path)
    if isinstance(value, list):
        if len(set(value)) != 1:
            raise CheckpointError(f"{path}: {key} differs between layers: not supported")
        value = value[0]
    return value


def to_float(tensor: GGUFTensor) -> torch.Tensor:
    if tensor.qtype in FLOAT_TYPES:
        return torch.from_numpy(tensor.data.copy()).view(FLOAT_TYPES[tensor.qtype]).reshape(
            tensor.shape)
    try:
        values = dequantize(tensor.data, tensor.qtype)
    except NotImplementedError:
        raise CheckpointError(f"tensor {tensor.name}: the gguf package cannot dequantize "
                              f"{tensor.qtype.name}") from None
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(tensor.shape)
