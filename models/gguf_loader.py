"""Load a llama-architecture GGUF file into HF-named, dequantized CPU tensors."""

from __future__ import annotations

import re
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
from tokenpool.models.tokenizer import Tokenizer

# llama.cpp tensor names -> HF LlamaForCausalLM names.
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.weight")

# Stored float types are kept as they are; everything else is dequantized to float32.
_FLOAT_TYPES = {
    GGMLQuantizationType.F32: torch.float32,
    GGMLQuantizationType.F16: torch.float16,
    GGMLQuantizationType.BF16: torch.bfloat16,
}


def load_gguf(path: str | Path, *, progress: bool = True) -> Checkpoint:
    """Read config, weights and tokenizer from a GGUF file."""
    gguf = read_gguf(path)
    config = gguf_config(gguf)
    weights = {}
    for tensor in tqdm(gguf.tensors, desc=f"loading {Path(path).name}", unit="tensor",
                       delay=1.0, file=sys.stderr, disable=not progress):
        weights[hf_name(tensor.name, path)] = tensor_to_torch(tensor, config)
    if config.tie_word_embeddings:
        weights.pop("lm_head.weight", None)
    return Checkpoint(config, weights, Tokenizer.from_gguf(gguf.metadata), str(path))


def gguf_config(gguf: GGUFFile) -> ModelConfig:
    """ModelConfig from `llama.*` metadata; tied when the file has no `output.weight`."""
    meta = gguf.metadata
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise CheckpointError(
            f"{gguf.path}: GGUF architecture {arch!r} is not supported (need 'llama')")
    scaling = meta.get("llama.rope.scaling.type", "none")
    if scaling != "none":
        raise CheckpointError(f"{gguf.path}: RoPE scaling {scaling!r} is not supported")
    hidden = _require(meta, "llama.embedding_length", gguf.path)
    heads = _require(meta, "llama.attention.head_count", gguf.path)
    head_dim = meta.get("llama.attention.key_length", hidden // heads)
    if meta.get("llama.rope.dimension_count", head_dim) != head_dim:
        raise CheckpointError(f"{gguf.path}: partial rotary embeddings are not supported")
    names = {t.name for t in gguf.tensors}
    eos = meta.get("tokenizer.ggml.eos_token_id")
    return ModelConfig(
        vocab_size=meta.get("llama.vocab_size") or len(meta.get("tokenizer.ggml.tokens", ())),
        hidden_size=hidden,
        intermediate_size=_require(meta, "llama.feed_forward_length", gguf.path),
        num_hidden_layers=_require(meta, "llama.block_count", gguf.path),
        num_attention_heads=heads,
        num_key_value_heads=meta.get("llama.attention.head_count_kv", heads),
        head_dim=head_dim,
        rope_theta=float(meta.get("llama.rope.freq_base", 10000.0)),
        rms_norm_eps=float(meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        max_position_embeddings=meta.get("llama.context_length", 2048),
        tie_word_embeddings="output.weight" not in names,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=() if eos is None else (eos,),
    )


def _require(meta: dict[str, Any], key: str, path: Path) -> Any:
    if key not in meta:
        raise CheckpointError(f"{path}: GGUF metadata has no {key!r}")
    return meta[key]


def hf_name(gguf_name: str, path: str | Path = "") -> str:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _LAYER_RE.fullmatch(gguf_name)
    if m is None or m.group(2) not in _LAYER_NAMES:
        raise CheckpointError(
            f"{path}: tensor {gguf_name!r} has no Llama equivalent (not a plain llama checkpoint?)")
    return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.weight"


def tensor_to_torch(tensor: GGUFTensor, config: ModelConfig) -> torch.Tensor:
    """Dequantize one tensor and undo llama.cpp's Q/K row permutation."""
    if tensor.qtype in _FLOAT_TYPES:
        dtype = _FLOAT_TYPES[tensor.qtype]
        out = torch.from_numpy(tensor.data.copy()).view(dtype).reshape(tensor.shape)
    else:
        try:
            values = dequantize(tensor.data, tensor.qtype)
        except NotImplementedError:
            raise CheckpointError(f"tensor {tensor.name}: the gguf package cannot dequantize "
                                  f"{tensor.qtype.name}") from None
        out = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(tensor.shape)
    if ".attn_q." in tensor.name:
        out = unpermute_rope_rows(out, config.num_attention_heads)
    elif ".attn_k." in tensor.name:
        out = unpermute_rope_rows(out, config.num_key_value_heads)
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
