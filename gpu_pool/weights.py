"""A Llama model's weights in packed form: laid out, filled from a checkpoint, bound as views.

`packed_index` says where every engine tensor (q/k/v and gate/up already fused, cast to the
serving dtype) sits in one buffer. `pack_llama` writes a checkpoint's tensors straight into
such a buffer, wherever it lives: the node's host cache or a worker's weight slot.
`bind_llama` turns a buffer holding a packed model into `LlamaWeights` of views, which is all
a model switch does besides the copy.
"""

from __future__ import annotations

from math import prod

import torch

from tokenpool.gpu_pool.device import DTYPES, dtype_name
from tokenpool.gpu_pool.llama import LayerWeights, LlamaWeights
from tokenpool.memory.packing import PackIndex, TensorEntry
from tokenpool.models.config import ModelConfig

LAYER_FIELDS = ("input_norm", "qkv", "o", "post_norm", "gate_up", "down")


def is_tied(cfg: ModelConfig, names) -> bool:
    return cfg.tie_word_embeddings or "lm_head.weight" not in names


def _layer_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    h, d = cfg.hidden_size, cfg.head_dim
    qkv_rows = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * d
    return {"input_norm": (h,), "qkv": (qkv_rows, h), "o": (h, cfg.num_attention_heads * d),
            "post_norm": (h,), "gate_up": (2 * cfg.intermediate_size, h),
            "down": (h, cfg.intermediate_size)}


def packed_index(cfg: ModelConfig, dtype: torch.dtype, tied: bool | None = None) -> PackIndex:
    """Where each tensor goes. `tied` defaults to the config's tie_word_embeddings."""
    tied = cfg.tie_word_embeddings if tied is None else tied
    name = dtype_name(dtype)
    vocab_shape = (cfg.vocab_size, cfg.hidden_size)
    specs = [("embed", name, vocab_shape), ("norm", name, (cfg.hidden_size,))]
    if not tied:
        specs.append(("lm_head", name, vocab_shape))
    shapes = _layer_shapes(cfg)
    for i in range(cfg.num_hidden_layers):
        specs += [(f"layers.{i}.{f}", name, shapes[f]) for f in LAYER_FIELDS]
    return PackIndex.layout(specs)


def _hf_sources(cfg: ModelConfig, tied: bool) -> dict[str, tuple[str, ...]]:
    """Packed name -> the HF tensors concatenated (in order, along rows) to make it."""
    out = {"embed": ("model.embed_tokens.weight",), "norm": ("model.norm.weight",)}
    if not tied:
        out["lm_head"] = ("lm_head.weight",)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        out.update({
            f"layers.{i}.input_norm": (p + "input_layernorm.weight",),
            f"layers.{i}.qkv": tuple(p + f"self_attn.{x}_proj.weight" for x in "qkv"),
            f"layers.{i}.o": (p + "self_attn.o_proj.weight",),
            f"layers.{i}.post_norm": (p + "post_attention_layernorm.weight",),
            f"layers.{i}.gate_up": (p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"),
            f"layers.{i}.down": (p + "mlp.down_proj.weight",),
        })
    return out


def entry_view(buffer: torch.Tensor, entry: TensorEntry) -> torch.Tensor:
    """The tensor `entry` describes, as a view of the uint8 `buffer` (no copy)."""
    raw = buffer[entry.offset: entry.offset + entry.nbytes]
    return raw.view(DTYPES[entry.dtype]).view(entry.shape)


def pack_llama(cfg: ModelConfig, state_dict: dict[str, torch.Tensor], index: PackIndex,
               buffer: torch.Tensor) -> None:
    """Write an HF-named state dict into `buffer` as `index` lays it out, fusing and casting."""
    sources = _hf_sources(cfg, "lm_head" not in {e.name for e in index.entries})
    for entry in index.entries:
        dest = entry_view(buffer, entry)
        row = 0
        for hf_name in sources[entry.name]:
            part = state_dict[hf_name]
            dest[row: row + part.shape[0]].copy_(part)
            row += part.shape[0]
        if row != entry.shape[0]:
            raise ValueError(f"{entry.name}: sources give {row} rows, expected {entry.shape[0]}")


def bind_llama(cfg: ModelConfig, index: PackIndex, buffer: torch.Tensor) -> LlamaWeights:
    """LlamaWeights whose tensors are views into `buffer`, which holds a packed model."""
    views = {e.name: entry_view(buffer, e) for e in index.entries}
    layers = [LayerWeights(*(views[f"layers.{i}.{f}"] for f in LAYER_FIELDS))
              for i in range(cfg.num_hidden_layers)]
    return LlamaWeights(embed=views["embed"], layers=layers, norm=views["norm"],
                        lm_head=views.get("lm_head", views["embed"]))


def largest_tensor_numel(index: PackIndex) -> int:
    return max(prod(e.shape) for e in index.entries)
