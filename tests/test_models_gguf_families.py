"""GGUF twins of every family case: same config, same weights, same greedy tokens as the HF dir.

Each case of tests/family_checkpoints.py is written as an HF dir and converted to GGUF the way
llama.cpp's converter does (tests/gguf_twins.py). Where the converter drops something or
llama.cpp assumes a value the file cannot state, the twin is a different model from the HF
dir; CONVERTER_LOSSES records those as the config.json edits that make the HF dir the model
the twin describes, and the config fields they change. The twin is compared with that.

llama.cpp's qwen3moe has experts in every layer, so the Qwen3-MoE cases' dense layer
(mlp_only_layers) cannot be converted; ALL_MOE makes each of them with experts everywhere.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFValueType

from family_checkpoints import CASES, build_model, edit_config, write_case
from gguf_twins import generated_tensors, write_twin
from helpers import random_prompts
from tokenpool.errors import CheckpointError
from tokenpool.gpu_pool.engine import LLMEngine
from tokenpool.gpu_pool.engine_config import EngineConfig
from tokenpool.models.checkpoint import Checkpoint, load_checkpoint, read_model_info
from tokenpool.models.gguf_file import GGUFFile
from tokenpool.models.gguf_loader import gguf_config
from tokenpool.models.gguf_names import llama3_from_rope_freqs
from tokenpool.models.hf_loader import hf_config
from tokenpool.models.synth import smollm2_tokenizer
from tokenpool.sampling import SamplingParams

pytest.importorskip("transformers")

GREEDY = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
_SLIDING = "sliding_attention"
_MOE_CASES = [name for name, case in CASES.items() if case.model_type == "qwen3_moe"]
# Each Qwen3-MoE case with experts in every layer: what llama.cpp's qwen3moe can hold.
ALL_MOE = {f"{name}-all-layers": name for name in _MOE_CASES}
# Mixtral converts as a llama with experts, and LongRoPE's factors become tensors: the loader
# refuses both (see README's table).
GGUF_CASES = [name for name, case in CASES.items()
              if name not in _MOE_CASES and case.model_type != "mixtral"
              and name != "phi3-longrope"] + list(ALL_MOE)


def write_hf(name: str, out_dir: Path) -> Path:
    """write_case, or for an ALL_MOE name its case with mlp_only_layers=[]."""
    if name not in ALL_MOE:
        return write_case(name, out_dir)
    case = CASES[ALL_MOE[name]]
    build_model(case.model_type, **{**case.config, "mlp_only_layers": []}).save_pretrained(out_dir)
    smollm2_tokenizer().save_pretrained(out_dir)
    return out_dir


@dataclass(frozen=True)
class Loss:
    edits: dict  # config.json changes giving the model the GGUF twin holds
    fields: frozenset  # the ModelConfig fields they change
    why: str


CONVERTER_LOSSES = {
    "llama-llama3": Loss(
        {"rope_parameters": {**CASES["llama-llama3"].config["rope_parameters"],
                             "original_max_position_embeddings": 8192}},
        frozenset({"rope"}), "LlamaModel.generate_extra_tensors reads a top-level "
        "original_max_position_embeddings (default 8192); transformers nests it"),
    "llama-dynamic": Loss(
        {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}},
        frozenset({"rope"}), "TextModel.set_gguf_parameters writes nothing for dynamic"),
    "mistral": Loss(
        {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "sliding_window": None},
        frozenset({"model_type", "sliding_window", "layer_types"}),
        "LlamaModel converts Mistral as llama and writes no sliding window"),
    "qwen2-sliding": Loss(
        {"use_sliding_window": False}, frozenset({"sliding_window", "layer_types"}),
        "Qwen2Model writes no sliding window (llama.cpp's qwen2 has none)"),
    "gemma2": Loss(
        {"query_pre_attn_scalar": 32}, frozenset({"query_pre_attn_scalar"}),
        "not stored; llama.cpp scales by head_dim except for the 27B"),
    "gemma3": Loss(
        {"query_pre_attn_scalar": 32, "sliding_window_pattern": 6,
         "layer_types": [_SLIDING] * 4},
        frozenset({"query_pre_attn_scalar", "layer_types"}),
        "neither stored; llama.cpp: head_dim scaling, and every 6th layer full"),
    "qwen3-moe-all-layers": Loss(
        {"norm_topk_prob": True}, frozenset({"norm_topk_prob"}),
        "not stored; llama.cpp's qwen3moe graph always renormalises the top-k weights"),
}


@dataclass
class Twin:
    name: str
    hf_dir: Path  # as family_checkpoints wrote it
    reference: Path  # hf_dir with the converter's losses applied
    gguf: Path


@pytest.fixture(scope="module")
def twins(tmp_path_factory):
    """(case, qtype) -> its Twin, each file written once per module."""
    root, made = tmp_path_factory.mktemp("gguf-twins"), {}

    def twin(name: str, qtype: Q = Q.F32) -> Twin:
        if (name, Q.F32) not in made:
            hf_dir = write_hf(name, root / name)
            loss = CONVERTER_LOSSES.get(name)
            ref = edit_config(hf_dir, root / f"{name}-as-converted", **loss.edits) if loss \
                else hf_dir
            made[name, Q.F32] = Twin(name, hf_dir, ref, write_twin(hf_dir, root / f"{name}.gguf"))
        if (name, qtype) not in made:
            base = made[name, Q.F32]
            path = write_twin(base.hf_dir, root / f"{name}-{qtype.name}.gguf", qtype)
            made[name, qtype] = dataclasses.replace(base, gguf=path)
        return made[name, qtype]

    return twin


@dataclass
class Loaded:
    twin: Twin
    hf: Checkpoint
    gguf: Checkpoint


@pytest.fixture(scope="module", params=GGUF_CASES, ids=GGUF_CASES)
def loaded(request, twins) -> Loaded:
    twin = twins(request.param)
    return Loaded(twin, load_checkpoint(twin.reference, progress=False),
                  load_checkpoint(twin.gguf, progress=False))


def test_config_equals_hf_twins(loaded):
    assert loaded.gguf.config == loaded.hf.config
    assert read_model_info(loaded.twin.gguf)[0] == loaded.gguf.config


def test_converter_losses_change_only_what_they_name(loaded):
    original = hf_config(loaded.twin.hf_dir)
    changed = {f.name for f in dataclasses.fields(original)
               if getattr(original, f.name) != getattr(loaded.gguf.config, f.name)}
    loss = CONVERTER_LOSSES.get(loaded.twin.name)
    assert changed == (loss.fields if loss else set()), loss and loss.why


def _as_used(name: str, w: torch.Tensor, gemma_norms: bool) -> torch.Tensor:
    """Gemma's norms scale by 1 + w: exact through the converter's +1 and our -1, w itself
    not (w + 1 rounds w's low bits in float32)."""
    return 1 + w if gemma_norms and name.endswith("norm.weight") else w


def test_weights_equal_hf_exactly(loaded):
    ours, theirs = loaded.gguf.weights, loaded.hf.weights
    assert set(ours) == set(theirs)
    gemma = loaded.gguf.config.gemma_norms
    for name, w in ours.items():
        assert w.dtype == torch.float32 and w.is_contiguous(), name
        assert torch.equal(_as_used(name, w, gemma), _as_used(name, theirs[name], gemma)), name


def _greedy(checkpoint: Checkpoint, prompts: list[list[int]]) -> list[list[int]]:
    config = EngineConfig(dtype="float32", device="cpu", kv_cache_bytes=16 << 20)
    return LLMEngine.from_checkpoint(checkpoint, config).generate(prompts, GREEDY)


def test_greedy_tokens_equal_hf_dir(loaded):
    # 30 + 16 tokens pass every sliding window (12-16) and fit llama-dynamic's 48 positions.
    prompts = random_prompts((7, 30), seed=5)
    assert _greedy(loaded.gguf, prompts) == _greedy(loaded.hf, prompts)


# -- a mixed-type file -------------------------------------------------------------------------

@pytest.mark.parametrize("name, types", [
    ("llama", {Q.F32, Q.Q8_0}), ("gemma3", {Q.F32, Q.Q8_0}),
    ("qwen3-moe-all-layers", {Q.F32, Q.Q8_0, Q.F16})])
def test_q8_0_twin_loads_mixed_types(twins, name, types):
    """Norms (and the MoE router) stay F32, matrices Q8_0 (F16 where rows are not whole
    blocks: down_exps' 48): the Q/K un-permutation, Gemma's norm offset and the split of
    stacked experts apply after dequantization (a wrong permutation is ~140% off, Q8_0 under
    1%)."""
    twin = twins(name, Q.Q8_0)
    assert {t.tensor_type for t in gguf.GGUFReader(twin.gguf).tensors} == types
    ckpt, f32 = load_checkpoint(twin.gguf, progress=False), load_checkpoint(
        twins(name).gguf, progress=False)
    assert ckpt.config == f32.config
    for key, w in f32.weights.items():
        got = ckpt.weights[key]
        if w.ndim == 1:
            assert torch.equal(got, w), key
        else:
            assert float((got - w).norm() / w.norm()) < 0.01, key
    assert all(len(out) == 16 for out in _greedy(ckpt, random_prompts((9,), seed=1)))


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


# -- keys the converter may write --------------------------------------------------------------

@pytest.mark.parametrize("pattern", [(3, GGUFValueType.UINT32), [True, True, False, True]],
                         ids=["period", "per-layer"])
def test_gemma3_sliding_window_pattern_key_gives_layer_types(twins, tmp_path, pattern):
    twin = twins("gemma3")
    path = write_twin(twin.hf_dir, tmp_path / "pattern.gguf",
                      extra_metadata={"gemma3.attention.sliding_window_pattern": pattern})
    config = read_model_info(path)[0]
    assert config.layer_types == hf_config(twin.hf_dir).layer_types
    assert config.layer_types.count(_SLIDING) == 3


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
    ("phi3", {}, {"rope_factors_long.weight": [1.0] * 8}, "rope_factors_long.weight"),
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
        "rope-freqs-and-linear", "longrope-factors", "llama-experts", "shared-experts",
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
