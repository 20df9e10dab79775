"""Rotary position embeddings: one spec per layer kind, and its inverse frequencies.

Each scaling kind computes frequencies exactly as transformers does (same float32 ops in the
same order), so logits agree with the reference to rounding. `dynamic` is the only kind whose
frequencies depend on the sequence's length; the engine asks for them per sequence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tokenpool.errors import CheckpointError

ROPE_KINDS = ("default", "linear", "dynamic", "yarn", "llama3", "longrope")
# Kinds whose frequencies depend on the sequence's length (the engine passes it per token).
LENGTH_DEPENDENT = ("dynamic", "longrope")


@dataclass(frozen=True, slots=True)
class RopeSpec:
    kind: str = "default"
    theta: float = 10000.0
    factor: float = 1.0
    partial_rotary_factor: float = 1.0
    # llama3
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    # llama3, yarn and longrope: the context the model was pre-trained on
    original_max_position_embeddings: int | None = None
    # longrope (Phi-3 128k, Phi-3.5, Phi-4-mini): per-frequency divisors, the long ones for
    # sequences past original_max_position_embeddings
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()
    # yarn
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True

    def rotary_dim(self, head_dim: int) -> int:
        return int(head_dim * self.partial_rotary_factor)

    def scaling_dict(self) -> dict | None:
        """config.json's `rope_scaling` for this spec (None: no scaling)."""
        if self.kind == "default":
            return None
        out = {"rope_type": self.kind, "factor": self.factor}
        if self.kind == "llama3":
            out |= {"low_freq_factor": self.low_freq_factor,
                    "high_freq_factor": self.high_freq_factor}
        if self.kind in ("llama3", "yarn", "longrope"):
            out["original_max_position_embeddings"] = self.original_max_position_embeddings
        if self.kind == "longrope":
            out |= {"short_factor": list(self.short_factor), "long_factor": list(self.long_factor),
                    "attention_factor": self.attention_factor}
        if self.kind == "yarn":
            out |= {"beta_fast": self.beta_fast, "beta_slow": self.beta_slow}
        return out


def rope_spec_from_hf(params: dict, theta: float, partial_rotary_factor: float,
                      max_position_embeddings: int, where: str) -> RopeSpec:
    """A RopeSpec from a `rope_scaling` / `rope_parameters` dict (either spelling of its type)."""
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ROPE_KINDS:
        raise CheckpointError(f"{where}: rope_type {kind!r} is not supported "
                              f"(supported: {', '.join(ROPE_KINDS)})")
    theta = float(params.get("rope_theta") or theta)
    prf = float(params.get("partial_rotary_factor") or partial_rotary_factor)
    if kind == "default":
        return RopeSpec(theta=theta, partial_rotary_factor=prf)
    original = params.get("original_max_position_embeddings") or max_position_embeddings
    factor = params.get("factor")
    if factor is None and kind in ("yarn", "longrope"):
        factor = max_position_embeddings / original
    if factor is None:
        raise CheckpointError(f"{where}: rope_type {kind!r} needs 'factor'")
    return RopeSpec(
        kind=kind, theta=theta, factor=float(factor), partial_rotary_factor=prf,
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(original),
        beta_fast=float(params.get("beta_fast") or 32), beta_slow=float(params.get("beta_slow") or 1),
        attention_factor=params.get("attention_factor"), mscale=params.get("mscale"),
        mscale_all_dim=params.get("mscale_all_dim"), truncate=bool(params.get("truncate", True)),
        short_factor=_factors(params, "short_factor", kind, where),
        long_factor=_factors(params, "long_factor", kind, where))


def _factors(params: dict, key: str, kind: str, where: str) -> tuple[float, ...]:
    if kind != "longrope":
        return ()
    if not params.get(key):
        raise CheckpointError(f"{where}: rope_type 'longrope' needs {key!r}")
    return tuple(float(f) for f in params[key])


def _base_inv_freq(theta: float, dim: int) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def inv_freq(spec: RopeSpec, head_dim: int, max_position_embeddings: int,
             seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """(inverse frequencies [rotary_dim / 2], factor scaling cos and sin)."""
    dim = spec.rotary_dim(head_dim)
    if spec.kind == "linear":
        return _base_inv_freq(spec.theta, dim) / spec.factor, 1.0
    if spec.kind == "dynamic":
        seq_len = max(seq_len or 0, max_position_embeddings)
        base = spec.theta * ((spec.factor * seq_len / max_position_embeddings)
                             - (spec.factor - 1)) ** (dim / (dim - 2))
        return _base_inv_freq(base, dim), 1.0
    if spec.kind == "llama3":
        return _llama3(spec, dim), 1.0
    if spec.kind == "yarn":
        return _yarn(spec, dim)
    if spec.kind == "longrope":
        return _longrope(spec, dim, seq_len)
    return _base_inv_freq(spec.theta, dim), 1.0


def _llama3(spec: RopeSpec, dim: int) -> torch.Tensor:
    freq = _base_inv_freq(spec.theta, dim)
    old = spec.original_max_position_embeddings
    low_wavelen, high_wavelen = old / spec.low_freq_factor, old / spec.high_freq_factor
    wavelen = 2 * math.pi / freq
    scaled = torch.where(wavelen > low_wavelen, freq / spec.factor, freq)
    smooth = (old / wavelen - spec.low_freq_factor) / (spec.high_freq_factor - spec.low_freq_factor)
    smoothed = (1 - smooth) * scaled / spec.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _longrope(spec: RopeSpec, dim: int, seq_len: int | None) -> tuple[torch.Tensor, float]:
    original = spec.original_max_position_embeddings
    long = bool(seq_len) and seq_len > original
    factors = torch.tensor(spec.long_factor if long else spec.short_factor, dtype=torch.float32)
    if len(factors) != dim // 2:
        raise CheckpointError(f"rope {'long' if long else 'short'}_factor has {len(factors)} "
                              f"entries for {dim // 2} frequencies")
    attention_factor = spec.attention_factor
    if attention_factor is None:
        attention_factor = 1.0 if spec.factor <= 1.0 else \
            math.sqrt(1 + math.log(spec.factor) / math.log(original))
    shape = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    return 1.0 / (factors * spec.theta ** shape), float(attention_factor)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(spec: RopeSpec, dim: int) -> tuple[torch.Tensor, float]:
    factor, base = spec.factor, spec.theta
    attention_factor = spec.attention_factor
    if attention_factor is None:
        if spec.mscale and spec.mscale_all_dim:
            attention_factor = float(_yarn_mscale(factor, spec.mscale)
                                     / _yarn_mscale(factor, spec.mscale_all_dim))
        else:
            attention_factor = _yarn_mscale(factor)
    original = spec.original_max_position_embeddings

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(spec.beta_fast), correction_dim(spec.beta_slow)
    if spec.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as the reference: avoids dividing by zero
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    keep = 1 - ramp
    return interpolation * (1 - keep) + extrapolation * keep, float(attention_factor)
