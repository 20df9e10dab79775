"""Which packed tensors a model holds quantized, and in what format, for a quantization mode.

The plan is made from headers only (a GGUF's tensor types, or the config), so a fleet's
memory is sized before any weight is read. A packed tensor is a list of row segments, each
a quant_formats name or None (the serving dtype): q, k and v of a GGUF can differ in type
(llama.cpp's Q4_K_M keeps some attn_v in Q6_K), and then the fused projection is one
segment per run of equal formats.
"""

from __future__ import annotations

from tokenpool.memory.quant_formats import LOAD_FORMATS, QUANT_FORMATS, check_mode
from tokenpool.models.config import ModelConfig
from tokenpool.models.quantized import QuantizedTensor
from tokenpool.models.tensor_layout import expected_shapes, packed_sources

Segment = tuple[str | None, int]  # (format, None for the serving dtype; rows)
# Matrices a matmul (or the embedding lookup) reads; the router stays in the serving dtype:
# it is tiny, and its softmax picks experts, where rounding would change the routing.
QUANTIZABLE_ROLES = ("embed", "lm_head", "qkv", "o", "gate_up", "down", "experts_gate_up",
                     "experts_down")
_EXPERT_ROLES = ("experts_gate_up", "experts_down")


def plan_formats(cfg: ModelConfig, mode: str, tied: bool,
                 source_formats: dict[str, str | None] | None = None
                 ) -> dict[str, tuple[Segment, ...]]:
    """Packed tensor name -> its segments, for the tensors that hold any quantized rows.

    `source_formats`: HF tensor name -> the quantized format the checkpoint stores it in
    (None or absent: a float type); only `native` reads it.
    """
    check_mode(mode)
    if mode == "none":
        return {}
    shapes = expected_shapes(cfg)
    plan = {}
    for name, sources in packed_sources(cfg, tied).items():
        role = name.rsplit(".", 1)[-1]
        if role not in QUANTIZABLE_ROLES:
            continue
        if mode == "native":
            segments = _native_segments(sources, shapes, source_formats or {})
            if role in _EXPERT_ROLES and len(segments) > 1:
                segments = ((None, sum(rows for _, rows in segments)),)
        else:
            segments = _load_segments(sources, shapes, LOAD_FORMATS[mode])
        if any(fmt is not None for fmt, _ in segments):
            plan[name] = segments
    return plan


def _native_segments(sources, shapes, formats) -> tuple[Segment, ...]:
    segments: list[list] = []
    for hf_name in sources:
        fmt, rows = formats.get(hf_name), shapes[hf_name][0]
        if segments and segments[-1][0] == fmt:
            segments[-1][1] += rows
        else:
            segments.append([fmt, rows])
    return tuple((fmt, rows) for fmt, rows in segments)


def _load_segments(sources, shapes, fmt: str) -> tuple[Segment, ...]:
    rows = sum(shapes[s][0] for s in sources)
    cols = shapes[sources[0]][-1]
    if cols % QUANT_FORMATS[fmt].block_elems:
        return ((None, rows),)  # rows that are not whole blocks stay in the serving dtype
    return ((fmt, rows),)


def stored_formats(weights: dict) -> dict[str, str]:
    """HF tensor name -> format, for the tensors of a loaded checkpoint held quantized."""
    return {name: w.fmt for name, w in weights.items() if isinstance(w, QuantizedTensor)}
