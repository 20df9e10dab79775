"""Architecture of a decoder checkpoint, independent of where it was read from.

One description for every family (models/families.py): the fields past `eos_token_ids` are
the data families differ in. `from_hf_dict` reads config.json as transformers 4 and 5 write
it, and refuses what the engine would compute wrong, naming the key.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tokenpool.errors import CheckpointError
from tokenpool.models.families import ACTIVATIONS, COMMON_DEFAULTS, FAMILIES, Family
from tokenpool.models.rope import RopeSpec, rope_spec_from_hf

SLIDING = "sliding_attention"
FULL = "full_attention"


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """Field names follow HF's configs so config.json maps one to one."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    model_type: str = "llama"
    hidden_act: str = "silu"  # the engine's name: silu, gelu_tanh or gelu
    rope: RopeSpec = field(default_factory=RopeSpec)
    local_rope: RopeSpec | None = None  # sliding layers' RoPE where it differs (Gemma 3)
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False
    gemma_norms: bool = False
    query_pre_attn_scalar: float | None = None
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()  # per layer SLIDING or FULL; empty: all full
    num_experts: int = 0  # mixture of experts (Qwen3-MoE): experts per MoE layer
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False  # renormalise the chosen experts' weights to sum to 1
    moe_layers: tuple[int, ...] = ()  # the layers whose MLP is a mixture of experts

    def __post_init__(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})")
        if self.layer_types and len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries for "
                             f"{self.num_hidden_layers} layers")

    @property
    def family(self) -> Family:
        return FAMILIES[self.model_type]

    @property
    def attn_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @property
    def context_length(self) -> int:
        """Positions the model takes: scaled RoPE stretches max_position_embeddings by its
        factor (yarn's original length), except llama3's, whose configs state the stretched
        length: as vLLM reads them."""
        if self.rope.kind == "yarn":
            return int(self.rope.original_max_position_embeddings * self.rope.factor)
        if self.rope.kind in ("linear", "dynamic"):
            return int(self.max_position_embeddings * self.rope.factor)
        return self.max_position_embeddings

    def is_sliding(self, layer: int) -> bool:
        return bool(self.layer_types) and self.layer_types[layer] == SLIDING

    def window_of(self, layer: int) -> int | None:
        return self.sliding_window if self.is_sliding(layer) else None

    def is_moe(self, layer: int) -> bool:
        return layer in self.moe_layers

    def rope_of(self, layer: int) -> RopeSpec:
        return self.local_rope if self.local_rope and self.is_sliding(layer) else self.rope

    @classmethod
    def from_hf_dict(cls, d: dict, where: str = "config.json") -> "ModelConfig":
        family = _family(d, where)
        d = {**COMMON_DEFAULTS, **family.defaults, **d}  # the file's keys win, nulls included
        heads = d["num_attention_heads"]
        layers = d["num_hidden_layers"]
        head_dim = d.get("head_dim") or d["hidden_size"] // heads
        eos = d.get("eos_token_id")
        bias = bool(d.get("attention_bias", False))
        layer_types = _layer_types(d, family, layers, where)
        soft = family.soft_caps
        return cls(
            vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"], num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=d.get("num_key_value_heads") or heads,
            head_dim=head_dim, rms_norm_eps=float(d["rms_norm_eps"]),
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(d["tie_word_embeddings"]),
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=tuple(eos) if isinstance(eos, (list, tuple))
            else (() if eos is None else (eos,)),
            model_type=family.model_type, hidden_act=_activation(d, family, where),
            rope=_rope(d, FULL, where), local_rope=_rope(d, SLIDING, where)
            if family.local_rope else None,
            qkv_bias=bias if family.qkv_bias is None else family.qkv_bias,
            o_bias=bias if family.qkv_bias is None else False,
            qk_norm=family.qk_norm, gemma_norms=family.gemma_norms,
            query_pre_attn_scalar=d.get("query_pre_attn_scalar") if soft else None,
            attn_logit_softcapping=d.get("attn_logit_softcapping") if soft else None,
            final_logit_softcapping=d.get("final_logit_softcapping") if soft else None,
            sliding_window=d.get("sliding_window") if SLIDING in layer_types else None,
            layer_types=layer_types if SLIDING in layer_types else (),
            **(_experts(d, layers) if family.moe else {}),
        )


def _family(d: dict, where: str) -> Family:
    model_type = d.get("model_type")
    if model_type not in FAMILIES:
        hint = " (Gemma 3's multimodal checkpoints: serve the text model, model_type " \
               "'gemma3_text')" if model_type == "gemma3" else ""
        raise CheckpointError(f"{where}: model_type {model_type!r} is not supported "
                              f"(supported: {', '.join(FAMILIES)}){hint}")
    if d.get("quantization_config"):
        method = d["quantization_config"].get("quant_method", "?")
        raise CheckpointError(f"{where}: quantization_config ({method}) is not supported: "
                              "serve unquantized weights")
    for key in ("mlp_bias", "use_bidirectional_attention"):
        if d.get(key):
            raise CheckpointError(f"{where}: {key}: true is not supported")
    return FAMILIES[model_type]


def _experts(d: dict, layers: int) -> dict:
    """The mixture-of-experts fields, and which layers have experts (as transformers picks
    them: every decoder_sparse_step-th layer not in mlp_only_layers)."""
    # transformers 5 writes num_local_experts where Qwen's own configs say num_experts
    experts = d["num_experts"] if "num_experts" in d else d["num_local_experts"]
    step = d.get("decoder_sparse_step") or 1
    dense = set(d.get("mlp_only_layers") or ())
    moe = tuple(i for i in range(layers)
                if experts > 0 and i not in dense and (i + 1) % step == 0)
    return {"num_experts": experts, "num_experts_per_tok": d["num_experts_per_tok"],
            # Mixtral's experts are intermediate_size wide; Qwen's have a size of their own
            "moe_intermediate_size": d.get("moe_intermediate_size") or d["intermediate_size"],
            "norm_topk_prob": bool(d.get("norm_topk_prob", False)), "moe_layers": moe}


def _activation(d: dict, family: Family, where: str) -> str:
    key = family.act_key if family.act_key in d else "hidden_act"
    name = d.get(key, "silu")
    if name not in ACTIVATIONS:
        raise CheckpointError(f"{where}: {key} {name!r} is not supported "
                              f"(supported: {', '.join(ACTIVATIONS)})")
    return ACTIVATIONS[name]


def _layer_types(d: dict, family: Family, layers: int, where: str) -> tuple[str, ...]:
    if d.get("layer_types"):
        types = tuple(d["layer_types"])
        unknown = set(types) - {SLIDING, FULL}
        if unknown:
            raise CheckpointError(f"{where}: layer_types {sorted(unknown)} are not supported")
        if family.sliding_opt_in and not d.get("use_sliding_window"):
            return ()  # transformers lists sliding layers only when the window is on
    else:
        types = family.sliding_layers(d, layers)
    if SLIDING in types and not d.get("sliding_window"):
        return ()
    return types


def _rope(d: dict, layer_type: str, where: str) -> RopeSpec:
    """The RoPE of one layer kind, from whichever of transformers' spellings the file uses."""
    params = d.get("rope_parameters") or d.get("rope_scaling") or {}
    theta = d.get("rope_theta") or 10000.0
    if layer_type in params or FULL in params:  # transformers 5: nested by layer type
        params = params.get(layer_type) or params.get(FULL) or {}
    elif layer_type == SLIDING:  # transformers 4's Gemma 3: a base, and no scaling, of its own
        params, theta = {}, d.get("rope_local_base_freq") or 10000.0
    original = d.get("original_max_position_embeddings")
    if original:  # Phi-3 states it at the top level, where it wins (as in transformers)
        params = {**params, "original_max_position_embeddings": original}
    return rope_spec_from_hf(params, theta, d.get("partial_rotary_factor") or 1.0,
                             d.get("max_position_embeddings", 2048), where)
