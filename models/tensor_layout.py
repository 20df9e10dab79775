"""Which tensors a checkpoint of a given config holds, by role, with their shapes.

The engine packs one tensor per role and layer (`layers.{i}.{role}`); a role's HF sources are
concatenated along rows in the order listed (families.py), so q, k and v become one GEMM.
"""

from __future__ import annotations

from math import prod

from tokenpool.models.config import ModelConfig

NORM_ROLES = ("attn_norm", "q_norm", "k_norm", "attn_out_norm", "mlp_norm", "mlp_out_norm")


def layer_roles(cfg: ModelConfig) -> tuple[str, ...]:
    """The roles a layer of this config has, in packing order."""
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
    roles += ["mlp_norm", "gate_up", "down"]
    if cfg.gemma_norms:
        roles.append("mlp_out_norm")
    return tuple(roles)


def _row_parts(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Rows of each source of a role, when the checkpoint keeps them apart."""
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    ffn = cfg.intermediate_size
    return {"qkv": (q, kv, kv), "qkv_bias": (q, kv, kv), "gate_up": (ffn, ffn)}


def role_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    h, d, ffn = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    q, qkv = cfg.num_attention_heads * d, (cfg.num_attention_heads
                                           + 2 * cfg.num_key_value_heads) * d
    shapes = {"attn_norm": (h,), "qkv": (qkv, h), "qkv_bias": (qkv,), "q_norm": (d,),
              "k_norm": (d,), "o": (h, q), "o_bias": (h,), "attn_out_norm": (h,),
              "mlp_norm": (h,), "gate_up": (2 * ffn, h), "down": (h, ffn), "mlp_out_norm": (h,)}
    return {role: shapes[role] for role in layer_roles(cfg)}


def packed_sources(cfg: ModelConfig, tied: bool) -> dict[str, tuple[str, ...]]:
    """Packed tensor name -> the HF tensors concatenated (along rows) to make it."""
    out = {"embed": ("model.embed_tokens.weight",), "norm": ("model.norm.weight",)}
    if not tied:
        out["lm_head"] = ("lm_head.weight",)
    sources = cfg.family.layer_sources()
    for i in range(cfg.num_hidden_layers):
        for role in layer_roles(cfg):
            out[f"layers.{i}.{role}"] = tuple(f"model.layers.{i}.{s}" for s in sources[role])
    return out


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every HF tensor a checkpoint with this config must have, with its shape."""
    h = cfg.hidden_size
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, h), "model.norm.weight": (h,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    roles, parts = role_shapes(cfg), _row_parts(cfg)
    for name, hf_names in packed_sources(cfg, tied=True).items():
        role = name.rsplit(".", 1)[-1]
        if role not in roles:
            continue
        rows = parts[role] if len(hf_names) > 1 else (roles[role][0],)
        for hf_name, n in zip(hf_names, rows):
            shapes[hf_name] = (n, *roles[role][1:])
    return shapes


def parameter_count(cfg: ModelConfig) -> int:
    """Parameters the engine packs for this config (the embedding once when tied)."""
    return sum(prod(shape) for shape in expected_shapes(cfg).values())
