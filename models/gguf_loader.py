"""Load a GGUF file of any family we serve into HF-named CPU tensors: dequantized, or with
the formats the kernels serve (memory/quant_formats.py) kept as QuantizedTensor bytes.

The metadata becomes the config.json that the file's HF twin had (as far as GGUF stores it,
llama.cpp's own assumptions where it does not), read by the same `ModelConfig.from_hf_dict`;
tensors are renamed and their converter transforms undone (gguf_names.py), stacked experts
split into each expert's tensor.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from tokenpool.errors import CheckpointError
from tokenpool.memory.quant_formats import BY_GGML_TYPE
from tokenpool.models.checkpoint import Checkpoint
from tokenpool.models.config import ModelConfig
from tokenpool.models.gguf_file import GGUFFile, GGUFTensor, read_gguf
from tokenpool.models.gguf_names import MOE_NAMES, GGUFArch, gguf_arch
from tokenpool.models.gguf_rope import longrope_tensors, rope_dict
from tokenpool.models.gguf_values import f32, require, to_float, uniform
from tokenpool.models.quantized import QuantizedTensor
from tokenpool.models.tokenizer import Tokenizer

# RoPE keys whose llama.cpp meaning has no HF counterpart we compute: refused unless one of
# the neutral values (None: always). attn_factor alongside LongRoPE's factors is LongRoPE's
# attention factor (_longrope_params).
_NEUTRAL_ROPE_KEYS = {"rope.scaling.yarn_ext_factor": (1.0,), "rope.scaling.attn_factor": (1.0,),
                      "rope.scaling.yarn_log_multiplier": None, "rope.scaling.alpha": None}
# Mixture-of-experts keys llama.cpp's qwen3moe never reads (its converter never writes them):
# refused unless they say what its graph does anyway (softmax routing, renormalised top-k
# weights, no shared experts, no dense layers, no extra scale).
_NEUTRAL_MOE_KEYS = {"expert_gating_func": (1,), "expert_weights_norm": (True,),
                     "expert_weights_scale": (0.0, 1.0), "expert_shared_count": (0,),
                     "leading_dense_block_count": (0,)}


def load_gguf(path: str | Path, *, progress: bool = True,
              quantized: bool = False) -> Checkpoint:
    """Read config, weights and tokenizer from a GGUF file; with `quantized`, tensors in a
    format the kernels serve stay QuantizedTensor."""
    gguf = read_gguf(path)
    config = gguf_config(gguf)
    arch = gguf_arch(gguf.metadata, path)
    weights = {}
    for tensor in tqdm(gguf.tensors, desc=f"loading {Path(path).name}", unit="tensor",
                       delay=1.0, file=sys.stderr, disable=not progress):
        name = arch.hf_name(tensor.name, path)
        if name is not None:
            weights |= _split_experts(name, tensor_to_torch(tensor, config, arch, quantized))
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
    _refuse_unsupported(meta, arch, tensors, where)
    hidden = require(meta, key("embedding_length"), where)
    heads = uniform(meta, key("attention.head_count"), where)
    head_dim = meta.get(key("attention.key_length"), hidden // heads)
    if meta.get(key("attention.value_length"), head_dim) != head_dim:
        raise CheckpointError(f"{where}: {key('attention.value_length')} differs from the key "
                              "length: not supported")
    d = {
        "model_type": arch.model_type,
        "vocab_size": _vocab_size(meta, tensors, key),
        "hidden_size": hidden,
        "intermediate_size": uniform(meta, key("feed_forward_length"), where),
        "num_hidden_layers": require(meta, key("block_count"), where),
        "num_attention_heads": heads,
        "num_key_value_heads": uniform(meta, key("attention.head_count_kv"), where, heads),
        "head_dim": head_dim,
        "rms_norm_eps": f32(require(meta, key("attention.layer_norm_rms_epsilon"), where)),
        "max_position_embeddings": meta.get(key("context_length"), 2048),
        "tie_word_embeddings": "output.weight" not in tensors,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "attention_bias": any(f"blk.0.{t}.bias" in tensors for t in ("attn_q", "attn_qkv")),
        arch.act[0]: arch.act[1],
    }
    d |= rope_dict(meta, arch, tensors, head_dim, d["max_position_embeddings"], where)
    if arch.moe:
        d |= _experts_dict(meta, arch, tensors, d, where)
    return d | _window_and_caps(meta, arch, d)


def _experts_dict(meta: dict, arch: GGUFArch, tensors: dict[str, GGUFTensor], d: dict,
                  where) -> dict[str, Any]:
    """config.json's mixture-of-experts keys. Every layer must hold the router and the three
    stacked expert tensors, expert_count deep: llama.cpp's qwen3moe has no dense layers."""
    key = lambda k: f"{arch.name}.{k}"  # noqa: E731
    experts = require(meta, key("expert_count"), where)
    used = require(meta, key("expert_used_count"), where)
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
            out[cap] = f32(value) if value else None
        big = d["num_hidden_layers"] == arch.big_layers
        out["query_pre_attn_scalar"] = (d["hidden_size"] // d["num_attention_heads"] if big
                                        else d["head_dim"])
    return out


def _refuse_unsupported(meta: dict, arch: GGUFArch, tensors: dict[str, GGUFTensor],
                        where) -> None:
    if meta.get(f"{arch.name}.expert_count") and not arch.moe:
        raise CheckpointError(f"{where}: {arch.name}.expert_count: mixture-of-experts "
                              f"checkpoints of {arch.name} are not supported")
    neutral_keys = _NEUTRAL_ROPE_KEYS | (_NEUTRAL_MOE_KEYS if arch.moe else {})
    if longrope_tensors(arch, tensors):
        neutral_keys = {k: v for k, v in neutral_keys.items() if k != "rope.scaling.attn_factor"}
    for suffix, neutral in neutral_keys.items():
        value = meta.get(f"{arch.name}.{suffix}")
        if value is not None and (neutral is None or f32(value) not in neutral):
            raise CheckpointError(f"{where}: {arch.name}.{suffix} = {value!r} is not supported")


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


def gguf_weight_formats(gguf: GGUFFile) -> dict[str, str]:
    """HF tensor name -> the quant_formats name it is stored in, for the tensors whose type the
    kernels serve; from the header alone."""
    arch = gguf_arch(gguf.metadata, gguf.path)
    formats = {}
    for tensor in gguf.tensors:
        name = arch.hf_name(tensor.name, gguf.path)
        fmt = BY_GGML_TYPE.get(int(tensor.qtype))
        if name is None or fmt is None:
            continue
        experts = range(tensor.shape[0]) if "{e}" in name else (None,)
        formats |= {name.format(e=e): fmt.name for e in experts}
    return formats


def tensor_to_torch(tensor: GGUFTensor, config: ModelConfig, arch: GGUFArch,
                    quantized: bool = False) -> torch.Tensor | QuantizedTensor:
    """One tensor, dequantized unless `quantized` and the kernels serve its format, with what
    the converter did to it undone (row permutations apply to quantized rows as they are)."""
    fmt = BY_GGML_TYPE.get(int(tensor.qtype)) if quantized else None
    if fmt is not None:
        out = QuantizedTensor(torch.from_numpy(tensor.data.copy()), fmt.name, tensor.shape)
    else:
        out = to_float(tensor)
    if arch.permuted_qk and ".attn_q." in tensor.name:
        out = unpermute_rope_rows(out, config.num_attention_heads)
    elif arch.permuted_qk and ".attn_k." in tensor.name:
        out = unpermute_rope_rows(out, config.num_key_value_heads)
    if arch.norm_offset and tensor.name.endswith("norm.weight"):
        # Exact for stored values >= 0.5, so the engine's 1 + w is the stored value again.
        out = out.float() - arch.norm_offset
    return out.contiguous()


def unpermute_rope_rows(w, n_heads: int):
    """Undo convert_hf_to_gguf.py's `permute` of Q/K output rows.

    HF checkpoints rotate the two halves of each head ([x0..x31 | x32..x63] for head_dim 64);
    llama.cpp's RoPE rotates adjacent pairs, so the converter reorders each head's rows from
    [half0, half1] to interleaved [h0[0], h1[0], h0[1], h1[1], ...]. We read the interleaved
    order back into halves. Same result as transformers' `_reverse_permute_weights`.
    """
    if isinstance(w, QuantizedTensor):
        return QuantizedTensor(unpermute_rope_rows(w.data, n_heads), w.fmt, w.shape)
    out_features = w.shape[0]
    half = out_features // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)
