"""Tiny random checkpoints of every decoder family we serve, written by transformers itself.

Each case is an HF model type plus config overrides, sized so that every feature bites on
prompts of a few dozen to ~150 tokens: sliding windows of 12-20 tokens, RoPE scaling with
32-64 "original" positions, head_dim != hidden / heads, GQA, softcaps small enough to clip.

HF's own init (std 0.02, unit norms, zero biases) gives near-uniform logits, so greedy choices
would be coin flips, and its gemma norm weights are 0, so w and (1 + w) would agree.
`randomise` instead draws unit-scale projections, norm gains far from 1 (gemma's offsets far
from 0) and non-zero biases: the top-2 logit gap is under 0.01 on 0-3% of steps, generations
do not collapse into repeating one token, and every layer stays finite. FEATURE_OFF lists, per
case, config changes that switch a feature off; a test checks each one changes HF's tokens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tokenpool.models.synth import smollm2_tokenizer

VOCAB = 49152  # SmolLM2's tokenizer
SMALL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
             tie_word_embeddings=False)
# What each family adds to SMALL, with every feature of the family switched on.
FAMILIES: dict[str, tuple[str, dict]] = {
    "llama": ("Llama", {}),
    "mistral": ("Mistral", dict(sliding_window=16)),
    "qwen2": ("Qwen2", dict(tie_word_embeddings=True)),
    "qwen3": ("Qwen3", dict(head_dim=32)),
    "gemma2": ("Gemma2", dict(
        head_dim=32, query_pre_attn_scalar=24, sliding_window=16, num_hidden_layers=4,
        attn_logit_softcapping=3.0, final_logit_softcapping=10.0, tie_word_embeddings=True)),
    "gemma3_text": ("Gemma3", dict(
        head_dim=32, query_pre_attn_scalar=24, sliding_window=16, num_hidden_layers=4,
        sliding_window_pattern=3, tie_word_embeddings=True,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "default", "rope_theta": 1e6}})),
    "phi3": ("Phi3", {}),
    # Layer 1 keeps a dense MLP (mlp_only_layers), the others route to 2 of 8 experts.
    "mixtral": ("Mixtral", dict(num_local_experts=8, num_experts_per_tok=2, sliding_window=16)),
    "qwen3_moe": ("Qwen3Moe", dict(head_dim=32, num_experts=8, num_experts_per_tok=2,
                                   moe_intermediate_size=48, mlp_only_layers=[1])),
}


@dataclass(frozen=True, slots=True)
class Case:
    model_type: str
    config: dict = field(default_factory=dict)
    # False where recomputing a preempted sequence legitimately differs from HF's cache.
    recompute_exact: bool = True


def _rope(kind: str, **params) -> dict:
    return {"rope_parameters": {"rope_type": kind, "rope_theta": 10000.0, **params}}


CASES: dict[str, Case] = {
    "llama": Case("llama"),
    "llama-llama3": Case("llama", _rope("llama3", factor=8.0, low_freq_factor=1.0,
                                        high_freq_factor=4.0, original_max_position_embeddings=32)),
    "llama-yarn": Case("llama", _rope("yarn", factor=4.0, original_max_position_embeddings=64)),
    # Dynamic NTK only changes past max_position_embeddings: keep that short.
    "llama-dynamic": Case("llama", {**_rope("dynamic", factor=4.0), "max_position_embeddings": 48},
                          recompute_exact=False),
    "llama-linear": Case("llama", _rope("linear", factor=4.0)),
    "mistral": Case("mistral"),
    "qwen2": Case("qwen2"),
    # Layer 0 full, layers 1-2 sliding: Qwen2 slides only from max_window_layers on.
    "qwen2-sliding": Case("qwen2", dict(use_sliding_window=True, sliding_window=12,
                                        max_window_layers=1)),
    "qwen3": Case("qwen3"),
    "gemma2": Case("gemma2"),
    "gemma3": Case("gemma3_text"),
    "phi3": Case("phi3", dict(sliding_window=20)),  # as Phi-3-mini-4k's 2047: every layer
    "phi3-partial-rotary": Case("phi3", dict(partial_rotary_factor=0.75)),
    # Phi-3.5's LongRoPE: short factors up to 32 positions, long ones past them (transformers
    # lets the top-level original_max_position_embeddings win, so it is set there).
    "phi3-longrope": Case("phi3", {**_rope(
        "longrope", short_factor=[1.0 + 0.1 * i for i in range(8)],
        long_factor=[1.0 + 2.0 * i for i in range(8)], original_max_position_embeddings=32),
        "original_max_position_embeddings": 32}, recompute_exact=False),
    "mixtral": Case("mixtral"),
    "qwen3-moe": Case("qwen3_moe"),
    "qwen3-moe-norm-topk": Case("qwen3_moe", dict(norm_topk_prob=True)),
}


_DEFAULT_ROPE = {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}
_GEMMA3_ONE_BASE = {"rope_parameters": {
    kind: {"rope_type": "default", "rope_theta": 1e6}
    for kind in ("sliding_attention", "full_attention")}}
# Config changes that switch one feature of a case off (same weights): each must change HF's
# greedy tokens, or the sizes above do not make that feature matter.
FEATURE_OFF: dict[str, dict[str, dict]] = {
    "llama-llama3": {"rope scaling": _DEFAULT_ROPE},
    "llama-yarn": {"rope scaling": _DEFAULT_ROPE},
    "llama-dynamic": {"rope scaling": _DEFAULT_ROPE},
    "llama-linear": {"rope scaling": _DEFAULT_ROPE},
    "mistral": {"sliding window": {"sliding_window": None}},
    "qwen2-sliding": {"sliding window": {"use_sliding_window": False}},
    "gemma2": {"sliding window": {"sliding_window": 4096},
               "attention softcap": {"attn_logit_softcapping": None},
               "query_pre_attn_scalar": {"query_pre_attn_scalar": 32}},
    "gemma3": {"sliding window": {"sliding_window": 4096},
               "local rope base": _GEMMA3_ONE_BASE,
               "query_pre_attn_scalar": {"query_pre_attn_scalar": 32}},
    "phi3": {"sliding window": {"sliding_window": None}},
    "phi3-partial-rotary": {"partial rotary": {"partial_rotary_factor": 1.0}},
}


def hf_config(model_type: str, **overrides):
    """The transformers config of a tiny `model_type` model (overrides win)."""
    import transformers

    prefix, extra = FAMILIES[model_type]
    tok = smollm2_tokenizer()
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_ids[0],
               pad_token_id=tok.eos_token_ids[0])
    cls = getattr(transformers, f"{prefix}TextConfig" if prefix == "Gemma3" else f"{prefix}Config")
    return cls(**{**SMALL, **ids, **extra, **overrides})


def build_model(model_type: str, seed: int = 0, **overrides):
    """A float32 random model of `model_type` with `randomise`d weights, in eval mode."""
    import transformers

    prefix, _ = FAMILIES[model_type]
    config = hf_config(model_type, **overrides)
    torch.manual_seed(seed)
    model = getattr(transformers, f"{prefix}ForCausalLM")(config).float().eval()
    gemma = model_type.startswith("gemma")
    # Gemma scales its input embeddings by sqrt(hidden) = 8: half the std keeps them small.
    randomise(model, offset_norms=gemma, seed=seed, embed_std=0.0625 if gemma else 0.125)
    return model


@torch.no_grad()
def randomise(model, *, offset_norms: bool, seed: int, embed_std: float, gain: float = 4.0,
              head_gain: float = 4.0, bias_std: float = 0.25) -> None:
    """Unit-scale activations, norms far from identity, non-zero biases (see module doc).

    `gain` scales what each sublayer writes to the residual stream (o_proj and down_proj, or
    gemma's post-norms) and `head_gain` the final norm, so logits spread widely. With tied
    embeddings small embeddings plus a large `gain` matter most: otherwise the token just
    written dominates the residual and models repeat it forever. `offset_norms`: gemma's
    norms scale by (1 + w)."""
    g = torch.Generator().manual_seed(seed)
    hidden = model.config.hidden_size

    def uniform(shape, lo, hi):
        return lo + (hi - lo) * torch.rand(shape, generator=g)

    for name, p in model.named_parameters():  # tied lm_head is the embedding: listed once
        if "norm" in name:  # RMSNorm gains, q/k norms included
            gain_here = gain if ".post_" in name and offset_norms else \
                head_gain if name == "model.norm.weight" else 1.0
            centre = gain_here - 1.0 if offset_norms else gain_here
            p.copy_(uniform(p.shape, centre - 0.5, centre + 0.5))
        elif name.endswith(".bias"):
            p.copy_(torch.randn(p.shape, generator=g) * bias_std)
        elif name.endswith("embed_tokens.weight"):
            p.copy_(torch.randn(p.shape, generator=g) * embed_std)
        elif name == "lm_head.weight":
            p.copy_(torch.randn(p.shape, generator=g) * (4 / hidden ** 0.5))
        elif p.dim() == 3:  # a mixture's experts, stacked: [experts, out, in]
            scale = gain if name.endswith("down_proj") else 1.0
            p.copy_(torch.randn(p.shape, generator=g) * scale / p.shape[-1] ** 0.5)
        else:  # projections: variance-preserving, those writing to the residual by `gain`
            scale = gain if name.endswith(("o_proj.weight", "down_proj.weight")) else 1.0
            p.copy_(torch.randn(p.shape, generator=g) * scale / p.shape[1] ** 0.5)


def write_case(name: str, out_dir: str | Path, seed: int = 0) -> Path:
    """Save case `name` with save_pretrained (safetensors) plus SmolLM2's tokenizer."""
    case = CASES[name]
    out = Path(out_dir)
    model = build_model(case.model_type, seed=seed, **case.config)
    model.save_pretrained(out)
    smollm2_tokenizer().save_pretrained(out)
    return out


def edit_config(src: Path, dst: Path, **changes) -> Path:
    """A copy of checkpoint `src` at `dst` whose config.json has `changes` applied
    (weights are linked, not copied)."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.name != "config.json":
            (dst / f.name).symlink_to(f.resolve())
    config = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**config, **changes}, indent=2))
    return dst


def load_hf(path: Path):
    """transformers' own load of a written case: the reference (eager attention, float32)."""
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager").eval()


def reset_dynamic_rope(model) -> None:
    """Forget the state HF's dynamic RoPE keeps across calls, so each sequence starts afresh.

    It recomputes frequencies only when a call reaches past the longest length seen so far,
    and resets only on a call shorter than max_position_embeddings: a 61-token prompt after a
    150-token sequence would otherwise run with the 150-token frequencies."""
    for module in model.modules():
        if hasattr(module, "original_inv_freq") and hasattr(module, "max_seq_len_cached"):
            module.inv_freq = module.original_inv_freq.clone()
            module.max_seq_len_cached = module.original_max_seq_len
