"""What llama.cpp's `convert_hf_to_gguf.py` writes for each decoder family we serve, as data.

One `GGUFArch` row per `general.architecture`: the family it holds, how its tensors are named
and transformed on the way in, and what llama.cpp assumes because the file does not say it;
and RoPE parameters back from the tensors the converter computes: llama3's `rope_freqs`,
Phi-3 LongRoPE's `rope_factors_long` / `rope_factors_short`.
Conventions checked against llama.cpp's converter (conversion/base.py, llama.py, qwen.py,
gemma.py, phi.py, formerly one convert_hf_to_gguf.py), gguf-py's tensor_mapping.py and the
hparam loaders in src/llama-model.cpp (src/models/qwen3moe.cpp for qwen3moe, phi3.cpp for
phi3).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tokenpool.errors import CheckpointError
from tokenpool.models.rope import inv_freq, rope_spec_from_hf

# llama.cpp tensor names -> HF names (what gguf-py's TensorNameMap maps them from).
GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_qkv": "self_attn.qkv_proj",  # Phi-3's fused q, k, v
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Gemma's sandwich norms: `ffn_norm` is the *pre*-feed-forward norm there (FFN_PRE_NORM).
GEMMA_NAMES = {
    "ffn_norm": "pre_feedforward_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
# Phi-3's gate_up_proj maps to FFN_UP whole: `ffn_up` holds gate and up, gate first.
PHI3_NAMES = {"ffn_up": "mlp.gate_up_proj"}
# Qwen3-MoE's router, and its experts as Qwen2MoeModel.modify_tensors stacks them: one
# [experts, out, in] tensor per projection and layer. `{e}`: the tensor is split per expert.
MOE_NAMES = {
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_exps": "mlp.experts.{e}.gate_proj",
    "ffn_up_exps": "mlp.experts.{e}.up_proj",
    "ffn_down_exps": "mlp.experts.{e}.down_proj",
}
DENSE_FFN = ("ffn_gate", "ffn_up", "ffn_down")

# Tensors that carry RoPE, not weights: read into the config, or refused.
ROPE_FREQS = "rope_freqs.weight"  # llama3 frequency factors (LlamaModel.generate_extra_tensors)
# Phi-3 LongRoPE's per-frequency divisors (Phi3MiniModel.generate_extra_tensors), F32.
LONGROPE_LONG, LONGROPE_SHORT = LONGROPE = ("rope_factors_long.weight",
                                            "rope_factors_short.weight")

_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


@dataclass(frozen=True)
class GGUFArch:
    name: str  # general.architecture
    model_type: str  # the family it loads as (families.py)
    names: dict[str, str] = field(default_factory=dict)  # over LAYER_NAMES
    # Only LlamaModel.modify_tensors permutes Q/K rows (for llama.cpp's interleaved RoPE);
    # every other family here uses NEOX RoPE, as HF does, and is written unpermuted.
    permuted_qk: bool = False
    # GemmaModel/Gemma2Model/Gemma3Model.modify_tensors store `norm.weight + 1` for every
    # tensor whose name ends in norm.weight; llama.cpp then scales by w, HF by (1 + w).
    norm_offset: float = 0.0
    # Not stored in GGUF: the activation llama.cpp's graph for the arch hard-codes
    # (LLM_FFN_SILU, or LLM_FFN_GELU, the tanh approximation, for Gemma) under config.json's key.
    act: tuple[str, str] = ("hidden_act", "silu")
    # Reads `{arch}.attention.sliding_window` at all (llama.cpp's llama and qwen2/3 loaders
    # ignore it, and their converters never write it).
    sliding: bool = False
    soft_caps: bool = False
    # query_pre_attn_scalar is not stored: llama.cpp's gemma2/gemma3 loaders scale queries by
    # n_embd / n_head for the 27B (recognised by its layer count) and by head_dim otherwise.
    big_layers: int | None = None
    local_rope: bool = False  # sliding layers' base in {arch}.rope.freq_base_swa (Gemma 3)
    # Every layer's MLP is experts (MOE_NAMES): llama.cpp's qwen3moe loads no dense MLP, so
    # the converter cannot map mlp_only_layers (nor decoder_sparse_step > 1). Its graph always
    # renormalises the chosen experts' weights (build_moe_ffn's norm_w is hard-coded true):
    # norm_topk_prob is neither written nor read.
    moe: bool = False
    # Loads LONGROPE's factor tensors (llama.cpp's phi3 does; its llama, qwen and gemma
    # loaders do not).
    longrope: bool = False

    def hf_name(self, gguf_name: str, path: str | Path = "") -> str | None:
        """The HF name of a tensor (with `{e}` for stacked experts), or None for one the
        config consumes (rope_freqs, LongRoPE's factors)."""
        if gguf_name in GLOBAL_NAMES:
            return GLOBAL_NAMES[gguf_name]
        if gguf_name == ROPE_FREQS or (self.longrope and gguf_name in LONGROPE):
            return None
        if gguf_name in LONGROPE:
            raise CheckpointError(f"{path}: tensor {gguf_name!r} (LongRoPE scaling) is not "
                                  f"supported for {self.name} (llama.cpp's {self.name} does "
                                  "not load it)")
        m = _LAYER_RE.fullmatch(gguf_name)
        names = {k: v for k, v in LAYER_NAMES.items() if not (self.moe and k in DENSE_FFN)}
        names |= self.names
        if m is None or m.group(2) not in names:
            raise CheckpointError(f"{path}: tensor {gguf_name!r} has no {self.model_type} "
                                  f"equivalent (not a plain {self.name} checkpoint?)")
        return f"model.layers.{m.group(1)}.{names[m.group(2)]}.{m.group(3)}"


_GEMMA = dict(names=GEMMA_NAMES, norm_offset=1.0, act=("hidden_activation", "gelu_pytorch_tanh"),
              sliding=True, soft_caps=True)

# Mistral's converter is LlamaModel: its files say `llama` and load as the llama family
# (LlamaModel writes no sliding window, and llama.cpp's llama graph has none).
ARCHS: dict[str, GGUFArch] = {a.name: a for a in (
    GGUFArch("llama", "llama", permuted_qk=True),
    GGUFArch("qwen2", "qwen2"),
    GGUFArch("qwen3", "qwen3"),
    GGUFArch("qwen3moe", "qwen3_moe", MOE_NAMES, moe=True),
    GGUFArch("gemma2", "gemma2", big_layers=46, **_GEMMA),
    GGUFArch("gemma3", "gemma3_text", big_layers=62, local_rope=True, **_GEMMA),
    # Phi3MiniModel writes sliding_window (0 for none). llama.cpp currently switches Phi-3's
    # window off ("Phi SWA is currently disabled", llama.cpp#13676); we follow the window the
    # file records, as the HF config it came from does.
    GGUFArch("phi3", "phi3", PHI3_NAMES, sliding=True, longrope=True),
)}


def gguf_arch(metadata: dict, path: str | Path = "") -> GGUFArch:
    name = metadata.get("general.architecture")
    if name not in ARCHS:
        raise CheckpointError(f"{path}: general.architecture {name!r} is not supported "
                              f"(supported: {', '.join(ARCHS)})")
    return ARCHS[name]


def llama3_from_rope_freqs(factors: torch.Tensor, theta: float, head_dim: int, fraction: float,
                           max_pos: int, where) -> dict[str, Any]:
    """llama3 rope_parameters that reproduce llama.cpp's `rope_freqs` frequency factors.

    The converter stores, per frequency, 1 (high band), `factor` (low band) or the smoothed
    divisor between; the bands depend only on original_max_position_embeddings over the
    low/high frequency factors. Taking Llama 3's (and the converter's default) factors 1 and
    4, each smoothed frequency gives the original context back; failing that (no smoothed
    frequency) the converter's default 8192 and powers of two are tried. Whatever is chosen
    must reproduce every factor, or the file is refused.
    """
    base = {"rope_type": "default", "rope_theta": theta}
    spec = rope_spec_from_hf(base, theta, fraction, max_pos, where)
    freq = inv_freq(spec, head_dim, max_pos)[0].double()
    f = factors.double().flatten()
    if f.shape != freq.shape:
        raise CheckpointError(f"{where}: {ROPE_FREQS} has {f.numel()} entries for "
                              f"{freq.numel()} rotary frequencies")
    target = freq.float() / factors.float().flatten()
    factor = float(f.max())
    if factor <= 1.0 + 1e-6:
        return base  # every factor 1: no scaling at all
    medium = (f > 1.0 + 1e-6) & (f < factor * (1.0 - 1e-6))
    smooth = (1.0 / f[medium] - 1.0 / factor) / (1.0 - 1.0 / factor)
    wavelen = 2 * math.pi / freq[medium]
    guesses = [round(float((wavelen * (3.0 * smooth + 1.0)).mean()))] if medium.any() else []
    for original in (*guesses, 8192, *(2 ** k for k in range(4, 25))):
        params = {**base, "rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": original}
        ours = inv_freq(rope_spec_from_hf(params, theta, fraction, max_pos, where), head_dim,
                        max_pos)[0]
        if torch.allclose(ours, target, rtol=1e-5, atol=0.0):
            return params
    raise CheckpointError(f"{where}: {ROPE_FREQS} is not llama3 RoPE scaling with "
                          "low_freq_factor 1 and high_freq_factor 4: not supported")


def longrope_from_factors(factors: dict[str, torch.Tensor], attn_factor: float, theta: float,
                          rotary: int, original: int, max_pos: int, where) -> dict[str, Any]:
    """transformers' longrope rope_parameters from what Phi3MiniModel writes: the two factor
    tensors (GGUF name -> values, float32, one per rotary frequency) and
    `rope.scaling.attn_factor`.

    The factors are the float32 values exactly (Phi-3 configs list float32 values, and
    transformers computes with float32 factors). `factor` is left out: transformers then takes
    max_position_embeddings / original_max_position_embeddings, as Phi-3's configs (which
    have none) mean. The converter stores as attn_factor the default transformers derives
    from that ratio (never the config's own attention_factor); stored so, it is left out as
    the HF config leaves it out. Any other value (llama.cpp's 1.0 when the key is absent) is
    kept: llama.cpp scales cos and sin by it, as transformers does by attention_factor.
    """
    params = {"rope_type": "longrope", "rope_theta": theta,
              "original_max_position_embeddings": original}
    for name, key in ((LONGROPE_SHORT, "short_factor"), (LONGROPE_LONG, "long_factor")):
        if name not in factors:
            raise CheckpointError(f"{where}: tensor {name!r} is missing: LongRoPE needs both "
                                  f"{LONGROPE_LONG} and {LONGROPE_SHORT}")
        if tuple(factors[name].shape) != (rotary // 2,):
            raise CheckpointError(f"{where}: tensor {name!r} has shape "
                                  f"{list(factors[name].shape)}, not one factor per rotary "
                                  f"frequency ([{rotary // 2}])")
        params[key] = factors[name].double().tolist()
    scale = max_pos / original
    default = math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1.0 else 1.0
    if np.float32(attn_factor) != np.float32(default):
        params["attention_factor"] = attn_factor
    return params
