"""Random-initialised checkpoints of any supported family (HF layout, SmolLM2's tokenizer)
for load tests."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from tokenpool.models.config import ModelConfig
from tokenpool.models.synth_shape import default_intermediate_size, validate_shape
from tokenpool.models.family_synth import hf_config_dict, synthetic_config
from tokenpool.models.tensor_layout import expected_shapes
from tokenpool.models.gguf_file import read_gguf
from tokenpool.models.locate import smollm2_gguf_path
from tokenpool.models.tokenizer import Tokenizer

_INIT_STD = 0.02  # HF's initializer_range: small enough that 30 layers stay finite


@functools.lru_cache(maxsize=1)
def smollm2_tokenizer() -> Tokenizer:
    """SmolLM2's tokenizer, read from the packaged GGUF once per process."""
    return Tokenizer.from_gguf(read_gguf(smollm2_gguf_path()).metadata)


def write_synthetic_checkpoint(
    out_dir: str | Path, *, num_layers: int, hidden_size: int, num_heads: int, num_kv_heads: int,
    intermediate_size: int | None = None, seed: int = 0, dtype: torch.dtype = torch.float32,
    tokenizer: Tokenizer | None = None, tie_word_embeddings: bool = True, family: str = "llama",
) -> Path:
    """Write config.json, model.safetensors, tokenizer files and generation_config.json."""
    validate_shape(num_layers, hidden_size, num_heads, num_kv_heads, intermediate_size)
    tokenizer = tokenizer or smollm2_tokenizer()
    config = synthetic_config(
        family, vocab_size=tokenizer.vocab_size, hidden_size=hidden_size,
        intermediate_size=intermediate_size or default_intermediate_size(hidden_size),
        num_hidden_layers=num_layers, num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads, head_dim=hidden_size // num_heads,
        rms_norm_eps=1e-5, max_position_embeddings=8192,
        tie_word_embeddings=tie_word_embeddings, bos_token_id=tokenizer.bos_token_id,
        eos_token_ids=tokenizer.eos_token_ids)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(random_weights(config, seed, dtype), str(out / "model.safetensors"),
              metadata={"format": "pt"})
    _write_json(out / "config.json", {**hf_config_dict(config), "torch_dtype": _dtype_name(dtype)})
    _write_json(out / "generation_config.json", {
        "bos_token_id": config.bos_token_id, "eos_token_id": list(config.eos_token_ids)})
    tokenizer.save_pretrained(out)
    return out


def random_weights(config: ModelConfig, seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Normal(0, 0.02) matrices and biases, and norms that scale by one, as HF initialises."""
    gen = torch.Generator().manual_seed(seed)
    weights = {}
    for name, shape in expected_shapes(config).items():
        if name.endswith("norm.weight"):  # Gemma's norms scale by (1 + w)
            weights[name] = torch.full(shape, 0.0 if config.gemma_norms else 1.0, dtype=dtype)
        else:
            weights[name] = torch.empty(shape).normal_(0.0, _INIT_STD, generator=gen).to(dtype)
    return weights


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")
