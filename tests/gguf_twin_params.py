"""What llama.cpp's converter writes as metadata for each architecture (its
`set_gguf_parameters`), for tests/gguf_twins.py: one function per converter class, each
naming the converter code it follows.
"""

from __future__ import annotations

import gguf

def rope_parameters(hp: dict) -> dict:
    """TextModel.__init__ (base.py): rope_parameters, with rope_theta, partial_rotary_factor
    and original_max_position_embeddings mirrored into it where it lacks them (the nested
    values win, where transformers lets Phi-3's top-level original win; transformers' own
    to_dict has already put that one inside)."""
    rope = dict(hp.get("rope_parameters", hp.get("rope_scaling")) or {})
    if "full_attention" not in rope and "sliding_attention" not in rope:
        local = hp.get("rope_local_base_freq")
        if local is not None:
            rope["sliding_attention"] = {"rope_theta": local}
        if "rope_theta" not in rope and hp.get("rope_theta") is not None:
            rope["rope_theta"] = hp["rope_theta"]
        if "rope_type" not in rope and rope.get("type") is not None:
            rope["rope_type"] = rope["type"]
        for k in ("partial_rotary_factor", "original_max_position_embeddings"):
            if k not in rope and hp.get(k) is not None:
                rope[k] = hp[k]
    return rope


def _text_model(w: gguf.GGUFWriter, hp: dict, rope: dict) -> None:
    """TextModel.set_gguf_parameters (base.py), the keys our families reach."""
    w.add_block_count(hp["num_hidden_layers"])
    w.add_context_length(hp["max_position_embeddings"])
    w.add_embedding_length(hp["hidden_size"])
    w.add_feed_forward_length(hp["intermediate_size"])
    w.add_head_count(hp["num_attention_heads"])
    if hp.get("num_key_value_heads") is not None:
        w.add_head_count_kv(hp["num_key_value_heads"])
    params = rope.get("full_attention", rope)
    kind, factor = params.get("rope_type"), params.get("factor")
    if kind == "linear" and factor is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(factor)
    elif kind == "yarn" and factor is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(factor)
        w.add_rope_scaling_orig_ctx_len(params["original_max_position_embeddings"])
        if params.get("extrapolation_factor") is not None:
            w.add_rope_scaling_yarn_ext_factor(params["extrapolation_factor"])
        attn = params.get("attention_factor", params.get("attn_factor"))
        if attn is not None:
            w.add_rope_scaling_yarn_attn_factor(attn)
        if params.get("beta_fast") is not None:
            w.add_rope_scaling_yarn_beta_fast(params["beta_fast"])
        if params.get("beta_slow") is not None:
            w.add_rope_scaling_yarn_beta_slow(params["beta_slow"])
    # "dynamic" writes nothing ("HunYuan, handled in model class"); "llama3" is rope_freqs.
    if params.get("rope_theta") is not None:
        w.add_rope_freq_base(params["rope_theta"])
    if rope.get("sliding_attention", {}).get("rope_theta") is not None:
        w.add_rope_freq_base_swa(rope["sliding_attention"]["rope_theta"])
    w.add_layer_norm_rms_eps(hp["rms_norm_eps"])
    experts = find_key(hp, ("num_local_experts", "num_experts", "n_routed_experts"))
    if experts is not None:
        w.add_expert_count(experts)
    used = find_key(hp, ("num_experts_per_tok", "num_experts_per_token", "top_k_experts"))
    if used is not None:
        w.add_expert_used_count(used)
    if hp.get("head_dim") is not None:
        w.add_key_length(hp["head_dim"])
        w.add_value_length(hp["head_dim"])


def find_key(hp: dict, keys: tuple[str, ...]):
    """ModelBase.find_hparam(keys, optional=True): the first key present."""
    return next((hp[k] for k in keys if k in hp), None)


def _qwen2moe(w: gguf.GGUFWriter, hp: dict, rope: dict) -> None:
    """Qwen2MoeModel.set_gguf_parameters (qwen.py), which Qwen3MoeModel inherits: no
    norm_topk_prob (llama.cpp's qwen3moe always renormalises), nothing on dense layers."""
    _text_model(w, hp, rope)
    if hp.get("moe_intermediate_size") is not None:
        w.add_expert_feed_forward_length(hp["moe_intermediate_size"])
    if hp.get("shared_expert_intermediate_size") is not None:
        w.add_expert_shared_feed_forward_length(hp["shared_expert_intermediate_size"])


def _llama(w: gguf.GGUFWriter, hp: dict, rope: dict) -> None:
    """LlamaModel.set_gguf_parameters (llama.py)."""
    _text_model(w, hp, rope)
    w.add_vocab_size(hp["vocab_size"])
    w.add_rope_dimension_count(hp.get("head_dim")
                               or hp["hidden_size"] // hp["num_attention_heads"])


def _gemma2(w: gguf.GGUFWriter, hp: dict, rope: dict) -> None:
    """Gemma2Model.set_gguf_parameters (gemma.py): no RoPE base, no query_pre_attn_scalar."""
    w.add_context_length(hp["max_position_embeddings"])
    w.add_embedding_length(hp["hidden_size"])
    w.add_block_count(hp["num_hidden_layers"])
    w.add_feed_forward_length(hp["intermediate_size"])
    w.add_head_count(hp["num_attention_heads"])
    w.add_head_count_kv(hp.get("num_key_value_heads") or hp["num_attention_heads"])
    w.add_layer_norm_rms_eps(hp["rms_norm_eps"])
    w.add_key_length(hp["head_dim"])
    w.add_value_length(hp["head_dim"])
    w.add_attn_logit_softcapping(hp["attn_logit_softcapping"])
    w.add_final_logit_softcapping(hp["final_logit_softcapping"])
    w.add_sliding_window(hp["sliding_window"])


def _gemma3(w: gguf.GGUFWriter, hp: dict, rope: dict) -> None:
    """Gemma3Model.set_gguf_parameters (gemma.py): TextModel's keys, then its own (replacing
    some with the same values); no sliding window pattern, no query_pre_attn_scalar."""
    _text_model(w, hp, rope)
    again = {
        "context_length": lambda: w.add_context_length(hp.get("max_position_embeddings", 131072)),
        "attention.head_count": lambda: w.add_head_count(hp.get("num_attention_heads", 8)),
        "attention.layer_norm_rms_epsilon":
            lambda: w.add_layer_norm_rms_eps(hp.get("rms_norm_eps", 1e-6)),
        "attention.key_length": lambda: w.add_key_length(hp.get("head_dim", 256)),
        "attention.value_length": lambda: w.add_value_length(hp.get("head_dim", 256)),
        "rope.freq_base": lambda: w.add_rope_freq_base(
            rope.get("full_attention", rope).get("rope_theta", 1_000_000.0)),
        "attention.head_count_kv": lambda: w.add_head_count_kv(hp.get("num_key_value_heads", 4)),
    }
    for key, add in again.items():  # the converter overwrites (with a warning); we replace
        w.kv_data[0].pop(f"gemma3.{key}", None)
        add()
    assert hp.get("attn_logit_softcapping") is None
    if hp.get("final_logit_softcapping"):
        w.add_final_logit_softcapping(hp["final_logit_softcapping"])
    if hp.get("sliding_window_pattern") != 1:
        w.add_sliding_window(hp["sliding_window"])


def _phi3(w: gguf.GGUFWriter, hp: dict, rope: dict) -> None:
    """Phi3MiniModel.set_gguf_parameters (phi.py): rotary dims from partial_rotary_factor,
    the original context always, sliding_window 0 for none; no RoPE scaling type or factor
    (it does not call TextModel's). LongRoPE's factors and attn_factor come with the tensors
    (gguf_twins.generated_tensors)."""
    n_embd, n_head = hp["hidden_size"], hp["num_attention_heads"]
    rot_pct = rope.get("partial_rotary_factor", 1.0)
    w.add_context_length(hp["max_position_embeddings"])
    w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(hp["intermediate_size"])
    w.add_block_count(hp["num_hidden_layers"])
    w.add_head_count(n_head)
    w.add_head_count_kv(hp["num_key_value_heads"])
    w.add_layer_norm_rms_eps(hp["rms_norm_eps"])
    w.add_rope_dimension_count(int(rot_pct * n_embd) // n_head)
    w.add_rope_freq_base(rope.get("full_attention", rope)["rope_theta"])
    w.add_sliding_window(hp.get("sliding_window") or 0)


PARAMETERS = {"llama": _llama, "qwen2": _text_model, "qwen3": _text_model,
              "qwen3moe": _qwen2moe, "gemma2": _gemma2, "gemma3": _gemma3, "phi3": _phi3}
