"""config.json's RoPE parameters from a GGUF file: scaling keys, llama3's rope_freqs tensor,
Phi-3's LongRoPE factor tensors, Gemma 3's local base."""

from __future__ import annotations

import math
from typing import Any

from gguf import GGMLQuantizationType

from tokenpool.errors import CheckpointError
from tokenpool.models.gguf_file import GGUFTensor
from tokenpool.models.gguf_names import (LONGROPE, ROPE_FREQS, GGUFArch, llama3_from_rope_freqs,
                                         longrope_from_factors)
from tokenpool.models.gguf_values import f32, require, to_float

def rope_dict(meta: dict, arch: GGUFArch, tensors: dict[str, GGUFTensor], head_dim: int,
               max_pos: int, where) -> dict[str, Any]:
    """config.json's rope_parameters (nested by layer type for Gemma 3) and rotary fraction."""
    key = lambda k: f"{arch.name}.{k}"  # noqa: E731
    freqs, longrope = tensors.get(ROPE_FREQS), longrope_tensors(arch, tensors)
    rotary = meta.get(key("rope.dimension_count"), head_dim)
    fraction = rotary / head_dim
    if int(head_dim * fraction) != rotary:  # RopeSpec.rotary_dim must give `rotary` back
        fraction = math.nextafter(fraction, 1.0)
    # llama.cpp's default base when the key is absent (Gemma2Model never writes it).
    params = {"rope_type": "default", "rope_theta": f32(meta.get(key("rope.freq_base"), 1e4))}
    kind = meta.get(key("rope.scaling.type"), "none")
    if longrope:
        params = _longrope_params(meta, arch, longrope, freqs, params["rope_theta"], rotary,
                                  max_pos, where)
        return {"rope_parameters": params, "partial_rotary_factor": fraction}
    if kind not in ("none", "linear", "yarn"):
        also = f"; longrope with {' and '.join(LONGROPE)}" if arch.longrope else ""
        raise CheckpointError(f"{where}: {key('rope.scaling.type')} {kind!r} is not supported "
                              f"(supported: none, linear, yarn{also})")
    if kind != "none":
        params |= {"rope_type": kind,
                   "factor": f32(require(meta, key("rope.scaling.factor"), where))}
    if kind == "yarn":
        params["original_max_position_embeddings"] = require(
            meta, key("rope.scaling.original_context_length"), where)
        for ours, theirs in (("beta_fast", "yarn_beta_fast"), ("beta_slow", "yarn_beta_slow"),
                             ("attention_factor", "yarn_attn_factor")):
            if key(f"rope.scaling.{theirs}") in meta:
                params[ours] = f32(meta[key(f"rope.scaling.{theirs}")])
    if freqs is not None:
        if kind != "none":
            raise CheckpointError(f"{where}: {ROPE_FREQS} together with "
                                  f"{key('rope.scaling.type')} {kind!r} is not supported")
        params = llama3_from_rope_freqs(to_float(freqs), params["rope_theta"], head_dim,
                                        fraction, max_pos, where)
    if arch.local_rope:  # llama.cpp's default swa base (and transformers' rope_local_base_freq)
        local = f32(meta.get(key("rope.freq_base_swa"), 1e4))
        params = {"full_attention": params,
                  "sliding_attention": {"rope_type": "default", "rope_theta": local}}
    return {"rope_parameters": params, "partial_rotary_factor": fraction}


def longrope_tensors(arch: GGUFArch, tensors: dict[str, GGUFTensor]) -> dict[str, GGUFTensor]:
    """The LongRoPE factor tensors the file holds, where llama.cpp's arch loads them."""
    return {n: tensors[n] for n in LONGROPE if n in tensors} if arch.longrope else {}


def _longrope_params(meta: dict, arch: GGUFArch, factors: dict[str, GGUFTensor],
                     freqs: GGUFTensor | None, theta: float, rotary: int, max_pos: int,
                     where) -> dict[str, Any]:
    """longrope rope_parameters from Phi3MiniModel's factor tensors and keys. It writes no
    scaling type or factor: with one, llama.cpp would rescale (linear, yarn) on top of the
    factors. ggml_rope_ext takes F32 factors only."""
    key = lambda k: f"{arch.name}.{k}"  # noqa: E731
    kind = meta.get(key("rope.scaling.type"), "none")
    if kind not in ("none", "longrope"):
        raise CheckpointError(f"{where}: {key('rope.scaling.type')} {kind!r} together with "
                              f"LongRoPE's {', '.join(factors)} is not supported")
    if f32(meta.get(key("rope.scaling.factor"), 1.0)) != 1.0:
        raise CheckpointError(f"{where}: {key('rope.scaling.factor')} together with LongRoPE's "
                              "factor tensors is not supported")
    if freqs is not None:
        raise CheckpointError(f"{where}: {ROPE_FREQS} together with LongRoPE's factor tensors "
                              "is not supported")
    for t in factors.values():
        if t.qtype != GGMLQuantizationType.F32:
            raise CheckpointError(f"{where}: tensor {t.name!r} is {t.qtype.name}: LongRoPE "
                                  "factors must be F32")
    # Absent, llama.cpp switches at context_length (and so does transformers, whose default
    # original is max_position_embeddings).
    original = meta.get(key("rope.scaling.original_context_length"), max_pos)
    if original < 2:
        raise CheckpointError(f"{where}: {key('rope.scaling.original_context_length')} = "
                              f"{original} is not a context length")
    # Absent, llama.cpp's attention factor is 1.
    attn = f32(meta.get(key("rope.scaling.attn_factor"), 1.0))
    return longrope_from_factors({n: to_float(t) for n, t in factors.items()}, attn, theta,
                                 rotary, original, max_pos, where)
