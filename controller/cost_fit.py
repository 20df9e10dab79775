"""Fit the cost model's latency lines to profiles: measured GPUs, or our own CPU engine.

As the Aegaeon artifact does, each profiled configuration's samples lose their min and max and
the rest are averaged into one point. Every configuration has the same number of samples, so
least squares over the individual samples would give the same line; one point per
configuration also makes the fit quality read per configuration.

Two choices differ from the artifact's plain `LinearRegression`, both for accuracy at the small
batches where TBT is decided (numbers in tests/test_cost_model.py):
- Relative least squares: latencies span 25x (8 ms to 200 ms), and plain least squares trades a
  30-40% miss on small batches for a slightly better fit on big ones. Minimising relative
  error fits both within ~10%.
- Non-negative coefficients: more tokens or more context never makes a step faster. A free fit
  sometimes returns a slightly negative context term, which extrapolates to nonsense for long
  contexts.
"""

from __future__ import annotations

import functools
import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tokenpool.gpu_pool.profiling import (EngineProfilePlan, Point, WorkerProfile, engine_sizes,
                                          sample_engine)
from tokenpool.schedulers.cost import CostModel, Linear3, ModelCost

# The GPU profiles ran vLLM with 4096 batched tokens. Larger batches were prefilled in
# chunks: their "prefill" latency is a flat 4096-token chunk (~0.19 s for Llama-2-13B) and
# their decode steps carry the rest, and i4096b2 reports 0.4 ms decode steps (its requests
# overran the context). The artifact drops the same points (`ilen * bs <= max_model_len`).
PROFILE_TOKEN_BUDGET = 4096
_PROFILE_NAME = re.compile(r"^i(\d+)b(\d+)\.json$")

@dataclass(frozen=True, slots=True)
class FitQuality:
    rel_rms: float  # root mean square of (predicted - measured) / measured over the points
    rel_max: float
    points: int


@dataclass(frozen=True, slots=True)
class LatencyFit:
    prefill: Linear3  # (total prompt tokens, sum of squared prompt lengths) -> seconds
    decode: Linear3  # (batch size, total context tokens) -> seconds per step
    prefill_quality: FitQuality
    decode_quality: FitQuality

    def model_cost(self, weight_bytes: int, kv_bytes_per_token: int) -> ModelCost:
        return ModelCost(self.prefill, self.decode, weight_bytes, kv_bytes_per_token)


def trimmed_mean(samples: list[float]) -> float:
    """Mean without the min and the max (the paper's filter); plain mean below 3 samples."""
    ordered = sorted(samples)
    kept = ordered[1:-1] if len(ordered) >= 3 else ordered
    return sum(kept) / len(kept)


def fit_linear3(points: list[Point]) -> tuple[Linear3, FitQuality]:
    """Non-negative relative least squares of `seconds ~ a + b*x + c*y`."""
    data = np.asarray(points, dtype=np.float64)
    if data.ndim != 2 or len(data) < 3 or (data[:, 2] <= 0).any():
        raise ValueError("need at least 3 points with positive durations")
    design = np.column_stack([np.ones(len(data)), data[:, 0], data[:, 1]])
    scale = np.abs(design).max(axis=0)
    scale[scale == 0] = 1.0  # a constant-zero column (all prompts of length 0) stays zero
    weighted = design / scale / data[:, 2:3]  # rows divided by the measured time: relative
    coef = _nonnegative_lstsq(weighted, np.ones(len(data))) / scale
    line = Linear3(*map(float, coef))
    rel = design @ coef / data[:, 2] - 1.0
    quality = FitQuality(float(np.sqrt(np.mean(rel**2))), float(np.abs(rel).max()), len(data))
    return line, quality


def _nonnegative_lstsq(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Exact NNLS for three columns: the best unconstrained fit over feasible supports."""
    best, best_err = np.zeros(a.shape[1]), float(np.sum(b**2))
    for size in (1, 2, 3):
        for cols in itertools.combinations(range(a.shape[1]), size):
            sub, *_ = np.linalg.lstsq(a[:, cols], b, rcond=None)
            if (sub < 0).any():
                continue
            coef = np.zeros(a.shape[1])
            coef[list(cols)] = sub
            err = float(np.sum((a @ coef - b) ** 2))
            if err < best_err:
                best, best_err = coef, err
    return best


def fit_latency(prefill_points: list[Point], decode_points: list[Point]) -> LatencyFit:
    prefill, prefill_quality = fit_linear3(prefill_points)
    decode, decode_quality = fit_linear3(decode_points)
    return LatencyFit(prefill, decode, prefill_quality, decode_quality)


# -- measured GPU profiles ----------------------------------------------------------------

def load_gpu_profile(profile_dir: str | Path, model: str, device: str,
                     max_batch_tokens: int = PROFILE_TOKEN_BUDGET
                     ) -> tuple[list[Point], list[Point]]:
    """Prefill points (t, s, s) and decode points (batch, context, s) of MODEL/DEVICE/*.json."""
    folder = Path(profile_dir) / model / device
    files = sorted(folder.glob("i*b*.json"))
    if not files:
        raise FileNotFoundError(f"no profiles iLENbBATCH.json in {folder}")
    prefill, decode = [], []
    for path in files:
        match = _PROFILE_NAME.match(path.name)
        if not match:
            continue
        length, batch = map(int, match.groups())
        if length * batch > max_batch_tokens:
            continue
        data = json.loads(path.read_text())
        prefill.append((length * batch, batch * length**2,
                        trimmed_mean(data["prefill_latencies"])))
        decode.append((batch, batch * length, trimmed_mean(data["decode_latencies"])))
    return prefill, decode


@functools.lru_cache(maxsize=None)
def fit_gpu_profile(profile_dir: Path, model: str, device: str) -> LatencyFit:
    """The fitted lines of one model on one GPU kind; cached per process."""
    return fit_latency(*load_gpu_profile(profile_dir, model, device))


# -- our own engine on CPU ----------------------------------------------------------------

def fit_cpu_profile(prefill_samples: list[Point], decode_samples: list[Point]) -> LatencyFit:
    """Fit samples measured on our engine: (t, s, seconds) and (batch, context, seconds).

    Repeated samples of one configuration are reduced as GPU profiles are: drop the min and
    max, average the rest.
    """
    return fit_latency(_reduce(prefill_samples), _reduce(decode_samples))


def _reduce(samples: list[Point]) -> list[Point]:
    groups: dict[tuple[float, float], list[float]] = {}
    for x, y, seconds in samples:
        groups.setdefault((x, y), []).append(seconds)
    return [(x, y, trimmed_mean(times)) for (x, y), times in groups.items()]


def profile_engine(engine, plan: EngineProfilePlan = EngineProfilePlan()) -> ModelCost:
    """A short profile of a real engine, fitted into the cost model's ModelCost."""
    return fit_cpu_profile(*sample_engine(engine, plan)).model_cost(*engine_sizes(engine))


def cost_model_of(profile: WorkerProfile) -> CostModel:
    """The policy's CostModel from a worker's profile: each model's lines fitted, switches at
    the worker's measured copy speed."""
    fits: dict[int, ModelCost] = {}  # samples shared by models of one shape are fitted once
    costs = {}
    for model_id, samples in profile.models.items():
        if id(samples) not in fits:
            fits[id(samples)] = fit_cpu_profile(samples.prefill, samples.decode).model_cost(
                samples.weight_bytes, samples.kv_bytes_per_token)
        costs[model_id] = fits[id(samples)]
    return CostModel(costs, profile.copy_bytes_per_s, profile.kv_capacity_bytes)
