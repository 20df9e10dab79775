"""Write a copy of a GGUF with its 2-D weights requantized to another llama.cpp type.

The only real model here ships as Q4_1; the benchmarks also want it as Q8_0 and Q4_0, as
`llama-quantize --allow-requantize` would write it. Metadata is copied as it is (file_type
updated); 1-D tensors (norms) stay F32. Usage:

    python requantize_gguf.py IN.gguf OUT.gguf Q8_0
"""

from __future__ import annotations

import sys

import gguf
import numpy as np
from gguf.quants import dequantize, quantize

FILE_TYPES = {"Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
              "Q4_1": gguf.LlamaFileType.MOSTLY_Q4_1}


def requantize(src: str, dst: str, type_name: str) -> None:
    qtype = gguf.GGMLQuantizationType[type_name]
    reader = gguf.GGUFReader(src)
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    writer = gguf.GGUFWriter(dst, arch)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        value = field.contents()
        if field.name == gguf.Keys.General.FILE_TYPE:
            value = int(FILE_TYPES[type_name])
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, value, kind, sub_type=sub)
    for tensor in reader.tensors:
        shape = tuple(int(n) for n in reversed(tensor.shape))  # rows first
        values = dequantize(tensor.data, tensor.tensor_type).reshape(shape).astype(np.float32)
        kind = qtype if values.ndim == 2 else gguf.GGMLQuantizationType.F32
        writer.add_tensor(tensor.name, quantize(values, kind), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


if __name__ == "__main__":
    requantize(*sys.argv[1:4])
