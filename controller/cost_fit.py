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
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tokenpool.schedulers.cost import Linear3, ModelCost

# The GPU profiles ran vLLM with 4096 batched tokens. Larger batches were prefilled in
# chunks: their "prefill" latency is a flat 4096-token chunk (~0.19 s for Llama-2-13B) and
# their decode steps carry the rest, and i4096b2 reports 0.4 ms decode steps (its requests
# overran the context). The artifact drops the same points (`ilen * bs <= max_model_len`).
PROFILE_TOKEN_BUDGET = 4096
_PROFILE_NAME = re.compile(r"^i(\d+)b(\d+)\.json$")

Point = tuple[float, float, float]  # (x, y, seconds) for a line a + b*x + c*y


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


@dataclass(frozen=True, slots=True)
class EngineProfilePlan:
    """What `profile_engine` runs; the defaults take a few seconds for a 135M model on CPU."""

    prompt_lens: tuple[int, ...] = (16, 64, 256)
    prefill_batches: tuple[int, ...] = (1, 4)
    decode_batches: tuple[int, ...] = (1, 4, 16)
    decode_prompt_lens: tuple[int, ...] = (16, 128)  # two, so batch and context separate
    decode_steps: int = 4
    repeats: int = 3


def sample_engine(engine, plan: EngineProfilePlan = EngineProfilePlan()
                  ) -> tuple[list[Point], list[Point]]:
    """Time prefills and decode steps on an idle `LLMEngine`; returns raw samples."""
    if engine.has_unfinished():
        raise RuntimeError("profile an idle engine: it has requests in flight")
    _run(engine, [8], max_tokens=2)  # warm-up: first-use kernel builds and allocations
    budget = min(engine.config.max_num_batched_tokens, engine.max_model_len - 1)
    prefill = []
    for length, batch in itertools.product(plan.prompt_lens, plan.prefill_batches):
        if length * batch > budget or batch > engine.config.max_num_seqs:
            continue
        for _ in range(plan.repeats):
            seconds = _run(engine, [length] * batch, max_tokens=1)[0]
            prefill.append((length * batch, batch * length * length, seconds))
    decode = []
    for length, batch in itertools.product(plan.decode_prompt_lens, plan.decode_batches):
        if length * batch > budget or batch > engine.config.max_num_seqs:
            continue
        steps = _run(engine, [length] * batch, max_tokens=plan.decode_steps + 1)[1:]
        context = batch * (length + (len(steps) + 1) // 2)  # mid-run: steps share one point
        decode += [(batch, context, seconds) for seconds in steps]
    return prefill, decode


def _run(engine, prompt_lens: list[int], max_tokens: int) -> list[float]:
    """Run prompts to completion, timing each engine step (the first is their prefill)."""
    from tokenpool.sampling import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    vocab = engine.model_config.vocab_size
    for i, length in enumerate(prompt_lens):
        engine.add_request([(7 * i + j) % (vocab - 1) + 1 for j in range(length)], params)
    times = []
    while engine.has_unfinished():
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
        if len(times) == 1 and engine.waiting:
            raise RuntimeError(f"{len(prompt_lens)} prompts of {prompt_lens[0]} tokens do not "
                               "fit one step of this engine: profile smaller batches")
    return times


def engine_sizes(engine) -> tuple[int, int]:
    """(weight bytes as packed in a weight slot, KV bytes per token) of an engine's model."""
    from tokenpool.gpu_pool.weights import packed_index

    cfg = engine.model_config
    itemsize = engine.dtype.itemsize
    kv_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * itemsize
    return packed_index(cfg, engine.dtype).nbytes, kv_per_token


def profile_engine(engine, plan: EngineProfilePlan = EngineProfilePlan()) -> ModelCost:
    """A short profile of a real engine, fitted into the cost model's ModelCost."""
    return fit_cpu_profile(*sample_engine(engine, plan)).model_cost(*engine_sizes(engine))


def measure_copy_bytes_per_s(nbytes: int = 64 << 20, repeats: int = 5) -> float:
    """A CPU worker's "host-to-device" bandwidth: one large memcpy, as a switch does."""
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8)
    dst = torch.empty_like(src)
    dst.copy_(src)  # touch the pages first: a first copy measures page faults
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    return nbytes / trimmed_mean(times)


def worker_cost_model(worker, plan: EngineProfilePlan = EngineProfilePlan()):
    """A CostModel for a real worker: its engines profiled, switches at memcpy speed.

    Models of one shape and dtype (aliases of one checkpoint, say) cost the same, so one
    engine per shape is profiled and its fit shared. Leaves the last profiled model switched
    in. Takes a few seconds per shape on CPU.
    """
    from tokenpool.schedulers.cost import CostModel

    fits: dict[tuple, ModelCost] = {}
    costs = {}
    for model_id, engine in worker.engines.items():
        shape = (engine.model_config, engine.dtype)
        if shape not in fits:
            worker.switch(model_id)
            fits[shape] = profile_engine(engine, plan)
        costs[model_id] = fits[shape]
    return CostModel(costs, measure_copy_bytes_per_s(), worker.memory.layout.kv.size)
