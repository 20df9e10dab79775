"""Load an HF-layout checkpoint directory: config.json, *.safetensors (sharded or not), tokenizer."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from tokenpool.errors import CheckpointError
from tokenpool.models.checkpoint import Checkpoint
from tokenpool.models.config import ModelConfig
from tokenpool.models.tokenizer import Tokenizer, read_json

_INDEX = "model.safetensors.index.json"
# Buffers some exporters save next to the weights; the engine recomputes them.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


def load_hf_dir(path: str | Path, *, progress: bool = True) -> Checkpoint:
    path = Path(path)
    config = hf_config(path)
    weights = _load_weights(path, config, progress)
    return Checkpoint(config, weights, Tokenizer.from_hf_dir(path), str(path))


def hf_config(path: Path) -> ModelConfig:
    raw = read_json(path / "config.json")
    try:
        config = ModelConfig.from_hf_dict(raw, str(path / "config.json"))
    except KeyError as e:
        raise CheckpointError(f"{path / 'config.json'} lacks {e.args[0]!r}") from e
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path / 'config.json'}: invalid config: {e!r}") from e
    gen_eos = read_json(path / "generation_config.json").get("eos_token_id")
    extra = gen_eos if isinstance(gen_eos, list) else [] if gen_eos is None else [gen_eos]
    eos = tuple(dict.fromkeys([*config.eos_token_ids, *extra]))
    return dataclasses.replace(config, eos_token_ids=eos)


def _load_weights(path: Path, config: ModelConfig, progress: bool) -> dict[str, torch.Tensor]:
    weights: dict[str, torch.Tensor] = {}
    for file in _safetensors_files(path):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            names = [n for n in f.keys() if _keep(n, config)]
            for name in tqdm(names, desc=f"loading {file.name}", unit="tensor", delay=1.0,
                             file=sys.stderr, disable=not progress):
                weights[name] = f.get_tensor(name).contiguous()
    return weights


def _keep(name: str, config: ModelConfig) -> bool:
    if name.endswith(_IGNORED_SUFFIXES):
        return False
    # Tied checkpoints sometimes store lm_head anyway; the engine reuses the embedding.
    return not (name == "lm_head.weight" and config.tie_word_embeddings)


def _safetensors_files(path: Path) -> list[Path]:
    index = path / _INDEX
    if index.is_file():
        weight_map = read_json(index).get("weight_map", {})
        files = [path / f for f in dict.fromkeys(weight_map.values())]
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(
            f"{path} has no *.safetensors weights (other weight formats are not supported)")
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(
            f"{path}: shard(s) listed in {_INDEX} are missing: {', '.join(missing)}")
    return files

