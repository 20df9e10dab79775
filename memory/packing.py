"""The packed form of a model's weights: one contiguous byte range plus an index.

Every tensor of a model, already in the form the engine computes with (fused, cast), sits at an
aligned offset in one buffer. Copying that buffer is the whole of a model switch, and the
index (name -> offset, dtype, shape) is how views are bound afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod

from tokenpool.memory.arena import ALIGN, align_up
from tokenpool.memory.quant_formats import QUANT_FORMATS

ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}
# A tensor split by rows into parts of different formats is packed as one entry per part,
# named `{tensor}#{part}` (a GGUF whose q, k and v projections differ in type).
PART_SEP = "#"


@dataclass(frozen=True, slots=True)
class TensorEntry:
    name: str
    offset: int  # from the start of the packed buffer
    dtype: str  # a float dtype's name, or a quant_formats name
    shape: tuple[int, ...]  # logical: a quantized [rows, cols] is [rows, cols] here too

    @property
    def nbytes(self) -> int:
        if self.dtype in QUANT_FORMATS:
            return QUANT_FORMATS[self.dtype].nbytes(prod(self.shape[:-1]), self.shape[-1])
        return prod(self.shape) * ITEMSIZE[self.dtype]

    @property
    def tensor_name(self) -> str:
        """The tensor this entry is (part of)."""
        return self.name.split(PART_SEP)[0]

    def to_dict(self) -> dict:
        return {"name": self.name, "offset": self.offset, "dtype": self.dtype,
                "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, d: dict) -> "TensorEntry":
        return cls(d["name"], d["offset"], d["dtype"], tuple(d["shape"]))


@dataclass(frozen=True, slots=True)
class PackIndex:
    entries: tuple[TensorEntry, ...]
    nbytes: int  # the whole buffer, alignment padding included

    @classmethod
    def layout(cls, specs: list[tuple[str, str, tuple[int, ...]]],
               align: int = ALIGN) -> "PackIndex":
        """Place (name, dtype, shape) tensors one after another at aligned offsets."""
        entries, offset = [], 0
        for name, dtype, shape in specs:
            entry = TensorEntry(name, offset, dtype, tuple(shape))
            entries.append(entry)
            offset = align_up(offset + entry.nbytes, align)
        return cls(tuple(entries), offset)

    def __getitem__(self, name: str) -> TensorEntry:
        for entry in self.entries:
            if entry.name == name:
                return entry
        raise KeyError(name)

    def to_dict(self) -> dict:
        return {"nbytes": self.nbytes, "entries": [e.to_dict() for e in self.entries]}

    @classmethod
    def from_dict(cls, d: dict) -> "PackIndex":
        return cls(tuple(TensorEntry.from_dict(e) for e in d["entries"]), d["nbytes"])
