"""Which tensors a checkpoint of a given config holds, by role, with their shapes.

The engine packs one tensor per role and layer (`layers.{i}.{role}`); a role's HF sources are
concatenated along rows in the order listed (families.py), so q, k and v become one GEMM. A
source with `{e}` stands for every expert in turn (interleaved with the role's other
sources: expert 0's gate and up, then expert 1's), so a layer's experts are one packed
tensor and a switch still copies one buffer.
"""

from __future__ import annotations

from math import prod

from tokenpool.models.config import ModelConfig

DENSE_MLP = ("gate_up", "down")
MOE_MLP = ("router", "experts_gate_up", "experts_down")


def layer_roles(cfg: ModelConfig, layer: int) -> tuple[str, ...]:
    """The roles layer `layer` of this config has, in packing order."""
    roles = ["attn_norm", "qkv"]
    if cfg.qkv_bias:
        roles.append("qkv_bias")
    if cfg.qk_norm:
        roles += ["q_norm", "k_norm"]
    roles.append("o")
    if cfg.o_bias:
        roles.append("o_bias")
    if cfg.gemma_norms:
        roles.append("attn_out_norm")
    roles.append("mlp_norm")
    roles += MOE_MLP if cfg.is_moe(layer) else DENSE_MLP
    if cfg.gemma_norms:
        roles.append("mlp_out_norm")
    return tuple(roles)


def role_shapes(cfg: ModelConfig, layer: int) -> dict[str, tuple[int, ...]]:
    h, d, ffn = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    q, qkv = cfg.num_attention_heads * d, (cfg.num_attention_heads
                                           + 2 * cfg.num_key_value_heads) * d
    experts, moe_ffn = cfg.num_experts, cfg.moe_intermediate_size
    shapes = {"attn_norm": (h,), "qkv": (qkv, h), "qkv_bias": (qkv,), "q_norm": (d,),
              "k_norm": (d,), "o": (h, q), "o_bias": (h,), "attn_out_norm": (h,),
              "mlp_norm": (h,), "gate_up": (2 * ffn, h), "down": (h, ffn), "mlp_out_norm": (h,),
              "router": (experts, h), "experts_gate_up": (experts * 2 * moe_ffn, h),
              "experts_down": (experts * h, moe_ffn)}
    return {role: shapes[role] for role in layer_roles(cfg, layer)}


def _expand(cfg: ModelConfig, sources: tuple[str, ...]) -> tuple[str, ...]:
    if not any("{e}" in s for s in sources):
        return sources
    return tuple(s.format(e=e) for e in range(cfg.num_experts) for s in sources)


def packed_sources(cfg: ModelConfig, tied: bool) -> dict[str, tuple[str, ...]]:
    """Packed tensor name -> the HF tensors concatenated (along rows) to make it."""
    out = {"embed": ("model.embed_tokens.weight",), "norm": ("model.norm.weight",)}
    if not tied:
        out["lm_head"] = ("lm_head.weight",)
    sources = cfg.family.layer_sources()
    for i in range(cfg.num_hidden_layers):
        for role in layer_roles(cfg, i):
            out[f"layers.{i}.{role}"] = tuple(f"model.layers.{i}.{s}"
                                              for s in _expand(cfg, sources[role]))
    return out


def _source_rows(cfg: ModelConfig, role: str, rows: int, count: int) -> tuple[int, ...]:
    """Rows of each of a role's `count` sources, when the checkpoint keeps them apart."""
    if count > 1 and role in ("qkv", "qkv_bias"):
        kv = cfg.num_key_value_heads * cfg.head_dim
        return (cfg.num_attention_heads * cfg.head_dim, kv, kv)
    return (rows // count,) * count  # gate and up, or one slice per expert


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every HF tensor a checkpoint with this config must have, with its shape."""
    h = cfg.hidden_size
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, h), "model.norm.weight": (h,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    sources = packed_sources(cfg, tied=True)
    for i in range(cfg.num_hidden_layers):
        for role, shape in role_shapes(cfg, i).items():
            hf_names = sources[f"layers.{i}.{role}"]
            rows = _source_rows(cfg, role, shape[0], len(hf_names))
            for hf_name, n in zip(hf_names, rows):
                shapes[hf_name] = (n, *shape[1:])
    return shapes


def parameter_count(cfg: ModelConfig) -> int:
    """Parameters the engine packs for this config (the embedding once when tied)."""
    return sum(prod(shape) for shape in expected_shapes(cfg).values())
