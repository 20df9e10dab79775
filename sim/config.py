"""A simulation set-up: the cluster, its device kind, SLOs, policy, models and workload.

Loaded strictly from YAML (`configs/sim/*.yaml`, see `tokenpool.config.build`): an unknown key
or a wrong type is an error with its key path. Relative paths (the GPU profiles, workload
files) resolve against the YAML file's folder.

`models:` lists the profiled real models with their sizes; `aliases:` maps the workload's
model names onto them as the Aegaeon artifact does (`synth_model_K` by `K mod 10`). Each
alias is still its own model to the system: its own switches and its own weights.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from tokenpool.config import build, load_yaml, parse_size
from tokenpool.controller.cost_fit import fit_gpu_profile
from tokenpool.sim.workload import WorkloadSpec, build_workload
from tokenpool.errors import ConfigError, UnknownModelError
from tokenpool.schedulers.config import SchedulerConfig
from tokenpool.schedulers.cost import CostModel
from tokenpool.schedulers.quota import Q_MAX_S
from tokenpool.schedulers.scaling import ScalingConfig
from tokenpool.schedulers.types import SLO

WEIGHT_SLOTS = 2  # the active model and the one being prefetched


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    nodes: int
    devices_per_node: int
    prefill_per_node: int  # every device has one role: prefill or decode
    decode_per_node: int

    def __post_init__(self):
        if min(self.nodes, self.prefill_per_node, self.decode_per_node) < 1:
            raise ValueError("nodes, prefill_per_node and decode_per_node must be >= 1")
        if self.prefill_per_node + self.decode_per_node != self.devices_per_node:
            raise ValueError(f"prefill_per_node + decode_per_node must equal devices_per_node "
                             f"({self.devices_per_node})")

    @property
    def num_devices(self) -> int:
        return self.nodes * self.devices_per_node

    @property
    def num_prefill(self) -> int:
        return self.nodes * self.prefill_per_node

    @property
    def num_decode(self) -> int:
        return self.nodes * self.decode_per_node

    def scaled(self, num_devices: int) -> "ClusterConfig":
        """`num_devices` devices with the same prefill share, at least one of each role.

        Whole nodes keep their layout. Any other count becomes one node holding them all,
        its prefill count rounded half up (10 devices at 3:5 -> 4 prefill, 6 decode).
        """
        if num_devices < 2:
            raise ValueError(f"need at least 2 devices (one per role), got {num_devices}")
        if num_devices % self.devices_per_node == 0:
            return dataclasses.replace(self, nodes=num_devices // self.devices_per_node)
        share = self.prefill_per_node / self.devices_per_node
        prefill = min(max(int(num_devices * share + 0.5), 1), num_devices - 1)
        return ClusterConfig(1, num_devices, prefill, num_devices - prefill)


@dataclass(frozen=True, slots=True)
class DeviceConfig:
    kind: str  # the profiles' folder name: H800, H100, A100 or H20
    memory_bytes: int
    h2d_bytes_per_s: float | str  # a number or a size per second such as 64GiB
    profile_dir: str  # holds MODEL/KIND/iLENbBATCH.json
    h2d_efficiency: float = 1.0  # achieved share of the link's bandwidth for weight copies
    reserved_bytes: int = 0  # runtime and activations, kept out of the KV region

    def __post_init__(self):
        rate = self.h2d_bytes_per_s
        rate = parse_size(rate, "device.h2d_bytes_per_s") if isinstance(rate, str) else rate
        object.__setattr__(self, "h2d_bytes_per_s", float(rate))
        if self.memory_bytes <= 0 or self.h2d_bytes_per_s <= 0 or self.reserved_bytes < 0:
            raise ValueError("memory_bytes and h2d_bytes_per_s must be positive")
        if not 0 < self.h2d_efficiency <= 1:
            raise ValueError(f"h2d_efficiency must be in (0, 1], got {self.h2d_efficiency}")

    @property
    def effective_h2d_bytes_per_s(self) -> float:
        return self.h2d_bytes_per_s * self.h2d_efficiency


@dataclass(frozen=True, slots=True)
class RealModelConfig:
    """A profiled model: what its switches copy and what its KV cache costs per token."""

    weight_bytes: int
    layers: int
    kv_heads: int
    head_dim: int
    kv_dtype_bytes: int = 2

    def __post_init__(self):
        if min(self.weight_bytes, self.layers, self.kv_heads, self.head_dim,
               self.kv_dtype_bytes) < 1:
            raise ValueError("every size must be >= 1")

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * self.kv_dtype_bytes  # K and V


@dataclass(frozen=True, slots=True)
class AliasConfig:
    """Names matching `pattern` (one integer group K) alias `residues[K mod modulo]`.

    `residues` keys are residues ("7") or inclusive ranges ("0-5") covering 0..modulo-1
    exactly once.
    """

    pattern: str
    modulo: int
    residues: dict[str, str]
    _regex: re.Pattern | None = field(default=None, init=False, repr=False, compare=False)
    _table: tuple[str, ...] = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self):
        regex = re.compile(self.pattern)
        if regex.groups != 1 or self.modulo < 1:
            raise ValueError("pattern needs exactly one group and modulo must be >= 1")
        table: list[str | None] = [None] * self.modulo
        for key, model in self.residues.items():
            for residue in _residue_range(str(key), self.modulo):
                if table[residue] is not None:
                    raise ValueError(f"residue {residue} is mapped twice")
                table[residue] = model
        if None in table:
            raise ValueError(f"residue {table.index(None)} of {self.modulo} is not mapped")
        object.__setattr__(self, "_regex", regex)
        object.__setattr__(self, "_table", tuple(table))

    @property
    def targets(self) -> set[str]:
        return set(self._table)

    def target(self, name: str) -> str | None:
        match = self._regex.fullmatch(name)
        return None if match is None else self._table[int(match.group(1)) % self.modulo]


def _residue_range(key: str, modulo: int) -> range:
    match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", key)
    if not match:
        raise ValueError(f"residue key {key!r}: expected N or N-M")
    low, high = int(match.group(1)), int(match.group(2) or match.group(1))
    if not low <= high < modulo:
        raise ValueError(f"residue key {key!r}: expected 0 <= N <= M < {modulo}")
    return range(low, high + 1)


# Where the simulator's scheduler defaults differ from serving's: DESIGN §3.2's 4 s Q_max
# (serving defaults to 1 s turns) and one prefill per request, as Aegaeon runs them. A
# `scheduler:` block in the YAML overrides them key by key.
SIM_SCHEDULER_DEFAULTS = {"q_max_s": Q_MAX_S, "batch_prefill": False}


@dataclass(frozen=True, slots=True)
class SimConfig:
    cluster: ClusterConfig
    device: DeviceConfig
    slo: SLO
    models: dict[str, RealModelConfig]  # keyed by the profiles' folder names
    scheduler: SchedulerConfig = field(
        default_factory=lambda: SchedulerConfig(**SIM_SCHEDULER_DEFAULTS))
    aliases: AliasConfig | None = None
    workload: WorkloadSpec | None = None  # the default workload; a CLI may bring another
    # Workload model name -> devices of its own (`pin: N` of a fleet file). Pinned devices
    # come beside the cluster's pooled ones, each prefilling and decoding its one model
    # (sim/pinning.py); `cluster` (and --num-devices) sizes the pool alone.
    pins: dict[str, int] = field(default_factory=dict)
    # The elastic pool's rule and bounds (`tokenpool simulate capacity --autoscale`); None:
    # its defaults, between 2 devices and the cluster's (docs/elastic.md).
    scaling: ScalingConfig | None = None

    def __post_init__(self):
        if not self.models:
            raise ValueError("models: at least one real model is required")
        if self.slo.ttft_s <= 0 or self.slo.tbt_s <= 0:
            raise ValueError("slo: ttft_s and tbt_s must be positive")
        # `build` copies mappings as they are; the entries become typed here.
        typed = {name: spec if isinstance(spec, RealModelConfig)
                 else build(RealModelConfig, spec, f"models.{name}")
                 for name, spec in self.models.items()}
        object.__setattr__(self, "models", typed)
        unknown = sorted((self.aliases.targets if self.aliases else set()) - set(typed))
        if unknown:
            raise ValueError(f"aliases: {unknown[0]!r} is not one of models")
        self._check_pins()
        if self.kv_capacity_bytes <= 0:
            raise ValueError(f"device.memory_bytes leaves no KV room after {WEIGHT_SLOTS} "
                             "weight slots of the largest model")

    def _check_pins(self) -> None:
        for name, n in self.pins.items():
            if not isinstance(n, int) or isinstance(n, bool) or n < 0:
                raise ValueError(f"pins.{name}: expected a whole number >= 0, got {n!r}")
            # A typo would pin a device to a model nobody asks for.
            if name not in self.models and not (self.aliases and self.aliases.target(name)):
                raise ValueError(f"pins: {name!r} is neither one of models nor an alias")

    @property
    def kv_capacity_bytes(self) -> int:
        """One device's KV region: what two weight slots of the largest model leave."""
        largest = max(m.weight_bytes for m in self.models.values())
        return self.device.memory_bytes - self.device.reserved_bytes - WEIGHT_SLOTS * largest

    def real_model(self, name: str) -> str:
        """The profiled model behind a workload's model name."""
        if name in self.models:
            return name
        target = self.aliases.target(name) if self.aliases else None
        if target is None:
            raise UnknownModelError(name, list(self.models))
        return target

    def cost_model(self, served: Iterable[str] = ()) -> CostModel:
        """Costs of every real model and of each name in `served` (by its alias)."""
        costs = {}
        for name, spec in self.models.items():
            fit = fit_gpu_profile(Path(self.device.profile_dir), name, self.device.kind)
            costs[name] = fit.model_cost(spec.weight_bytes, spec.kv_bytes_per_token)
        for name in served:
            costs[name] = costs[self.real_model(name)]
        return CostModel(costs, self.device.effective_h2d_bytes_per_s, self.kv_capacity_bytes)

    def with_num_devices(self, num_devices: int) -> "SimConfig":
        return dataclasses.replace(self, cluster=self.cluster.scaled(num_devices))


def _with_checkpoint_sizes(spec, base: Path, name: str):
    """`checkpoint: PATH` in a model entry stands for its sizes, read from the checkpoint's
    header (config.json or GGUF metadata) whatever its family: weight bytes at
    kv_dtype_bytes per parameter, and its KV shape."""
    if not isinstance(spec, dict) or "checkpoint" not in spec:
        return spec
    from tokenpool.models.checkpoint import read_model_info
    from tokenpool.models.tensor_layout import parameter_count

    sizes = {"weight_bytes", "layers", "kv_heads", "head_dim"}
    both = sorted(sizes & set(spec))
    if both:
        raise ConfigError(f"models.{name}: give checkpoint or {both[0]}, not both")
    rest = {k: v for k, v in spec.items() if k != "checkpoint"}
    cfg, _ = read_model_info(base / str(spec["checkpoint"]))
    dtype_bytes = rest.get("kv_dtype_bytes", 2)
    return {**rest, "weight_bytes": parameter_count(cfg) * dtype_bytes,
            "layers": cfg.num_hidden_layers, "kv_heads": cfg.num_key_value_heads,
            "head_dim": cfg.head_dim}


def load_sim_config(path: str | Path) -> SimConfig:
    path = Path(path)
    data = load_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    base = path.resolve().parent
    workload = data.get("workload")
    # The workload is built by its `kind`, not by trying each union member in turn.
    data = {k: v for k, v in data.items() if k != "workload"}
    scheduler = data.get("scheduler", {})
    if isinstance(scheduler, dict):  # the simulator's defaults, then the file's keys
        data["scheduler"] = {**SIM_SCHEDULER_DEFAULTS, **scheduler}
    if isinstance(data.get("models"), dict):
        data["models"] = {name: _with_checkpoint_sizes(spec, base, name)
                          for name, spec in data["models"].items()}
    config = build(SimConfig, data)
    profile_dir = (base / config.device.profile_dir).resolve()
    device = dataclasses.replace(config.device, profile_dir=str(profile_dir))
    _check_profiles(device, config.models)
    spec = None if workload is None else build_workload(workload).resolve(base)
    return dataclasses.replace(config, device=device, workload=spec)


def _check_profiles(device: DeviceConfig, models: Iterable[str]) -> None:
    for name in models:
        folder = Path(device.profile_dir) / name / device.kind
        if not folder.is_dir():
            raise ConfigError(f"models.{name}: no {device.kind} profiles at {folder}")
