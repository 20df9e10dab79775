"""GGUF metadata the loader reads (RoPE parameters, sliding patterns, Gemma's query scale) and
files it refuses, naming the key or tensor."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFValueType

from family_checkpoints import CASES, write_case
from gguf_twins import generated_tensors, write_twin
from tokenpool.errors import CheckpointError
from tokenpool.models.checkpoint import load_checkpoint, read_model_info
from tokenpool.models.gguf_file import GGUFFile, read_gguf
from tokenpool.models.gguf_loader import gguf_config
from tokenpool.models.gguf_names import llama3_from_rope_freqs
from tokenpool.models.hf_loader import hf_config

pytest.importorskip("transformers")

from gguf_family_cases import twins  # noqa: F401


@pytest.mark.parametrize("theta, head_dim, factor, original", [
    (500000.0, 128, 8.0, 8192), (500000.0, 64, 32.0, 8192), (10000.0, 16, 8.0, 32)],
    ids=["llama3.1-8b", "llama3.2-1b", "tiny"])
def test_llama3_parameters_come_back_from_rope_freqs(theta, head_dim, factor, original):
    """rope_freqs as LlamaModel.generate_extra_tensors computes it (given the original context
    where it looks for it) gives the llama3 rope_parameters back."""
    rope = {"rope_type": "llama3", "rope_theta": theta, "factor": factor,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": original}
    hp = {"head_dim": head_dim, "original_max_position_embeddings": original}
    [(name, factors)] = generated_tensors(hp, rope, "llama")
    assert name == "rope_freqs.weight"
    got = llama3_from_rope_freqs(torch.from_numpy(factors), theta, head_dim, 1.0, 131072, "x")
    assert got == rope


def test_phi3_longrope_twin_holds_what_the_converter_writes(twins):
    """Phi3MiniModel: the factors as the first two tensors (F32, one per rotary frequency),
    attn_factor from max_position_embeddings / original, no scaling type or factor; the
    loader gives back transformers' default (attention_factor None, factor 256 / 32)."""
    path = twins("phi3-longrope").gguf
    reader = gguf.GGUFReader(path)
    first = [(t.name, t.tensor_type, list(t.shape)) for t in reader.tensors[:2]]
    assert first == [("rope_factors_long.weight", Q.F32, [8]),
                     ("rope_factors_short.weight", Q.F32, [8])]
    meta = read_gguf(path).metadata
    assert meta["phi3.rope.scaling.attn_factor"] == np.float32(math.sqrt(1 + math.log(8) /
                                                                         math.log(32)))
    assert meta["phi3.rope.scaling.original_context_length"] == 32
    assert meta["phi3.context_length"] == 256
    assert not {"phi3.rope.scaling.type", "phi3.rope.scaling.factor"} & set(meta)
    rope = read_model_info(path)[0].rope
    assert (rope.kind, rope.factor, rope.attention_factor) == ("longrope", 8.0, None)


def _without(path: Path, key: str) -> GGUFFile:
    gguf_file = read_gguf(path)
    return dataclasses.replace(gguf_file, metadata={k: v for k, v in gguf_file.metadata.items()
                                                    if k != key})


def test_longrope_attention_factor_is_the_files(twins, tmp_path):
    """A stored attn_factor other than transformers' default is kept (llama.cpp scales cos and
    sin by it); absent, llama.cpp's is 1. An explicit rope.scaling.type longrope changes
    nothing."""
    twin = twins("phi3-longrope")
    key = "phi3.rope.scaling.attn_factor"
    path = write_twin(twin.hf_dir, tmp_path / "attn.gguf", extra_metadata={key: (1.5, _F32)})
    assert read_model_info(path)[0].rope.attention_factor == 1.5
    assert gguf_config(_without(twin.gguf, key)).rope.attention_factor == 1.0
    path = write_twin(twin.hf_dir, tmp_path / "typed.gguf",
                      extra_metadata={"phi3.rope.scaling.type": "longrope"})
    assert read_model_info(path)[0] == read_model_info(twin.gguf)[0]


# -- keys the converter may write --------------------------------------------------------------

@pytest.mark.parametrize("pattern", [(3, GGUFValueType.UINT32), [True, True, False, True]],
                         ids=["period", "per-layer"])
def test_gemma3_sliding_window_pattern_key_gives_layer_types(twins, tmp_path, pattern):
    twin = twins("gemma3")
    path = write_twin(twin.hf_dir, tmp_path / "pattern.gguf",
                      extra_metadata={"gemma3.attention.sliding_window_pattern": pattern})
    config = read_model_info(path)[0]
    assert config.layer_types == hf_config(twin.hf_dir).layer_types
    assert config.layer_types.count("sliding_attention") == 3


@pytest.mark.parametrize("arch, layers, hidden, heads, kv_heads, head_dim, scalar", [
    ("gemma2", 46, 4608, 32, 16, 128, 144), ("gemma2", 26, 2304, 8, 4, 256, 256),
    ("gemma3", 62, 5376, 32, 16, 128, 168), ("gemma3", 26, 1152, 4, 1, 256, 256),
], ids=["gemma2-27b", "gemma2-2b", "gemma3-27b", "gemma3-1b"])
def test_gemma_query_scale_is_llama_cpps(arch, layers, hidden, heads, kv_heads, head_dim,
                                         scalar):
    """query_pre_attn_scalar is not stored: llama.cpp uses n_embd / n_head for the 27B (known
    by its layer count), head_dim otherwise; the real models' configs say the same."""
    key = {"embedding_length": hidden, "block_count": layers, "feed_forward_length": 4 * hidden,
           "attention.head_count": heads, "attention.head_count_kv": kv_heads,
           "attention.key_length": head_dim, "attention.value_length": head_dim,
           "attention.layer_norm_rms_epsilon": 1e-6, "attention.sliding_window": 4096}
    meta = {"general.architecture": arch, "tokenizer.ggml.tokens": ["a"] * 256,
            **{f"{arch}.{k}": v for k, v in key.items()}}
    config = gguf_config(GGUFFile(Path(f"{arch}.gguf"), meta, ()))
    assert config.query_pre_attn_scalar == scalar
    assert config.attn_scale == scalar ** -0.5


# -- what we cannot serve ----------------------------------------------------------------------

_F32, _U32 = GGUFValueType.FLOAT32, GGUFValueType.UINT32


@pytest.mark.parametrize("case, metadata, tensors, key", [
    ("llama", {"llama.rope.scaling.type": "longrope"}, {}, "llama.rope.scaling.type"),
    ("llama", {"llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": (4.0, _F32)},
     {}, "llama.rope.scaling.original_context_length"),
    ("llama-yarn", {"llama.rope.scaling.yarn_log_multiplier": (0.1, _F32)}, {},
     "llama.rope.scaling.yarn_log_multiplier"),
    ("llama", {}, {"rope_freqs.weight": [1.0, 3.0, 1.0, 2.0, 1.0, 2.0, 1.0, 2.0]},
     "rope_freqs.weight"),
    ("llama-linear", {}, {"rope_freqs.weight": [1.0] * 8}, "rope_freqs.weight"),
    ("llama", {"llama.expert_count": (8, _U32)}, {}, "llama.expert_count"),
    ("qwen3-moe-all-layers", {"qwen3moe.expert_shared_count": (1, _U32)}, {},
     "qwen3moe.expert_shared_count"),
    ("qwen3-moe-all-layers", {"qwen3moe.expert_gating_func": (2, _U32)}, {},
     "qwen3moe.expert_gating_func"),
    ("qwen3-moe-all-layers", {"qwen3moe.expert_weights_norm": (False, GGUFValueType.BOOL)},
     {}, "qwen3moe.expert_weights_norm"),
    ("qwen3-moe-all-layers", {"qwen3moe.expert_count": (4, _U32)}, {},
     "qwen3moe.expert_count"),
    ("qwen3-moe-all-layers", {"qwen3moe.expert_used_count": (9, _U32)}, {},
     "qwen3moe.expert_used_count"),
    ("qwen3-moe-all-layers", {}, {"blk.0.ffn_gate_inp_shexp.weight": [1.0] * 64},
     "blk.0.ffn_gate_inp_shexp.weight"),
], ids=["scaling-longrope", "yarn-no-original", "yarn-log-mul", "rope-freqs-not-llama3",
        "rope-freqs-and-linear", "llama-experts", "shared-experts",
        "sigmoid-gating", "no-topk-norm", "expert-count-not-stacked", "used-over-count",
        "shared-expert-router"])
def test_unsupported_gguf_fails_at_load_naming_the_key(twins, tmp_path, case, metadata,
                                                       tensors, key):
    path = write_twin(twins(case).hf_dir, tmp_path / "bad.gguf", extra_metadata=metadata,
                      extra_tensors={k: np.array(v) for k, v in tensors.items()})
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, progress=False)
    assert key in str(info.value), f"message does not name {key!r}: {info.value}"


def test_unknown_architecture_names_the_key(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "falcon.gguf"), "falcon")
    w.add_block_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CheckpointError, match="general.architecture 'falcon' is not supported"):
        load_checkpoint(tmp_path / "falcon.gguf")


@pytest.mark.parametrize("case, drop, extra, metadata, key", [
    ("phi3-longrope", ["rope_factors_short.weight"], {}, {}, "rope_factors_short.weight"),
    ("phi3", [], {"rope_factors_long.weight": [1.0] * 8}, {}, "rope_factors_short.weight"),
    ("phi3-longrope", ["rope_factors_long.weight"], {"rope_factors_long.weight": [1.0] * 6}, {},
     "rope_factors_long.weight"),
    ("llama", [], {n: [1.0] * 8 for n in ("rope_factors_long.weight",
                                         "rope_factors_short.weight")}, {},
     "rope_factors_long.weight"),
    ("phi3-longrope", [], {}, {"phi3.rope.scaling.type": "yarn"}, "phi3.rope.scaling.type"),
    ("phi3-longrope", [], {}, {"phi3.rope.scaling.factor": (4.0, _F32)},
     "phi3.rope.scaling.factor"),
    ("phi3", [], {}, {"phi3.rope.scaling.attn_factor": (1.19, _F32)},
     "phi3.rope.scaling.attn_factor"),
], ids=["short-missing", "long-only", "wrong-length", "not-phi3", "with-yarn", "with-factor",
        "attn-factor-alone"])
def test_malformed_longrope_fails_at_load_naming_it(twins, tmp_path, case, drop, extra,
                                                     metadata, key):
    """LongRoPE needs both factor tensors, one factor per rotary frequency, on an arch whose
    llama.cpp loader reads them, and no other scaling on top."""
    path = write_twin(twins(case).hf_dir, tmp_path / "bad.gguf", drop_tensors=drop,
                      extra_metadata=metadata,
                      extra_tensors={k: np.array(v) for k, v in extra.items()})
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, progress=False)
    assert key in str(info.value), f"message does not name {key!r}: {info.value}"


# -- Qwen3-MoE layouts llama.cpp cannot hold --------------------------------------------------

def test_converter_cannot_write_a_dense_moe_layer(tmp_path):
    """Qwen2MoeModel maps a dense layer's MLP with qwen3moe's tensor names, which have none."""
    hf_dir = write_case("qwen3-moe", tmp_path / "hf")
    assert CASES["qwen3-moe"].config.get("mlp_only_layers", [1]) == [1]
    with pytest.raises(ValueError, match=r"Can not map tensor 'model\.layers\.1\.mlp\."):
        write_twin(hf_dir, tmp_path / "dense.gguf")


_EXPERTS_1 = [f"blk.1.{t}.weight" for t in ("ffn_gate_inp", "ffn_gate_exps", "ffn_up_exps",
                                             "ffn_down_exps")]


@pytest.mark.parametrize("drop, extra, key", [
    (_EXPERTS_1, {f"blk.1.ffn_{p}.weight": np.zeros((128, 64)) for p in ("gate", "up")}
     | {"blk.1.ffn_down.weight": np.zeros((64, 128))}, "layer 1 has no blk.1.ffn_gate_inp"),
    (_EXPERTS_1[1:3], {"blk.1.ffn_gate_up_exps.weight": np.zeros((8, 96, 64))},
     "layer 1 has no blk.1.ffn_gate_exps.weight (its MLP tensors: ffn_down_exps, "
     "ffn_gate_inp, ffn_gate_up_exps)"),
], ids=["dense-layer", "fused-gate-up-experts"])
def test_moe_layer_without_the_expert_tensors_names_it(twins, tmp_path, drop, extra, key):
    """A file with a dense layer, or experts in a layout llama.cpp's qwen3moe does not load,
    is refused, naming the layer and the missing tensor."""
    path = write_twin(twins("qwen3-moe-all-layers").hf_dir, tmp_path / "bad.gguf",
                      drop_tensors=drop, extra_tensors=extra)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, progress=False)
    assert key in str(info.value)
