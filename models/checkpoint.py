"""One loaded checkpoint: config, HF-named CPU weights and tokenizer, whatever the file format."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from tokenpool.errors import CheckpointError
from tokenpool.models.config import ModelConfig
from tokenpool.models.tensor_layout import expected_shapes
from tokenpool.models.tokenizer import Tokenizer


@dataclass
class Checkpoint:
    config: ModelConfig
    # HF names (model.layers.{i}...), CPU, contiguous; QuantizedTensor where loaded quantized
    weights: dict[str, torch.Tensor]
    tokenizer: Tokenizer
    source: str


def load_checkpoint(path: str | Path, *, progress: bool = True,
                    quantized: bool = False) -> Checkpoint:
    """Load a `.gguf` file or an HF-layout directory (config.json + *.safetensors); with
    `quantized`, a GGUF's tensors in formats the kernels serve stay QuantizedTensor."""
    from tokenpool.models.gguf_loader import load_gguf
    from tokenpool.models.hf_loader import load_hf_dir

    path = Path(path)
    if path.is_file() and path.suffix.lower() == ".gguf":
        ckpt = load_gguf(path, progress=progress, quantized=quantized)
    elif path.is_dir() and (path / "config.json").is_file():
        ckpt = load_hf_dir(path, progress=progress)
    elif not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    else:
        raise CheckpointError(
            f"{path} is neither a .gguf file nor a directory with config.json")
    check_weights(ckpt.config, ckpt.weights, path)
    return ckpt


def read_weight_formats(path: str | Path) -> dict[str, str]:
    """HF tensor name -> quantized format, for a GGUF's tensors the kernels serve natively
    (an HF directory: none), from the header alone."""
    from tokenpool.models.gguf_file import read_gguf
    from tokenpool.models.gguf_loader import gguf_weight_formats

    path = Path(path)
    if path.is_file() and path.suffix.lower() == ".gguf":
        return gguf_weight_formats(read_gguf(path))
    return {}


def read_model_info(path: str | Path) -> tuple[ModelConfig, Tokenizer]:
    """Config and tokenizer without reading any weights (a GGUF header, or the JSON files)."""
    from tokenpool.models.gguf_file import read_gguf
    from tokenpool.models.gguf_loader import gguf_config
    from tokenpool.models.hf_loader import hf_config

    path = Path(path)
    if path.is_file() and path.suffix.lower() == ".gguf":
        gguf = read_gguf(path)
        return gguf_config(gguf), Tokenizer.from_gguf(gguf.metadata)
    if path.is_dir() and (path / "config.json").is_file():
        return hf_config(path), Tokenizer.from_hf_dir(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    raise CheckpointError(f"{path} is neither a .gguf file nor a directory with config.json")


def check_weights(cfg: ModelConfig, weights: dict[str, torch.Tensor], source: Path) -> None:
    expected = expected_shapes(cfg)
    missing = sorted(set(expected) - set(weights))
    extra = sorted(set(weights) - set(expected))
    if missing or extra:
        raise CheckpointError(
            f"{source}: weights do not match the config: missing {_few(missing)}, "
            f"unexpected {_few(extra)}")
    for name, shape in expected.items():
        if tuple(weights[name].shape) != shape:
            raise CheckpointError(
                f"{source}: {name} has shape {tuple(weights[name].shape)}, config implies {shape}")


def _few(names: list[str]) -> str:
    if not names:
        return "none"
    more = f" (+{len(names) - 5} more)" if len(names) > 5 else ""
    return ", ".join(names[:5]) + more
