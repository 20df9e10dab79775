"""GGUF twins of the HF checkpoints tests/family_checkpoints.py writes, as llama.cpp writes them.

`write_twin(hf_dir, path)` mirrors what llama.cpp's converter (`convert_hf_to_gguf.py`, now
split into conversion/base.py, llama.py, qwen.py, gemma.py, phi.py) writes for the dir's
model: the class it registers for the architecture, its `set_gguf_parameters` keys,
`modify_tensors` transforms (Llama's Q/K row permutation, Gemma's `norm.weight + 1`),
`generate_extra_tensors` (llama3's rope_freqs), gguf-py's TensorNameMap names and
`prepare_tensors`' choice of types (1-d tensors and norms stay F32). Each function names the
converter code it follows. The tokenizer metadata is SmolLM2's GGUF's, whose tokenizer every
case shares.

It mirrors the converter; it is not the converter (llama.cpp is not a dependency here). These
twins test our reading of llama.cpp's conventions against that same reading, so checks on
real converter output remain the true test.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from safetensors import safe_open

from tokenpool.models.gguf_file import read_gguf
from tokenpool.models.locate import smollm2_gguf_path

# HF model_type -> `general.architecture` of the class the converter registers for it
# (LlamaModel takes MistralForCausalLM too).
ARCH_OF = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
           "gemma2": "gemma2", "gemma3_text": "gemma3", "phi3": "phi3"}
FILE_TYPES = {Q.F32: gguf.LlamaFileType.ALL_F32, Q.F16: gguf.LlamaFileType.MOSTLY_F16,
              Q.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0}


def write_twin(hf_dir: str | Path, path: str | Path, qtype: Q = Q.F32, *,
               extra_metadata: dict | None = None,
               extra_tensors: dict[str, np.ndarray] | None = None) -> Path:
    """Write the GGUF llama.cpp's converter makes of `hf_dir` with `--outtype` `qtype`.

    `extra_metadata` (key -> str, list, or (value, GGUFValueType)) replaces or adds keys after
    the converter's; `extra_tensors` adds F32 tensors: for files the converter would not write.
    """
    from transformers import AutoConfig

    hf_dir, path = Path(hf_dir), Path(path)
    hp = AutoConfig.from_pretrained(hf_dir).to_dict()  # ModelBase.load_hparams
    arch = ARCH_OF[hp["model_type"]]
    rope = _rope_parameters(hp)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(hf_dir.name)
    PARAMETERS[arch](w, hp, rope)
    w.add_file_type(FILE_TYPES[qtype])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _copy_tokenizer(w)
    for name, data in _converted_tensors(hf_dir, hp, rope, arch):
        _add_tensor(w, name, data, qtype)
    for name, data in (extra_tensors or {}).items():
        w.add_tensor(name, np.asarray(data, dtype=np.float32))
    for key, value in (extra_metadata or {}).items():
        w.kv_data[0].pop(key, None)
        if isinstance(value, str):
            w.add_string(key, value)
        elif isinstance(value, list):
            w.add_array(key, value)
        else:
            w.add_key_value(key, *value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# -- metadata ------------------------------------------------------------------------------

def _rope_parameters(hp: dict) -> dict:
    """TextModel.__init__ (base.py): rope_parameters, with rope_theta mirrored into it."""
    rope = dict(hp.get("rope_parameters", hp.get("rope_scaling")) or {})
    if "full_attention" not in rope and "sliding_attention" not in rope:
        local = hp.get("rope_local_base_freq")
        if local is not None:
            rope["sliding_attention"] = {"rope_theta": local}
        if "rope_theta" not in rope and hp.get("rope_theta") is not None:
            rope["rope_theta"] = hp["rope_theta"]
        if "rope_type" not in rope and rope.get("type") is not None:
            rope["rope_type"] = rope["type"]
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
    if hp.get("head_dim") is not None:
        w.add_key_length(hp["head_dim"])
        w.add_value_length(hp["head_dim"])


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
    sliding_window 0 for none."""
    n_embd, n_head = hp["hidden_size"], hp["num_attention_heads"]
    rot_pct = rope.get("partial_rotary_factor", hp.get("partial_rotary_factor", 1.0))
    w.add_context_length(hp["max_position_embeddings"])
    w.add_rope_scaling_orig_ctx_len(rope.get("original_max_position_embeddings",
                                             hp.get("original_max_position_embeddings")))
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
              "gemma2": _gemma2, "gemma3": _gemma3, "phi3": _phi3}


def _copy_tokenizer(w: gguf.GGUFWriter) -> None:
    """SmolLM2's tokenizer.* keys, with the types llama.cpp gives them."""
    for key, value in read_gguf(smollm2_gguf_path()).metadata.items():
        if not key.startswith("tokenizer."):
            continue
        if isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        elif isinstance(value, str):
            w.add_string(key, value)
        else:
            w.add_array(key, value)


# -- tensors -------------------------------------------------------------------------------

def _converted_tensors(hf_dir: Path, hp: dict, rope: dict, arch: str):
    """(GGUF name, float32 array) as prepare_tensors yields them: extra tensors first, then
    each checkpoint tensor through the arch's modify_tensors and gguf-py's TensorNameMap."""
    yield from generated_tensors(hp, rope, arch)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], hp["num_hidden_layers"])
    for file in sorted(hf_dir.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                if name.endswith((".attention.masked_bias", ".attention.bias",
                                  ".rotary_emb.inv_freq")):
                    continue
                data = _modify(f.get_tensor(name).float(), name, hp, arch, hf_dir)
                if data is None:
                    continue
                new_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
                if new_name is None:
                    raise ValueError(f"Can not map tensor {name!r}")
                yield new_name, data.numpy()


def _modify(data: torch.Tensor, name: str, hp: dict, arch: str, hf_dir: Path):
    if arch == "llama":  # LlamaModel.modify_tensors: undo_permute for llama.cpp's RoPE
        n_head, n_kv = hp["num_attention_heads"], hp["num_key_value_heads"]
        if name.endswith(("q_proj.weight", "q_proj.bias")):
            return _permute(data, n_head, n_head)
        if name.endswith(("k_proj.weight", "k_proj.bias")):
            return _permute(data, n_head, n_kv)
    if arch == "gemma2" and name == "lm_head.weight":  # Gemma2Model.filter_tensors
        return None
    if arch == "gemma3" and "embed_tokens.weight" in name:  # drop out-of-vocabulary rows
        tok = json.loads((hf_dir / "tokenizer.json").read_text(encoding="utf-8"))
        data = data[:len(tok["model"]["vocab"]) + len(tok["added_tokens"])]
    if arch.startswith("gemma") and name.endswith("norm.weight"):  # (1 + w) baked in
        data = data + 1
    return data


def _permute(weights: torch.Tensor, n_head: int, n_head_kv: int | None) -> torch.Tensor:
    """LlamaModel.permute (llama.py), verbatim."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2)
            .reshape(weights.shape))


def generated_tensors(hp: dict, rope: dict, arch: str):
    """LlamaModel.generate_extra_tensors (llama.py): llama3's rope_freqs. Note it reads
    original_max_position_embeddings from the top of the config (default 8192), where
    transformers keeps it inside rope_parameters."""
    params = rope.get("full_attention", rope)
    if arch != "llama" or params.get("rope_type", "").lower() != "llama3":
        return
    base = params.get("rope_theta", 10000.0)
    dim = hp.get("head_dim") or hp["hidden_size"] // hp["num_attention_heads"]
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor = params.get("factor", 8.0)
    low_freq_factor = params.get("low_freq_factor", 1.0)
    high_freq_factor = params.get("high_freq_factor", 4.0)
    old_context_len = hp.get("original_max_position_embeddings", 8192)
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    rope_factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            rope_factors.append(1)
        elif wavelen > low_freq_wavelen:
            rope_factors.append(factor)
        else:
            smooth = (old_context_len / wavelen - low_freq_factor) / (
                high_freq_factor - low_freq_factor)
            rope_factors.append(1 / ((1 - smooth) / factor + smooth))
    yield "rope_freqs.weight", torch.tensor(rope_factors, dtype=torch.float32).numpy()


def _add_tensor(w: gguf.GGUFWriter, name: str, data: np.ndarray, qtype: Q) -> None:
    """prepare_tensors' type choice: 1-d tensors and norms F32, the rest `qtype`."""
    if data.ndim <= 1 or name.endswith("_norm.weight"):
        qtype = Q.F32
    try:
        stored = gguf.quants.quantize(data, qtype)
    except gguf.QuantError:
        qtype = Q.F16
        stored = gguf.quants.quantize(data, qtype)
    w.add_tensor(name, stored, raw_dtype=qtype)
