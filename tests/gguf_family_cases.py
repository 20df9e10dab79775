"""The GGUF twins of tests/family_checkpoints.py's cases, shared by the GGUF test modules.

Each case is written as an HF dir and converted to GGUF the way llama.cpp's converter does
(tests/gguf_twins.py). Where the converter drops something or llama.cpp assumes a value the
file cannot state, the twin is a different model from the HF dir; CONVERTER_LOSSES records
those as the config.json edits that make the HF dir the model the twin describes, and the
config fields they change.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from family_checkpoints import CASES, build_model, edit_config, write_case
from gguf_twins import write_twin
from tokenpool.models.synth import smollm2_tokenizer
from tokenpool.sampling import SamplingParams

pytest.importorskip("transformers")

GREEDY = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
_MOE_CASES = [name for name, case in CASES.items() if case.model_type == "qwen3_moe"]
# Each Qwen3-MoE case with experts in every layer: what llama.cpp's qwen3moe can hold.
ALL_MOE = {f"{name}-all-layers": name for name in _MOE_CASES}
# Mixtral converts as a llama with experts: the loader refuses it (see README's table).
GGUF_CASES = [name for name, case in CASES.items()
              if name not in _MOE_CASES and case.model_type != "mixtral"] + list(ALL_MOE)


def write_hf(name: str, out_dir: Path) -> Path:
    """write_case, or for an ALL_MOE name its case with mlp_only_layers=[]."""
    if name not in ALL_MOE:
        return write_case(name, out_dir)
    case = CASES[ALL_MOE[name]]
    build_model(case.model_type, **{**case.config, "mlp_only_layers": []}).save_pretrained(out_dir)
    smollm2_tokenizer().save_pretrained(out_dir)
    return out_dir


def _float32s(values: list[float]) -> list[float]:
    return [float(np.float32(v)) for v in values]


_LONGROPE = CASES["phi3-longrope"].config["rope_parameters"]


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
         "layer_types": ["sliding_attention"] * 4},
        frozenset({"query_pre_attn_scalar", "layer_types"}),
        "neither stored; llama.cpp: head_dim scaling, and every 6th layer full"),
    "phi3-longrope": Loss(
        {"rope_parameters": {**_LONGROPE, "short_factor": _float32s(_LONGROPE["short_factor"]),
                             "long_factor": _float32s(_LONGROPE["long_factor"])}},
        frozenset({"rope"}), "Phi3MiniModel stores the factors as F32 tensors: 1.1 comes back "
        "as 1.100000023841858 (no token changes: transformers computes with float32 factors; "
        "real Phi-3 configs list float32 values)"),
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


@pytest.fixture(scope="session")
def twins(tmp_path_factory):
    """(case, qtype) -> its Twin, each file written once per session."""
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


