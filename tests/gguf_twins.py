"""GGUF twins of the HF checkpoints tests/family_checkpoints.py writes, as llama.cpp writes them.

`write_twin(hf_dir, path)` mirrors what llama.cpp's converter (`convert_hf_to_gguf.py`, now
split into conversion/base.py, llama.py, qwen.py, gemma.py, phi.py) writes for the dir's
model: the class it registers for the architecture, its `set_gguf_parameters` keys,
`modify_tensors` transforms (Llama's Q/K row permutation, Gemma's `norm.weight + 1`,
Qwen-MoE's stacking of experts), `generate_extra_tensors` (llama3's rope_freqs, Phi-3
LongRoPE's factors and attention factor), gguf-py's
TensorNameMap names and `prepare_tensors`' choice of types (1-d tensors, norms and the MoE
router stay F32). Each function names the converter code it follows. The tokenizer metadata
is SmolLM2's GGUF's, whose tokenizer every case shares.

It mirrors the converter; it is not the converter (llama.cpp is not a dependency here). These
twins test our reading of llama.cpp's conventions against that same reading, so checks on
real converter output remain the true test.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Collection
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from safetensors import safe_open

from gguf_twin_params import PARAMETERS, find_key, rope_parameters
from tokenpool.models.gguf_file import read_gguf
from tokenpool.models.locate import smollm2_gguf_path

# HF model_type -> `general.architecture` of the class the converter registers for it
# (LlamaModel takes MistralForCausalLM too).
ARCH_OF = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
           "qwen3_moe": "qwen3moe", "gemma2": "gemma2", "gemma3_text": "gemma3", "phi3": "phi3"}
MOE_ARCHS = ("qwen3moe",)  # converted by Qwen2MoeModel (Qwen3MoeModel subclasses it)
FILE_TYPES = {Q.F32: gguf.LlamaFileType.ALL_F32, Q.F16: gguf.LlamaFileType.MOSTLY_F16,
              Q.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0}


def write_twin(hf_dir: str | Path, path: str | Path, qtype: Q | Callable[[str], Q] = Q.F32, *,
               extra_metadata: dict | None = None,
               extra_tensors: dict[str, np.ndarray] | None = None,
               drop_tensors: Collection[str] = ()) -> Path:
    """Write the GGUF llama.cpp's converter makes of `hf_dir` with `--outtype` `qtype`.

`qtype` may instead map each GGUF tensor name to its type, as llama-quantize's mixed
presets do (Q4_K_M keeps some attn_v and ffn_down in Q6_K). gguf-py cannot quantize to
Q4_K or Q6_K: those tensors get random valid blocks of the weights' spread instead.

    `extra_metadata` (key -> str, list, or (value, GGUFValueType)) replaces or adds keys after
    the converter's; `extra_tensors` adds F32 tensors and `drop_tensors` leaves out converted
    ones (GGUF names): for files the converter would not write.
    """
    from transformers import AutoConfig

    hf_dir, path = Path(hf_dir), Path(path)
    hp = AutoConfig.from_pretrained(hf_dir).to_dict()  # ModelBase.load_hparams
    arch = ARCH_OF[hp["model_type"]]
    rope = rope_parameters(hp)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(hf_dir.name)
    PARAMETERS[arch](w, hp, rope)
    w.add_file_type(FILE_TYPES.get(qtype, gguf.LlamaFileType.MOSTLY_Q8_0))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _copy_tokenizer(w)
    for name, data in _converted_tensors(hf_dir, hp, rope, arch, w):
        if name not in drop_tensors:
            _add_tensor(w, name, data, qtype(name) if callable(qtype) else qtype)
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

def _converted_tensors(hf_dir: Path, hp: dict, rope: dict, arch: str, w: gguf.GGUFWriter):
    """(GGUF name, float32 array) as prepare_tensors yields them: extra tensors first, then
    each checkpoint tensor through the arch's modify_tensors and gguf-py's TensorNameMap."""
    yield from generated_tensors(hp, rope, arch, w)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], hp["num_hidden_layers"])
    for name, data in _modified(_checkpoint_tensors(hf_dir), hp, arch, hf_dir):
        new_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if new_name is None:
            raise ValueError(f"Can not map tensor {name!r}")
        yield new_name, data.numpy()


def _checkpoint_tensors(hf_dir: Path):
    for file in sorted(hf_dir.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                if not name.endswith((".attention.masked_bias", ".attention.bias",
                                      ".rotary_emb.inv_freq")):
                    yield name, f.get_tensor(name).float()


def _modified(tensors, hp: dict, arch: str, hf_dir: Path):
    """Each (HF name, tensor) through the arch's modify_tensors: one out, none, or (for a
    layer's experts, once all are in) the stacked ones."""
    experts: dict[int, dict[str, torch.Tensor]] = {}  # Qwen2MoeModel._experts
    for name, data in tensors:
        if arch in MOE_ARCHS and "experts" in name:
            yield from _stack_experts(experts, name, data, hp)
        elif (data := _modify(data, name, hp, arch, hf_dir)) is not None:
            yield name, data
    if leftover := [k for layer in experts.values() for k in layer]:  # prepare_tensors
        raise ValueError(f"Unprocessed experts: {leftover}")


def _stack_experts(experts: dict, name: str, data: torch.Tensor, hp: dict):
    """Qwen2MoeModel.modify_tensors (qwen.py): a layer's per-expert matrices are held until
    all 3 * n_experts are in, then stacked per projection into [experts, out, in]."""
    n_experts = find_key(hp, ("num_local_experts", "num_experts"))
    bid = int(name.split(".")[2])  # model.layers.{bid}.mlp.experts.{xid}.{w_name}.weight
    layer = experts.setdefault(bid, {})
    layer[name] = data
    if len(layer) < n_experts * 3:
        return
    for w_name in ("down_proj", "gate_proj", "up_proj"):
        stacked = torch.stack([layer.pop(f"model.layers.{bid}.mlp.experts.{xid}.{w_name}.weight")
                               for xid in range(n_experts)])
        yield f"model.layers.{bid}.mlp.experts.{w_name}.weight", stacked


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


def generated_tensors(hp: dict, rope: dict, arch: str, w: gguf.GGUFWriter | None = None):
    """The arch's generate_extra_tensors: (GGUF name, float32 array), and the keys it writes
    to `w` on the way."""
    if arch == "llama":
        yield from _llama3_rope_freqs(hp, rope)
    elif arch == "phi3":
        yield from _phi3_longrope_factors(hp, rope, w)


def _phi3_longrope_factors(hp: dict, rope: dict, w: gguf.GGUFWriter | None):
    """Phi3MiniModel.generate_extra_tensors (phi.py): nothing without long factors; else
    rope.scaling.attn_factor, computed from max_position_embeddings / original (the config's
    own attention_factor and factor are not read), and both factor lists as F32 tensors."""
    n_embd, n_head = hp["hidden_size"], hp["num_attention_heads"]
    max_pos_embds = hp["max_position_embeddings"]
    orig_max_pos_embds = rope["original_max_position_embeddings"]
    rope_dims = int(rope.get("partial_rotary_factor", 1.0) * n_embd) // n_head
    long_factors, short_factors = rope.get("long_factor"), rope.get("short_factor")
    if not long_factors:
        return
    scale = max_pos_embds / orig_max_pos_embds
    kind = rope.get("rope_type", "").lower()
    if kind in ("su", "longrope"):
        attn_factor = math.sqrt(1 + math.log(scale) / math.log(orig_max_pos_embds)) \
            if scale > 1.0 else 1.0
    elif kind == "yarn":
        attn_factor = 0.1 * math.log(scale) + 1.0 if scale > 1.0 else 1.0
    else:
        raise NotImplementedError(f"The rope scaling type {kind} is not supported yet")
    if w is not None:
        w.add_rope_scaling_attn_factors(attn_factor)
    if short_factors is None or len(long_factors) != len(short_factors) \
            or len(long_factors) != rope_dims / 2:
        raise ValueError(f"The length of rope long and short factors must be {rope_dims / 2}")
    yield "rope_factors_long.weight", torch.tensor(long_factors, dtype=torch.float32).numpy()
    yield "rope_factors_short.weight", torch.tensor(short_factors, dtype=torch.float32).numpy()


def _llama3_rope_freqs(hp: dict, rope: dict):
    """LlamaModel.generate_extra_tensors (llama.py): llama3's rope_freqs. Note it reads
    original_max_position_embeddings from the top of the config (default 8192), where
    transformers keeps it inside rope_parameters."""
    params = rope.get("full_attention", rope)
    if params.get("rope_type", "").lower() != "llama3":
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
    """prepare_tensors' type choice: 1-d tensors, norms and the MoE router (FFN_GATE_INP)
    F32, the rest `qtype`, or F16 where `qtype` does not fit the rows."""
    if data.ndim <= 1 or name.endswith(("_norm.weight", ".ffn_gate_inp.weight")):
        qtype = Q.F32
    if qtype in (Q.Q4_K, Q.Q6_K) and data.shape[-1] % 256 == 0:
        w.add_tensor(name, random_k_blocks(data, qtype), raw_dtype=qtype)
        return
    try:
        stored = gguf.quants.quantize(data, qtype)
    except gguf.QuantError:
        qtype = Q.F16
        stored = gguf.quants.quantize(data, qtype)
    w.add_tensor(name, stored, raw_dtype=qtype)


def random_k_blocks(data: np.ndarray, qtype: Q) -> np.ndarray:
    """Random valid Q4_K / Q6_K rows for a tensor shaped like `data`, whose weights have about
    its spread (not its values: a stand-in, where gguf-py has no K-quant quantizer)."""
    rng = np.random.default_rng(abs(hash((data.shape, int(qtype)))) % 2**32)
    rows, cols = int(np.prod(data.shape[:-1])), data.shape[-1]
    block_bytes = gguf.GGML_QUANT_SIZES[qtype][1]
    blocks = rng.integers(0, 256, (rows, cols // 256, block_bytes), dtype=np.uint8)
    std = float(data.std()) or 0.02
    if qtype == Q.Q4_K:  # w = d * sc * q - dmin * m; sc, m 6-bit, q 4-bit
        d = np.full(blocks.shape[:2], std / 147, dtype=np.float16)
        scales = np.stack([d, (d.astype(np.float32) * 7.5).astype(np.float16)], -1)
        blocks[..., 0:4] = scales.view(np.uint8).reshape(*blocks.shape[:2], 4)
    else:  # w = d * sc * (q - 32); sc int8, q 6-bit
        d = np.full(blocks.shape[:2], std / 1152, dtype=np.float16)
        blocks[..., 208:210] = d.view(np.uint8).reshape(*blocks.shape[:2], 2)
    return blocks.reshape(*data.shape[:-1], -1)
