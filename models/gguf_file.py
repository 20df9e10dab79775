"""A minimal GGUF parser: metadata, tensor table and zero-copy views of the tensor bytes.

gguf.GGUFReader builds a numpy view for every part of every metadata value; for SmolLM2's
49152-token vocabulary that takes about 5 s on a small CPU. Walking the same bytes with struct
takes a tenth of a second, and loading is on the model-switch path, so we parse it ourselves.
Dequantization still goes through the gguf package (see gguf_loader.py).
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from tokenpool.errors import CheckpointError

_MAGIC = b"GGUF"
_VERSIONS = (2, 3)
_DEFAULT_ALIGNMENT = 32  # llama.cpp's, used when general.alignment is absent

# GGUF metadata value types that have a fixed width: type id -> struct format.
_SCALAR_FORMATS = {
    0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q",
    12: "<d",
}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True, slots=True)
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # torch order: GGUF lists dimensions fastest-moving first
    qtype: GGMLQuantizationType
    data: np.ndarray  # uint8 [*shape[:-1], bytes per row], a read-only view into the file


@dataclass(frozen=True, slots=True)
class GGUFFile:
    path: Path
    metadata: dict[str, Any]
    tensors: tuple[GGUFTensor, ...]


class _Cursor:
    """Reads little-endian values from a buffer, advancing a position."""

    def __init__(self, buf: mmap.mmap, pos: int = 0):
        self.buf = buf
        self.pos = pos

    def unpack(self, fmt: str) -> tuple:
        values = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return values

    def string(self) -> str:
        (length,) = self.unpack("<Q")
        start, self.pos = self.pos, self.pos + length
        return self.buf[start : self.pos].decode("utf-8", errors="replace")

    def value(self, vtype: int) -> Any:
        if vtype in _SCALAR_FORMATS:
            return self.unpack(_SCALAR_FORMATS[vtype])[0]
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, count = self.unpack("<IQ")
            if etype in _SCALAR_FORMATS:  # one unpack for the whole array: token types are 49k ints
                return list(self.unpack(f"<{count}{_SCALAR_FORMATS[etype][1]}"))
            return [self.value(etype) for _ in range(count)]
        raise CheckpointError(f"unknown GGUF metadata value type {vtype} at byte {self.pos}")


def read_gguf(path: str | Path) -> GGUFFile:
    """Parse a GGUF file's metadata and tensor table; tensor bytes stay memory-mapped."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError) as e:  # ValueError: mmap of an empty file
        raise CheckpointError(f"cannot read GGUF file {path}: {e}") from e
    try:
        return _parse(path, buf)
    except (struct.error, UnicodeDecodeError, IndexError) as e:
        raise CheckpointError(f"{path} is truncated or not a valid GGUF file: {e}") from e


def _parse(path: Path, buf: mmap.mmap) -> GGUFFile:
    if buf[:4] != _MAGIC:
        raise CheckpointError(f"{path} is not a GGUF file (magic bytes {buf[:4]!r})")
    cur = _Cursor(buf, 4)
    version, tensor_count, kv_count = cur.unpack("<IQQ")
    if version not in _VERSIONS:
        raise CheckpointError(
            f"{path}: GGUF version {version} is not supported (need one of {_VERSIONS}; "
            "big-endian files read as a huge version number)"
        )
    metadata = {}
    for _ in range(kv_count):
        key = cur.string()
        metadata[key] = cur.value(cur.unpack("<I")[0])
    table = [_tensor_entry(cur) for _ in range(tensor_count)]
    alignment = int(metadata.get("general.alignment", _DEFAULT_ALIGNMENT))
    data_start = -(-cur.pos // alignment) * alignment
    tensors = tuple(_tensor_view(path, buf, data_start, *entry) for entry in table)
    return GGUFFile(path, metadata, tensors)


def _tensor_entry(cur: _Cursor) -> tuple[str, tuple[int, ...], int, int]:
    name = cur.string()
    (ndim,) = cur.unpack("<I")
    dims = cur.unpack(f"<{ndim}Q")
    qtype, offset = cur.unpack("<IQ")
    return name, tuple(reversed(dims)), qtype, offset


def _tensor_view(
    path: Path, buf: mmap.mmap, data_start: int, name: str, shape: tuple[int, ...], qtype: int,
    offset: int,
) -> GGUFTensor:
    try:
        qtype = GGMLQuantizationType(qtype)
    except ValueError:
        raise CheckpointError(f"{path}: tensor {name} has unknown ggml type {qtype}") from None
    block, block_bytes = GGML_QUANT_SIZES[qtype]
    if shape[-1] % block:
        raise CheckpointError(
            f"{path}: tensor {name} row of {shape[-1]} is not whole {qtype.name} blocks")
    row_bytes = shape[-1] // block * block_bytes
    nbytes = prod(shape[:-1]) * row_bytes
    start = data_start + offset
    if start + nbytes > len(buf):
        raise CheckpointError(f"{path}: tensor {name} runs past the end of the file (truncated?)")
    data = np.frombuffer(buf, dtype=np.uint8, count=nbytes, offset=start)
    return GGUFTensor(name, shape, qtype, data.reshape(*shape[:-1], row_bytes))
