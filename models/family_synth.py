"""config.json for a ModelConfig, and the config of a synthetic checkpoint of a family.

Written as transformers 4 spells it (flat `rope_theta`, `rope_scaling`), which transformers 5
reads too, so both transformers and `ModelConfig.from_hf_dict` load what we write.
"""

from __future__ import annotations

from tokenpool.models.config import SLIDING, ModelConfig
from tokenpool.models.families import ACTIVATIONS, FAMILIES

_HF_ACTIVATION = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu"}
assert set(_HF_ACTIVATION) == set(ACTIVATIONS.values())


def synthetic_config(family: str, **sizes) -> ModelConfig:
    """The config of a random checkpoint of `family`: ModelConfig's sizes (`sizes`, by
    field name) plus the features the family's table row sets for synthetic models."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r} (supported: {', '.join(FAMILIES)})")
    eos = sizes.pop("eos_token_ids", ())
    raw = {**sizes, "eos_token_id": list(eos), "model_type": family,
           **FAMILIES[family].synth}
    if "moe_intermediate_size" in FAMILIES[family].defaults:  # Qwen3-MoE: experts a quarter
        raw.setdefault("moe_intermediate_size", max(16, sizes["intermediate_size"] // 4))
    return ModelConfig.from_hf_dict(raw, f"synthetic {family} config")


def hf_config_dict(cfg: ModelConfig) -> dict:
    family = cfg.family
    out = {
        "architectures": [family.architecture], "model_type": cfg.model_type,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim,
        "rms_norm_eps": cfg.rms_norm_eps, "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings, "bos_token_id": cfg.bos_token_id,
        "eos_token_id": list(cfg.eos_token_ids) if len(cfg.eos_token_ids) != 1
        else cfg.eos_token_ids[0],
        family.act_key: _HF_ACTIVATION[cfg.hidden_act],
        "rope_theta": cfg.rope.theta, "rope_scaling": cfg.rope.scaling_dict(),
        "attention_bias": cfg.o_bias, "mlp_bias": False,
    }
    if cfg.rope.partial_rotary_factor != 1.0:
        out["partial_rotary_factor"] = cfg.rope.partial_rotary_factor
    if cfg.local_rope is not None:
        out["rope_local_base_freq"] = cfg.local_rope.theta
    out |= _sliding_keys(cfg)
    if family.moe:
        out |= {"num_experts": cfg.num_experts, "num_local_experts": cfg.num_experts,
                "num_experts_per_tok": cfg.num_experts_per_tok,
                "moe_intermediate_size": cfg.moe_intermediate_size,
                "norm_topk_prob": cfg.norm_topk_prob, "decoder_sparse_step": 1,
                "mlp_only_layers": [i for i in range(cfg.num_hidden_layers)
                                    if not cfg.is_moe(i)]}
    if family.soft_caps:
        out |= {"query_pre_attn_scalar": cfg.query_pre_attn_scalar,
                "attn_logit_softcapping": cfg.attn_logit_softcapping,
                "final_logit_softcapping": cfg.final_logit_softcapping}
    return out


def _sliding_keys(cfg: ModelConfig) -> dict:
    if not cfg.layer_types:
        return {"sliding_window": None, "use_sliding_window": False}
    out = {"sliding_window": cfg.sliding_window, "layer_types": list(cfg.layer_types),
           "use_sliding_window": True}
    if cfg.family.sliding_opt_in:
        out["max_window_layers"] = cfg.layer_types.index(SLIDING)
    return out
