"""Request streams for the simulator: the Aegaeon artifact's CSVs, the Azure trace, a market
(and multi-turn chat sessions with shared prefixes, in chat_workload.py).

Every stream is a list of `WorkloadRequest` sorted by arrival, and every generator is
deterministic for its seed. Model names follow the artifact (`synth_model_K`), so a
simulation config's alias rule maps them onto profiled real models.

The model market reproduces the skew Aegaeon reports for Alibaba Cloud Model Studio: most
models (94%) each see under 0.2 req/s and together carry about 1.35% of requests, while a
Zipf-distributed head of popular models carries the rest.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np

from tokenpool.config import build
from tokenpool.errors import ConfigError

AEGAEON_COLUMNS = ("Request Time", "Model Name", "Input Length", "Output Length")
AZURE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")


@dataclass(frozen=True, slots=True)
class WorkloadRequest:
    request_id: str
    model: str
    arrival_s: float  # since the start of the workload
    prompt_len: int
    output_len: int  # the true length; schedulers never see it
    # The prompt's KV page names (memory.prefix_cache.page_hashes); () when the workload
    # has no token ids, or prefix caching is off.
    page_hashes: tuple[int, ...] = ()


def model_names(num_models: int) -> list[str]:
    """`synth_model_00`.. as in the artifact, wider when there are more than 100 models."""
    width = max(2, len(str(num_models - 1)))
    return [f"synth_model_{k:0{width}d}" for k in range(num_models)]


def zipf_weights(num_models: int, s: float) -> np.ndarray:
    """Popularity of ranks 1..n proportional to rank^-s, summing to 1."""
    if num_models < 1 or s < 0:
        raise ValueError(f"need num_models >= 1 and s >= 0, got {num_models}, {s}")
    weights = np.arange(1, num_models + 1, dtype=np.float64) ** -s
    return weights / weights.sum()


# -- files --------------------------------------------------------------------------------

def parse_clock(text: str) -> float:
    """'HH:MM:SS.mmm' to seconds."""
    hours, minutes, seconds = text.strip().split(":")
    return int(hours) * 3600 + int(minutes) * 60 + float(seconds)


def load_aegaeon_csv(path: str | Path) -> list[WorkloadRequest]:
    """An artifact workload file; request ids are the row numbers in file order."""
    # Plain rows, not DictReader's dicts: the hour at scale has 360,000 of them.
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, [])
        missing = [c for c in AEGAEON_COLUMNS if c not in header]
        if missing:
            raise ValueError(f"{path}: missing column(s) {', '.join(missing)}")
        time, model, prompt, output = (header.index(c) for c in AEGAEON_COLUMNS)
        requests = [WorkloadRequest(str(i), row[model], parse_clock(row[time]),
                                    int(row[prompt]), int(row[output]))
                    for i, row in enumerate(row for row in reader if row)]  # as DictReader
    return sorted(requests, key=lambda r: r.arrival_s)  # stable: file order within a tie


def read_azure_trace(path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(arrival seconds since the first request, prompt lengths, output lengths)."""
    rows = _read_csv(path, AZURE_COLUMNS)
    stamps = np.array([r["TIMESTAMP"].strip().replace(" ", "T") for r in rows],
                      dtype="datetime64[ns]")
    arrivals = (stamps - stamps.min()).astype(np.int64) / 1e9
    prompts = np.array([int(r["ContextTokens"]) for r in rows], dtype=np.int64)
    outputs = np.array([int(r["GeneratedTokens"]) for r in rows], dtype=np.int64)
    return arrivals, prompts, outputs


def load_azure_trace(path: str | Path, num_models: int, zipf_s: float = 1.0,
                     seed: int = 0) -> list[WorkloadRequest]:
    """The single-model Azure trace spread over `num_models` models by Zipf popularity.

    Each request independently goes to rank k with probability ~ k^-zipf_s; rank k is
    `model_names(num_models)[k-1]`. Arrivals and lengths are the trace's own.
    """
    arrivals, prompts, outputs = read_azure_trace(path)
    rng = np.random.default_rng(seed)
    ranks = rng.choice(num_models, size=len(arrivals), p=zipf_weights(num_models, zipf_s))
    order = np.argsort(arrivals, kind="stable")
    names = model_names(num_models)
    return [WorkloadRequest(str(i), names[ranks[j]], float(arrivals[j]), int(prompts[j]),
                            int(outputs[j])) for i, j in enumerate(order)]


def load_length_pairs(paths: list[str | Path]) -> np.ndarray:
    """(prompt, output) length pairs pooled from Aegaeon CSVs and/or Azure traces."""
    pairs = []
    for path in paths:
        header = csv_header(path)
        if set(AEGAEON_COLUMNS) <= set(header):
            pairs += [(r.prompt_len, r.output_len) for r in load_aegaeon_csv(path)]
        elif set(AZURE_COLUMNS) <= set(header):
            _, prompts, outputs = read_azure_trace(path)
            pairs += list(zip(prompts.tolist(), outputs.tolist()))
        else:
            raise ValueError(f"{path}: neither an Aegaeon workload nor an Azure trace "
                             f"(columns {header})")
    if not pairs:
        raise ValueError("no length pairs in " + ", ".join(map(str, paths)))
    return np.array(pairs, dtype=np.int64)


def csv_header(path: str | Path) -> list[str]:
    with open(path, newline="") as f:
        return next(csv.reader(f), [])


def _read_csv(path: str | Path, columns: tuple[str, ...]) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in columns if c not in (reader.fieldnames or ())]
        if missing:
            raise ValueError(f"{path}: missing column(s) {', '.join(missing)}")
        return list(reader)


# -- the model market ---------------------------------------------------------------------

def market_rates(num_models: int, total_rate: float, tail_fraction: float = 0.94,
                 tail_share: float = 0.0135, zipf_s: float = 1.0) -> np.ndarray:
    """Requests per second of each model, most popular first.

    The head (the first `1 - tail_fraction` of models) splits `1 - tail_share` of the traffic
    by Zipf; the tail splits `tail_share` by the same Zipf law continued over its ranks, so
    popularity keeps falling smoothly from head to tail.
    """
    if not 0 < tail_fraction < 1 or not 0 <= tail_share < 1 or total_rate <= 0:
        raise ValueError("need 0 < tail_fraction < 1, 0 <= tail_share < 1, total_rate > 0")
    num_tail = round(num_models * tail_fraction)
    num_head = num_models - num_tail
    if num_head < 1 or num_tail < 1:
        raise ValueError(f"{num_models} models leave no head or no tail at {tail_fraction}")
    law = np.arange(1, num_models + 1, dtype=np.float64) ** -zipf_s
    head = law[:num_head] / law[:num_head].sum() * (1 - tail_share)
    tail = law[num_head:] / law[num_head:].sum() * tail_share
    return np.concatenate([head, tail]) * total_rate


def market_workload(num_models: int, duration_s: float, seed: int, *, total_rate: float,
                    lengths: np.ndarray, tail_fraction: float = 0.94,
                    tail_share: float = 0.0135, tail_max_rate: float = 0.2,
                    zipf_s: float = 1.0) -> list[WorkloadRequest]:
    """Poisson arrivals per model at `market_rates`, lengths resampled from `lengths` pairs.

    Raises ValueError unless `tail_max_rate` splits head from tail (every tail model below
    it, every head model at or above it), so "94% of models see under 0.2 req/s" holds.
    """
    rates = market_rates(num_models, total_rate, tail_fraction, tail_share, zipf_s)
    _check_split(rates, round(num_models * tail_fraction), tail_max_rate)
    return poisson_workload(rates, duration_s, seed, lengths)


def write_aegaeon_csv(requests: list[WorkloadRequest], path: str | Path) -> None:
    """The artifact's CSV format, so generated workloads sweep like the given ones."""
    lines = [",".join(AEGAEON_COLUMNS)]
    for r in requests:
        ms = round(r.arrival_s * 1000)
        clock = f"{ms // 3_600_000:02d}:{ms // 60_000 % 60:02d}:{ms // 1000 % 60:02d}.{ms % 1000:03d}"
        lines.append(f"{clock},{r.model},{r.prompt_len},{r.output_len}")
    Path(path).write_text("\n".join(lines) + "\n")


def poisson_workload(rates: np.ndarray, duration_s: float, seed: int,
                     lengths: np.ndarray) -> list[WorkloadRequest]:
    """Poisson arrivals at `rates[k]` req/s for model k, lengths resampled from `lengths`."""
    num_models = len(rates)
    rng = np.random.default_rng(seed)
    counts = rng.poisson(rates * duration_s)
    models = np.repeat(np.arange(num_models), counts)
    # A Poisson process's arrivals, given their count, are uniform over the window.
    arrivals = rng.uniform(0.0, duration_s, size=len(models))
    picks = rng.integers(0, len(lengths), size=len(models))
    order = np.lexsort((models, arrivals))
    names = model_names(num_models)
    return [WorkloadRequest(str(i), names[models[j]], float(arrivals[j]),
                            int(lengths[picks[j], 0]), int(lengths[picks[j], 1]))
            for i, j in enumerate(order)]


def _check_split(rates: np.ndarray, num_tail: int, tail_max_rate: float) -> None:
    """Every tail model below `tail_max_rate` and every head model at or above it."""
    busiest_tail, quietest_head = rates[-num_tail:].max(), rates[:-num_tail].min()
    if busiest_tail >= tail_max_rate:
        raise ValueError(f"the busiest tail model gets {busiest_tail:.3f} req/s, not below "
                         f"tail_max_rate {tail_max_rate}: lower total_rate or tail_share")
    if quietest_head < tail_max_rate:
        raise ValueError(f"the quietest head model gets {quietest_head:.3f} req/s, below "
                         f"tail_max_rate {tail_max_rate}: raise total_rate or lower zipf_s")


# -- the `workload:` block of a simulation config -----------------------------------------

@dataclass(frozen=True, slots=True)
class AegaeonWorkload:
    kind: Literal["aegaeon"]
    path: str  # relative paths resolve against the config file

    def resolve(self, base: Path) -> "AegaeonWorkload":
        return replace(self, path=str((base / self.path).resolve()))

    def requests(self) -> list[WorkloadRequest]:
        return load_aegaeon_csv(self.path)


@dataclass(frozen=True, slots=True)
class AzureWorkload:
    kind: Literal["azure"]
    path: str
    num_models: int
    zipf_s: float = 1.0
    seed: int = 0

    def __post_init__(self):
        zipf_weights(self.num_models, self.zipf_s)  # raises on a bad count or exponent

    def resolve(self, base: Path) -> "AzureWorkload":
        return replace(self, path=str((base / self.path).resolve()))

    def requests(self) -> list[WorkloadRequest]:
        return load_azure_trace(self.path, self.num_models, self.zipf_s, self.seed)


@dataclass(frozen=True, slots=True)
class MarketWorkload:
    kind: Literal["market"]
    num_models: int
    duration_s: float
    total_rate: float  # requests per second over all models
    lengths: list[str]  # Aegaeon CSVs and/or Azure traces whose length pairs are resampled
    tail_fraction: float = 0.94
    tail_share: float = 0.0135
    tail_max_rate: float = 0.2
    zipf_s: float = 1.0
    seed: int = 0

    def __post_init__(self):
        # Checked at load, so a market that is not a long tail fails before a long run.
        if self.duration_s <= 0 or not self.lengths:
            raise ValueError("duration_s must be positive and lengths must name a file")
        rates = market_rates(self.num_models, self.total_rate, self.tail_fraction,
                             self.tail_share, self.zipf_s)
        _check_split(rates, round(self.num_models * self.tail_fraction), self.tail_max_rate)

    def resolve(self, base: Path) -> "MarketWorkload":
        return replace(self, lengths=[str((base / p).resolve()) for p in self.lengths])

    def requests(self) -> list[WorkloadRequest]:
        return market_workload(
            self.num_models, self.duration_s, self.seed, total_rate=self.total_rate,
            lengths=load_length_pairs(self.lengths), tail_fraction=self.tail_fraction,
            tail_share=self.tail_share, tail_max_rate=self.tail_max_rate, zipf_s=self.zipf_s)


WorkloadSpec = AegaeonWorkload | AzureWorkload | MarketWorkload
_KINDS = {"aegaeon": AegaeonWorkload, "azure": AzureWorkload, "market": MarketWorkload}


def build_workload(data, path: str = "workload") -> WorkloadSpec:
    """Build the spec its `kind` names, so errors name that kind's keys."""
    # Imported here: the chat workload builds on this module's request type.
    from tokenpool.sim.chat_workload import ChatWorkload

    kinds = {**_KINDS, "chat": ChatWorkload}
    kind = data.get("kind") if isinstance(data, dict) else None
    if kind not in kinds:
        raise ConfigError(f"{path}.kind: expected one of {', '.join(kinds)}, got {kind!r}")
    return build(kinds[kind], data, path)
