"""Load a GGUF file of any family we serve into HF-named, dequantized CPU tensors.

The metadata becomes the config.json that the file's HF twin had (as far as GGUF stores it,
llama.cpp's own assumptions where it does not), read by the same `ModelConfig.from_hf_dict`;
tensors are renamed and their converter transforms undone (gguf_names.py), stacked experts
split into each expert's tensor.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize
from tqdm import tqdm

from tokenpool.errors import CheckpointError
from tokenpool.models.checkpoint import Checkpoint
from tokenpool.models.config import ModelConfig
from tokenpool.models.gguf_file import GGUFFile, GGUFTensor, read_gguf
from tokenpool.models.gguf_names import (MOE_NAMES, ROPE_FREQS, GGUFArch, gguf_arch,
                                         llama3_from_rope_freqs)
from tokenpool.models.tokenizer import Tokenizer

# Stored float types are kept as they are; everything else is dequantized to float32.
_FLOAT_TYPES = {
    GGMLQuantizationType.F32: torch.float32,
    GGMLQuantizationType.F16: torch.float16,
    GGMLQuantizationType.BF16: torch.bfloat16,
}
# RoPE keys whose llama.cpp meaning has no HF counterpart we compute: refused unless one of
# the neutral values (None: always).
_NEUTRAL_ROPE_KEYS = {"rope.scaling.yarn_ext_factor": (1.0,), "rope.scaling.attn_factor": (1.0,),
                      "rope.scaling.yarn_log_multiplier": None, "rope.scaling.alpha": None}
# Mixture-of-experts keys llama.cpp's qwen3moe never reads (its converter never writes them):
# refused unless they say what its graph does anyway (softmax routing, renormalised top-k
# weights, no shared experts, no dense layers, no extra scale).
_NEUTRAL_MOE_KEYS = {"expert_gating_func": (1,), "expert_weights_norm": (True,),
                     "expert_weights_scale": (0.0, 1.0), "expert_shared_count": (0,),
                     "leading_dense_block_count": (0,)}


def load_gguf(path: str | Path, *, progress: bool = True) -> Checkpoint:
    """Read config, weights and tokenizer from a GGUF file."""
    gguf = read_gguf(path)
    config = gguf_config(gguf)
    arch = gguf_arch(gguf.metadata, path)
    weights = {}
    for tensor in tqdm(gguf.tensors, desc=f"loading {Path(path).name}", unit="tensor",
                       delay=1.0, file=sys.stderr, disable=not progress):
        name = arch.hf_name(tensor.name, path)
        if name is not None:
            weights |= _split_experts(name, tensor_to_torch(tensor, config, arch))
    if config.tie_word_embeddings:
        weights.pop("lm_head.weight", None)
    return Checkpoint(config, weights, Tokenizer.from_gguf(gguf.metadata), str(path))


def gguf_config(gguf: GGUFFile) -> ModelConfig:
    """ModelConfig from `{arch}.*` metadata; tied when the file has no `output.weight`."""
    where = str(gguf.path)
    try:
        return ModelConfig.from_hf_dict(hf_config_dict(gguf), where)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: invalid GGUF metadata: {e!r}") from e


def hf_config_dict(gguf: GGUFFile) -> dict[str, Any]:
    """The config.json of the file's HF twin, as far as the GGUF metadata tells it."""
    meta, where = gguf.metadata, gguf.path
    arch = gguf_arch(meta, where)
    key = lambda k: f"{arch.name}.{k}"  # noqa: E731
    tensors = {t.name: t for t in gguf.tensors}
    _refuse_unsupported(meta, arch, where)
    hidden = _require(meta, key("embedding_length"), where)
    heads = _uniform(meta, key("attention.head_count"), where)
    head_dim = meta.get(key("attention.key_length"), hidden // heads)
    if meta.get(key("attention.value_length"), head_dim) != head_dim:
        raise CheckpointError(f"{where}: {key('attention.value_length')} differs from the key "
                              "length: not supported")
    d = {
        "model_type": arch.model_type,
        "vocab_size": _vocab_size(meta, tensors, key),
        "hidden_size": hidden,
        "intermediate_size": _uniform(meta, key("feed_forward_length"), where),
        "num_hidden_layers": _require(meta, key("block_count"), where),
        "num_attention_heads": heads,
        "num_key_value_heads": _uniform(meta, key("attention.head_count_kv"), where, heads),
        "head_dim": head_dim,
        "rms_norm_eps": _f32(_require(meta, key("attention.layer_norm_rms_epsilon"), where)),
        "max_position_embeddings": meta.get(key("context_length"), 2048),
        "tie_word_embeddings": "output.weight" not in tensors,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "attention_bias": any(f"blk.0.{t}.bias" in tensors for t in ("attn_q", "attn_qkv")),
        arch.act[0]: arch.act[1],
    }
    d |= _rope_dict(meta, arch, tensors.get(ROPE_FREQS), head_dim, d["max_position_embeddings"],
                    where)
    if arch.moe:
        d |= _experts_dict(meta, arch, tensors, d, where)
    return d | _window_and_caps(meta, arch, d)


def _experts_dict(meta: dict, arch: GGUFArch, tensors: dict[str, GGUFTensor], d: dict,
                  where) -> dict[str, Any]:
    """config.json's mixture-of-experts keys. Every layer must hold the router and the three
    stacked expert tensors, expert_count deep: llama.cpp's qwen3moe has no dense layers."""
    key = lambda k: f"{arch.name}.{k}"  # noqa: E731
    experts = _require(meta, key("expert_count"), where)
    used = _require(meta, key("expert_used_count"), where)
    if not 0 < used <= experts:
        raise CheckpointError(f"{where}: {key('expert_used_count')} = {used} is not in "
                              f"1..{key('expert_count')} ({experts})")
    for i in range(d["num_hidden_layers"]):
        for name in (f"blk.{i}.{t}.weight" for t in MOE_NAMES):
            if name not in tensors:
                mlp = sorted(n.split(".")[2] for n in tensors
                             if n.startswith(f"blk.{i}.ffn_") and ".ffn_norm." not in n)
                raise CheckpointError(
                    f"{where}: layer {i} has no {name} (its MLP tensors: {', '.join(mlp)}): "
                    f"llama.cpp's {arch.name} needs {', '.join(MOE_NAMES)} in every layer")
            if tensors[name].shape[0] != experts:
                raise CheckpointError(f"{where}: {name} holds {tensors[name].shape[0]} experts, "
                                      f"{key('expert_count')} says {experts}")
    # Absent, llama.cpp takes n_ff / n_expert_used.
    ffn = meta.get(key("expert_feed_forward_length")) or d["intermediate_size"] // used
    return {"num_experts": experts, "num_experts_per_tok": used, "moe_intermediate_size": ffn,
            "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": []}


def _window_and_caps(meta: dict, arch: GGUFArch, d: dict) -> dict:
    """Sliding-window layers, and Gemma's soft-caps and query scale, from the metadata."""
    out = {}
    window = meta.get(f"{arch.name}.attention.sliding_window") if arch.sliding else None
    if window:
        out["sliding_window"] = window
        out |= _sliding_pattern(meta.get(f"{arch.name}.attention.sliding_window_pattern"))
    if arch.soft_caps:
        for cap in ("attn_logit_softcapping", "final_logit_softcapping"):
            value = meta.get(f"{arch.name}.{cap}")
            out[cap] = _f32(value) if value else None
        big = d["num_hidden_layers"] == arch.big_layers
        out["query_pre_attn_scalar"] = (d["hidden_size"] // d["num_attention_heads"] if big
                                        else d["head_dim"])
    return out


def _refuse_unsupported(meta: dict, arch: GGUFArch, where) -> None:
    if meta.get(f"{arch.name}.expert_count") and not arch.moe:
        raise CheckpointError(f"{where}: {arch.name}.expert_count: mixture-of-experts "
                              f"checkpoints of {arch.name} are not supported")
    neutral_keys = _NEUTRAL_ROPE_KEYS | (_NEUTRAL_MOE_KEYS if arch.moe else {})
    for suffix, neutral in neutral_keys.items():
        value = meta.get(f"{arch.name}.{suffix}")
        if value is not None and (neutral is None or _f32(value) not in neutral):
            raise CheckpointError(f"{where}: {arch.name}.{suffix} = {value!r} is not supported")


def _rope_dict(meta: dict, arch: GGUFArch, freqs: GGUFTensor | None, head_dim: int,
               max_pos: int, where) -> dict[str, Any]:
    """config.json's rope_parameters (nested by layer type for Gemma 3) and rotary fraction."""
    key = lambda k: f"{arch.name}.{k}"  # noqa: E731
    rotary = meta.get(key("rope.dimension_count"), head_dim)
    fraction = rotary / head_dim
    if int(head_dim * fraction) != rotary:  # RopeSpec.rotary_dim must give `rotary` back
        fraction = math.nextafter(fraction, 1.0)
    # llama.cpp's default base when the key is absent (Gemma2Model never writes it).
    params = {"rope_type": "default", "rope_theta": _f32(meta.get(key("rope.freq_base"), 1e4))}
    kind = meta.get(key("rope.scaling.type"), "none")
    if kind not in ("none", "linear", "yarn"):
        raise CheckpointError(f"{where}: {key('rope.scaling.type')} {kind!r} is not supported "
                              "(supported: none, linear, yarn)")
    if kind != "none":
        params |= {"rope_type": kind,
                   "factor": _f32(_require(meta, key("rope.scaling.factor"), where))}
    if kind == "yarn":
        params["original_max_position_embeddings"] = _require(
            meta, key("rope.scaling.original_context_length"), where)
        for ours, theirs in (("beta_fast", "yarn_beta_fast"), ("beta_slow", "yarn_beta_slow"),
                             ("attention_factor", "yarn_attn_factor")):
            if key(f"rope.scaling.{theirs}") in meta:
                params[ours] = _f32(meta[key(f"rope.scaling.{theirs}")])
    if freqs is not None:
        if kind != "none":
            raise CheckpointError(f"{where}: {ROPE_FREQS} together with "
                                  f"{key('rope.scaling.type')} {kind!r} is not supported")
        params = llama3_from_rope_freqs(_to_float(freqs), params["rope_theta"], head_dim,
                                        fraction, max_pos, where)
    if arch.local_rope:  # llama.cpp's default swa base (and transformers' rope_local_base_freq)
        local = _f32(meta.get(key("rope.freq_base_swa"), 1e4))
        params = {"full_attention": params,
                  "sliding_attention": {"rope_type": "default", "rope_theta": local}}
    return {"rope_parameters": params, "partial_rotary_factor": fraction}


def _split_experts(name: str, w: torch.Tensor) -> dict[str, torch.Tensor]:
    """One HF tensor, or a stack of experts' ([experts, out, in]) as each expert's."""
    if "{e}" not in name:
        return {name: w}
    return {name.format(e=e): x for e, x in enumerate(w.unbind(0))}


def _sliding_pattern(pattern: int | list[bool] | None) -> dict[str, Any]:
    """config.json's sliding_window_pattern or layer_types, from the optional GGUF key (an
    int period, or one bool per layer, true for sliding); absent, the family's default."""
    if pattern is None:
        return {}
    if isinstance(pattern, list):
        return {"layer_types": ["sliding_attention" if p else "full_attention" for p in pattern]}
    return {"sliding_window_pattern": pattern}


def _vocab_size(meta: dict, tensors: dict[str, GGUFTensor], key) -> int:
    if "token_embd.weight" in tensors:
        return tensors["token_embd.weight"].shape[0]
    return meta.get(key("vocab_size")) or len(meta.get("tokenizer.ggml.tokens", ()))


def _f32(value: float) -> float:
    """A float32 metadata value as the decimal it was written from (1e-06, not 9.99e-07)."""
    return float(str(np.float32(value)))


def _require(meta: dict[str, Any], key: str, path) -> Any:
    if key not in meta:
        raise CheckpointError(f"{path}: GGUF metadata has no {key!r}")
    return meta[key]


def _uniform(meta: dict[str, Any], key: str, path, default: Any = None) -> Any:
    """A per-model value some files store per layer: one value, or an array of equal ones."""
    value = meta.get(key, default) if default is not None else _require(meta, key, path)
    if isinstance(value, list):
        if len(set(value)) != 1:
            raise CheckpointError(f"{path}: {key} differs between layers: not supported")
        value = value[0]
    return value


def _to_float(tensor: GGUFTensor) -> torch.Tensor:
    if tensor.qtype in _FLOAT_TYPES:
        return torch.from_numpy(tensor.data.copy()).view(_FLOAT_TYPES[tensor.qtype]).reshape(
            tensor.shape)
    try:
        values = dequantize(tensor.data, tensor.qtype)
    except NotImplementedError:
        raise CheckpointError(f"tensor {tensor.name}: the gguf package cannot dequantize "
                              f"{tensor.qtype.name}") from None
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(tensor.shape)


def tensor_to_torch(tensor: GGUFTensor, config: ModelConfig, arch: GGUFArch) -> torch.Tensor:
    """Dequantize one tensor and undo what the converter did to it."""
    out = _to_float(tensor)
    if arch.permuted_qk and ".attn_q." in tensor.name:
        out = unpermute_rope_rows(out, config.num_attention_heads)
    elif arch.permuted_qk and ".attn_k." in tensor.name:
        out = unpermute_rope_rows(out, config.num_key_value_heads)
    if arch.norm_offset and tensor.name.endswith("norm.weight"):
        # Exact for stored values >= 0.5, so the engine's 1 + w is the stored value again.
        out = out.float() - arch.norm_offset
    return out.contiguous()


def unpermute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo convert_hf_to_gguf.py's `permute` of Q/K output rows.

    HF checkpoints rotate the two halves of each head ([x0..x31 | x32..x63] for head_dim 64);
    llama.cpp's RoPE rotates adjacent pairs, so the converter reorders each head's rows from
    [half0, half1] to interleaved [h0[0], h1[0], h0[1], h1[1], ...]. We read the interleaved
    order back into halves. Same result as transformers' `_reverse_permute_weights`.
    """
    out_features = w.shape[0]
    half = out_features // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)
