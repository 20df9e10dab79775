"""The decoder families the engine serves, as data: one row per HF `model_type`.

Every family is the same pre-norm decoder (DESIGN §5); they differ only in the flags below,
in how config.json spells a few keys, and in the names of their tensors. Adding a family is
one `Family(...)` row here and one case in tests/test_families_vs_hf.py.

A layer's weights are named by *role* (`qkv`, `mlp_norm`, ...); a role is packed from one or
more HF tensors concatenated along rows (q, k and v become one `qkv`), so a family whose
checkpoint fuses them already (Phi-3) just lists one source.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Role -> the HF tensors (below `model.layers.{i}.`) concatenated to make it, Llama's names.
LLAMA_SOURCES: dict[str, tuple[str, ...]] = {
    "attn_norm": ("input_layernorm.weight",),
    "qkv": tuple(f"self_attn.{x}_proj.weight" for x in "qkv"),
    "qkv_bias": tuple(f"self_attn.{x}_proj.bias" for x in "qkv"),
    "q_norm": ("self_attn.q_norm.weight",),
    "k_norm": ("self_attn.k_norm.weight",),
    "o": ("self_attn.o_proj.weight",),
    "o_bias": ("self_attn.o_proj.bias",),
    "attn_out_norm": ("post_attention_layernorm.weight",),
    "mlp_norm": ("post_attention_layernorm.weight",),
    "gate_up": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
    "down": ("mlp.down_proj.weight",),
    "mlp_out_norm": ("post_feedforward_layernorm.weight",),
}
GEMMA_SOURCES = {"mlp_norm": ("pre_feedforward_layernorm.weight",)}
PHI3_SOURCES = {"qkv": ("self_attn.qkv_proj.weight",), "gate_up": ("mlp.gate_up_proj.weight",)}
# Mixture-of-experts MLPs: `{e}` stands for each expert in turn (tensor_layout.py).
MIXTRAL_SOURCES = {
    "router": ("block_sparse_moe.gate.weight",),
    "experts_gate_up": ("block_sparse_moe.experts.{e}.w1.weight",
                        "block_sparse_moe.experts.{e}.w3.weight"),
    "experts_down": ("block_sparse_moe.experts.{e}.w2.weight",),
}
QWEN_MOE_SOURCES = {
    "router": ("mlp.gate.weight",),
    "experts_gate_up": ("mlp.experts.{e}.gate_proj.weight", "mlp.experts.{e}.up_proj.weight"),
    "experts_down": ("mlp.experts.{e}.down_proj.weight",),
}

# config.json's activation names -> the function the engine applies.
ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh",
               "gelu_new": "gelu_tanh", "gelu": "gelu"}


def _no_sliding(raw: dict, n: int) -> tuple[str, ...]:
    return ()


def _all_sliding(raw: dict, n: int) -> tuple[str, ...]:
    return ("sliding_attention",) * n if raw.get("sliding_window") else ()


def _qwen_sliding(raw: dict, n: int) -> tuple[str, ...]:
    if not (raw.get("use_sliding_window") and raw.get("sliding_window")):
        return ()
    first = raw.get("max_window_layers", 28)
    return tuple("sliding_attention" if i >= first else "full_attention" for i in range(n))


def _every_nth_full(default_period: int):
    def layer_types(raw: dict, n: int) -> tuple[str, ...]:
        period = raw.get("sliding_window_pattern") or raw.get("_sliding_window_pattern") \
            or default_period
        return tuple("sliding_attention" if (i + 1) % period else "full_attention"
                     for i in range(n))
    return layer_types


@dataclass(frozen=True)
class Family:
    model_type: str
    architecture: str  # config.json's `architectures` entry when we write one
    gguf_arch: str  # llama.cpp's `general.architecture`
    sources: dict[str, tuple[str, ...]] = field(default_factory=dict)  # over LLAMA_SOURCES
    act_key: str = "hidden_act"
    qkv_bias: bool | None = None  # None: `attention_bias` decides for q, k, v and o alike
    qk_norm: bool = False  # RMSNorm over each head of q and k before RoPE
    gemma_norms: bool = False  # (1 + w) norms in float32, sandwich norms, sqrt(hidden) embeddings
    soft_caps: bool = False  # reads attn/final logit soft-capping and query_pre_attn_scalar
    local_rope: bool = False  # sliding layers have their own RoPE base
    moe: bool = False  # reads num_experts & co.: some or all MLPs are mixtures of experts
    # sliding layers only with `use_sliding_window: true` (Qwen), even where config.json
    # lists layer_types
    sliding_opt_in: bool = False
    sliding_layers: object = _no_sliding  # layer types when config.json does not list them
    # config.json keys transformers' config class defaults when a file omits them
    defaults: dict = field(default_factory=dict)
    # config.json keys a synthetic checkpoint of the family sets (`tokenpool fleet synth`)
    synth: dict = field(default_factory=dict)

    def layer_sources(self) -> dict[str, tuple[str, ...]]:
        return {**LLAMA_SOURCES, **self.sources}


_GEMMA_SYNTH = {"hidden_activation": "gelu_pytorch_tanh", "sliding_window": 512}
_GEMMA_DEFAULTS = {"head_dim": 256, "query_pre_attn_scalar": 256, "sliding_window": 4096,
                   "tie_word_embeddings": True, "hidden_activation": "gelu_pytorch_tanh"}
# What every family's config class defaults alike.
COMMON_DEFAULTS = {"rms_norm_eps": 1e-6, "tie_word_embeddings": False}

FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family("llama", "LlamaForCausalLM", "llama", synth={"rope_theta": 100000.0},
           defaults={"max_position_embeddings": 2048}),
    Family("mistral", "MistralForCausalLM", "llama", sliding_layers=_all_sliding,
           synth={"rope_theta": 1e6, "sliding_window": 512},
           defaults={"sliding_window": 4096, "max_position_embeddings": 131072}),
    Family("qwen2", "Qwen2ForCausalLM", "qwen2", qkv_bias=True, sliding_opt_in=True,
           sliding_layers=_qwen_sliding, synth={"rope_theta": 1e6},
           defaults={"max_position_embeddings": 32768}),
    Family("qwen3", "Qwen3ForCausalLM", "qwen3", qk_norm=True, sliding_opt_in=True,
           sliding_layers=_qwen_sliding, synth={"rope_theta": 1e6},
           defaults={"head_dim": 128, "max_position_embeddings": 32768}),
    Family("gemma2", "Gemma2ForCausalLM", "gemma2", GEMMA_SOURCES, "hidden_activation",
           gemma_norms=True, soft_caps=True, sliding_layers=_every_nth_full(2),
           synth={**_GEMMA_SYNTH, "attn_logit_softcapping": 50.0,
                  "final_logit_softcapping": 30.0},
           defaults={**_GEMMA_DEFAULTS, "attn_logit_softcapping": 50.0,
                     "final_logit_softcapping": 30.0, "max_position_embeddings": 8192}),
    Family("gemma3_text", "Gemma3ForCausalLM", "gemma3", GEMMA_SOURCES, "hidden_activation",
           qk_norm=True, gemma_norms=True, soft_caps=True, local_rope=True,
           sliding_layers=_every_nth_full(6),
           synth={**_GEMMA_SYNTH, "rope_theta": 1e6, "rope_local_base_freq": 10000.0,
                  "sliding_window_pattern": 2},
           defaults={**_GEMMA_DEFAULTS, "rope_theta": 1e6, "rope_local_base_freq": 10000.0,
                     "max_position_embeddings": 131072}),
    Family("phi3", "Phi3ForCausalLM", "phi3", PHI3_SOURCES, sliding_layers=_all_sliding,
           defaults={"rms_norm_eps": 1e-5, "max_position_embeddings": 4096}),
    Family("qwen3_moe", "Qwen3MoeForCausalLM", "qwen3moe", QWEN_MOE_SOURCES, qk_norm=True,
           moe=True, sliding_opt_in=True, sliding_layers=_qwen_sliding,
           synth={"rope_theta": 1e6, "num_experts": 8, "num_experts_per_tok": 2},
           defaults={"max_position_embeddings": 32768, "moe_intermediate_size": 768}),
    # Every layer routes, renormalised, to experts as wide as intermediate_size.
    Family("mixtral", "MixtralForCausalLM", "llama", MIXTRAL_SOURCES, moe=True,
           sliding_layers=_all_sliding, synth={"rope_theta": 1e6, "num_local_experts": 8},
           defaults={"max_position_embeddings": 131072, "num_experts_per_tok": 2,
                     "norm_topk_prob": True}),
)}
