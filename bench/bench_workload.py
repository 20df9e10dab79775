"""Request streams for `tokenpool bench serve|sweep`, mapped onto a fleet's model ids.

The inputs are the simulator's (sim/workload.py): the Aegaeon artifact's CSVs, the
Azure production trace, or Poisson arrivals at a chosen rate with lengths resampled from
either. What this adds is what a real fleet needs:

- model names become fleet ids: Aegaeon's `synth_model_K` maps to fleet id `K mod n` unless
  a `--models-map` file names the mapping; the Azure trace's single model is spread over the
  fleet ids by Zipf popularity;
- lengths are scaled for a small CPU model by documented factors and clamped so every
  request fits the model's context;
- arrivals are compressed by `rate_scale` and cut at `duration_s`, so a run stops by itself.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np

from tokenpool.config import load_yaml
from tokenpool.sim.workload import (AEGAEON_COLUMNS, AZURE_COLUMNS, WorkloadRequest,
                                           csv_header,
                                           load_aegaeon_csv, load_length_pairs,
                                           read_azure_trace, zipf_weights)
from tokenpool.errors import ConfigError


@dataclass(frozen=True, slots=True)
class LengthScale:
    """How a GPU workload's lengths become a CPU run's: scaled, rounded, then clamped."""

    input_scale: float = 1.0
    output_scale: float = 1.0
    min_input: int = 4
    max_input: int = 512
    min_output: int = 2
    max_output: int = 128

    def __post_init__(self):
        if not (self.input_scale > 0 and self.output_scale > 0):
            raise ConfigError("length scales must be > 0")
        if not (1 <= self.min_input <= self.max_input and 1 <= self.min_output
                <= self.max_output):
            raise ConfigError("need 1 <= min_input <= max_input and 1 <= min_output <= "
                              "max_output")

    def apply(self, prompt_len: int, output_len: int) -> tuple[int, int]:
        prompt = min(self.max_input, max(self.min_input, round(prompt_len * self.input_scale)))
        output = min(self.max_output,
                     max(self.min_output, round(output_len * self.output_scale)))
        return prompt, output


@dataclass(frozen=True, slots=True)
class BenchWorkload:
    """The `bench.workload:` block of a fleet file, or what `--workload CSV` implies.

    kind `poisson`: arrivals at the sweep's rate (requests per second over the whole fleet),
    split over the models by Zipf(`zipf_s`) popularity (0: evenly), lengths resampled from
    `path`. kind `trace`: the file's own arrivals (Aegaeon CSV or Azure trace, told apart by
    their columns), compressed by the rate scale.
    """

    kind: Literal["poisson", "trace"]
    path: str  # relative paths resolve against the fleet file's folder
    lengths: LengthScale = field(default_factory=LengthScale)
    zipf_s: float = 0.0

    def __post_init__(self):
        if self.zipf_s < 0:
            raise ConfigError("bench.workload.zipf_s must be >= 0")

    def resolve(self, base: Path) -> "BenchWorkload":
        return replace(self, path=str((base / self.path).resolve()))


def load_models_map(path: str | Path) -> dict[str, str]:
    """A YAML or JSON mapping of workload model names to fleet ids."""
    data = json.loads(Path(path).read_text()) if str(path).endswith(".json") \
        else load_yaml(Path(path))
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                             for k, v in data.items()):
        raise ConfigError(f"{path}: expected a mapping of workload model names to fleet ids")
    return data


def default_models_map(names: list[str], fleet_ids: list[str]) -> dict[str, str]:
    """The artifact's `synth_model_K` (sorted by K) onto fleet id K mod n."""
    return {name: fleet_ids[k % len(fleet_ids)] for k, name in enumerate(sorted(set(names)))}


def trace_requests(spec: BenchWorkload, fleet_ids: list[str], *, rate_scale: float = 1.0,
                   duration_s: float | None = None, seed: int = 0,
                   models_map: dict[str, str] | None = None) -> list[WorkloadRequest]:
    """A trace file's requests on the fleet: arrivals divided by `rate_scale`, those past
    `duration_s` dropped, lengths scaled."""
    if rate_scale <= 0:
        raise ValueError(f"rate_scale must be > 0, got {rate_scale}")
    header = csv_header(spec.path)
    if set(AEGAEON_COLUMNS) <= set(header):
        raw = load_aegaeon_csv(spec.path)
        mapping = models_map or default_models_map([r.model for r in raw], fleet_ids)
        unknown = sorted({r.model for r in raw} - set(mapping))
        if unknown:
            raise ConfigError(f"models map: no fleet id for workload model {unknown[0]!r}")
        bad = sorted(set(mapping.values()) - set(fleet_ids))
        if bad:
            raise ConfigError(f"models map: {bad[0]!r} is not a fleet id")
        rows = [(r.arrival_s, mapping[r.model], r.prompt_len, r.output_len) for r in raw]
    elif set(AZURE_COLUMNS) <= set(header):
        arrivals, prompts, outputs = read_azure_trace(spec.path)
        picks = _popular(fleet_ids, len(arrivals), spec.zipf_s or 1.0, seed)
        rows = sorted(zip(arrivals.tolist(), picks, prompts.tolist(), outputs.tolist()),
                      key=lambda row: row[0])
    else:
        raise ConfigError(f"{spec.path}: neither an Aegaeon workload nor an Azure trace "
                          f"(columns {header})")
    return _finish(rows, spec.lengths, rate_scale, duration_s)


def poisson_requests(spec: BenchWorkload, fleet_ids: list[str], rate: float,
                     duration_s: float, seed: int = 0) -> list[WorkloadRequest]:
    """Poisson arrivals at `rate` req/s over the fleet for `duration_s`, lengths resampled
    from the spec's file. The same seed gives the same requests at every rate's count."""
    if rate <= 0 or duration_s <= 0:
        raise ValueError(f"rate and duration must be > 0, got {rate}, {duration_s}")
    pairs = load_length_pairs([spec.path])
    rng = np.random.default_rng(seed)
    count = int(rng.poisson(rate * duration_s))
    arrivals = np.sort(rng.uniform(0.0, duration_s, size=count))
    picks = rng.integers(0, len(pairs), size=count)
    models = _popular(fleet_ids, count, spec.zipf_s, seed + 1)
    rows = [(float(arrivals[i]), models[i], int(pairs[picks[i], 0]), int(pairs[picks[i], 1]))
            for i in range(count)]
    return _finish(rows, spec.lengths, 1.0, None)


def _popular(fleet_ids: list[str], count: int, zipf_s: float, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    ranks = rng.choice(len(fleet_ids), size=count, p=zipf_weights(len(fleet_ids), zipf_s))
    return [fleet_ids[k] for k in ranks]


def _finish(rows, lengths: LengthScale, rate_scale: float,
            duration_s: float | None) -> list[WorkloadRequest]:
    requests = []
    for arrival, model, prompt, output in rows:
        arrival /= rate_scale
        if duration_s is not None and arrival > duration_s:
            break
        prompt, output = lengths.apply(prompt, output)
        requests.append(WorkloadRequest(str(len(requests)), model, arrival, prompt, output))
    return requests


@dataclass(frozen=True, slots=True)
class BenchConfig:
    """The `bench:` block of a fleet file: the scenario `tokenpool bench sweep` runs."""

    workload: BenchWorkload
    rates: list[float]  # the sweep's default arrival rates, requests per second over the fleet
    duration_s: float = 60.0  # arrivals per point; the run then waits for what is in flight
    seed: int = 0

    def __post_init__(self):
        if not self.rates or min(self.rates) <= 0 or self.duration_s <= 0:
            raise ConfigError("bench: rates must be a non-empty list of positive numbers and "
                              "duration_s > 0")
