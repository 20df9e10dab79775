"""Fleet file + model id -> a loaded checkpoint and an engine: what generate and bench share."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from tokenpool.fleet import FleetConfig, ModelSpec, load_fleet


@dataclass(frozen=True, slots=True)
class LoadedModel:
    spec: ModelSpec
    path: Path  # the checkpoint: a .gguf file or an HF-layout directory
    checkpoint: object  # tokenpool.models.Checkpoint
    engine: object  # tokenpool.gpu_pool.engine.LLMEngine


def find_model(config: Path, model_id: str) -> tuple[FleetConfig, ModelSpec]:
    """Raises ConfigError for a bad file and UnknownModelError for an id it does not list."""
    fleet = load_fleet(config)
    return fleet, fleet.model(model_id)


def load_model(fleet: FleetConfig, spec: ModelSpec, *, dtype: str | None = None,
               device: str | None = None, quantization: str | None = None,
               progress: bool = True) -> LoadedModel:
    from tokenpool.gpu_pool.engine import LLMEngine
    from tokenpool.models import load_checkpoint, resolve_source

    engine_config = fleet.engine_config(spec.id, dtype=dtype, quantization=quantization)
    if device:
        engine_config = dataclasses.replace(engine_config, device=device)
    path = resolve_source(spec.source, fleet.base_dir)
    # native keeps a GGUF's quantized tensors as bytes; the other modes start from floats
    checkpoint = load_checkpoint(path, progress=progress,
                                 quantized=engine_config.quantization == "native")
    engine = LLMEngine.from_checkpoint(checkpoint, engine_config)
    return LoadedModel(spec, path, checkpoint, engine)
