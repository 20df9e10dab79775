"""A model's weights in packed form: laid out, filled from a checkpoint, bound as views.

`packed_index` says where every engine tensor (q/k/v and gate/up already fused, cast to the
serving dtype) sits in one buffer. `pack_weights` writes a checkpoint's tensors straight into
such a buffer, wherever it lives: the node's host cache or a worker's weight slot.
`bind_weights` turns a buffer holding a packed model into `DecoderWeights` of views, which is
all a model switch does besides the copy: whatever the family, no module is rebuilt.
"""

from __future__ import annotations

from math import prod

import torch

from tokenpool.gpu_pool.decoder import DecoderWeights, LayerWeights
from tokenpool.gpu_pool.device import DTYPES, dtype_name
from tokenpool.memory.packing import PackIndex, TensorEntry
from tokenpool.models.config import ModelConfig
from tokenpool.models.tensor_layout import layer_roles, packed_sources, role_shapes


def is_tied(cfg: ModelConfig, names) -> bool:
    return cfg.tie_word_embeddings or "lm_head.weight" not in names


def packed_index(cfg: ModelConfig, dtype: torch.dtype, tied: bool | None = None) -> PackIndex:
    """Where each tensor goes. `tied` defaults to the config's tie_word_embeddings."""
    tied = cfg.tie_word_embeddings if tied is None else tied
    name = dtype_name(dtype)
    vocab_shape = (cfg.vocab_size, cfg.hidden_size)
    specs = [("embed", name, vocab_shape), ("norm", name, (cfg.hidden_size,))]
    if not tied:
        specs.append(("lm_head", name, vocab_shape))
    for i in range(cfg.num_hidden_layers):
        specs += [(f"layers.{i}.{role}", name, shape)
                  for role, shape in role_shapes(cfg, i).items()]
    return PackIndex.layout(specs)


def entry_view(buffer: torch.Tensor, entry: TensorEntry) -> torch.Tensor:
    """The tensor `entry` describes, as a view of the uint8 `buffer` (no copy)."""
    raw = buffer[entry.offset: entry.offset + entry.nbytes]
    return raw.view(DTYPES[entry.dtype]).view(entry.shape)


def pack_weights(cfg: ModelConfig, state_dict: dict[str, torch.Tensor], index: PackIndex,
                 buffer: torch.Tensor) -> None:
    """Write an HF-named state dict into `buffer` as `index` lays it out, fusing and casting."""
    sources = packed_sources(cfg, "lm_head" not in {e.name for e in index.entries})
    for entry in index.entries:
        dest = entry_view(buffer, entry)
        row = 0
        for hf_name in sources[entry.name]:
            part = state_dict[hf_name]
            dest[row: row + part.shape[0]].copy_(part)
            row += part.shape[0]
        if row != entry.shape[0]:
            raise ValueError(f"{entry.name}: sources give {row} rows, expected {entry.shape[0]}")


def bind_weights(cfg: ModelConfig, index: PackIndex, buffer: torch.Tensor) -> DecoderWeights:
    """DecoderWeights whose tensors are views into `buffer`, which holds a packed model."""
    views = {e.name: entry_view(buffer, e) for e in index.entries}
    layers = [LayerWeights(**{role: views[f"layers.{i}.{role}"]
                              for role in layer_roles(cfg, i)})
              for i in range(cfg.num_hidden_layers)]
    return DecoderWeights(embed=views["embed"], layers=layers, norm=views["norm"],
                        lm_head=views.get("lm_head", views["embed"]))


def largest_tensor_numel(index: PackIndex) -> int:
    return max(prod(e.shape) for e in index.entries)
