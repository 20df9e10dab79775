"""Short timing runs on a worker's engines: the samples the controller fits its cost model to.

Sampling is the worker's (it runs engines); the numeric fit is the controller's
(controller/cost_fit.py), so a worker only ever returns numbers.
"""

from __future__ import annotations

import itertools
import statistics
import time
from dataclasses import dataclass

Point = tuple[float, float, float]  # (x, y, seconds) for a line a + b*x + c*y


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
    runs = itertools.count(1)  # each run's prompts start with its own token: no cache hits
    _run(engine, [8], 2, 0)  # warm-up: first-use kernel builds and allocations
    budget = min(engine.config.max_num_batched_tokens, engine.max_model_len - 1)
    prefill = []
    for length, batch in itertools.product(plan.prompt_lens, plan.prefill_batches):
        if length * batch > budget or batch > engine.config.max_num_seqs:
            continue
        for _ in range(plan.repeats):
            seconds = _run(engine, [length] * batch, 1, next(runs))[0]
            prefill.append((length * batch, batch * length * length, seconds))
    decode = []
    for length, batch in itertools.product(plan.decode_prompt_lens, plan.decode_batches):
        if length * batch > budget or batch > engine.config.max_num_seqs:
            continue
        steps = _run(engine, [length] * batch, plan.decode_steps + 1, next(runs))[1:]
        context = batch * (length + (len(steps) + 1) // 2)  # mid-run: steps share one point
        decode += [(batch, context, seconds) for seconds in steps]
    return prefill, decode


def _run(engine, prompt_lens: list[int], max_tokens: int, run: int) -> list[float]:
    """Run prompts to completion, timing each engine step (the first is their prefill).
    Prompts of different `run`s differ in their first token, so a prefill never finds an
    earlier run's pages in the prefix cache and is timed in full."""
    from tokenpool.sampling import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    vocab = engine.model_config.vocab_size
    for i, length in enumerate(prompt_lens):
        prompt = [(7 * i + j) % (vocab - 1) + 1 for j in range(length)]
        prompt[0] = run % (vocab - 1) + 1
        engine.add_request(prompt, params)
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
    cfg = engine.model_config
    itemsize = engine.dtype.itemsize
    kv_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * itemsize
    return engine.weight_bytes, kv_per_token


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
    return nbytes / statistics.median(times)


@dataclass(frozen=True, slots=True)
class EngineSamples:
    """One model shape's samples and sizes, as `sample_engine` and `engine_sizes` give them."""

    prefill: list[Point]  # (total prompt tokens, sum of squared prompt lengths, seconds)
    decode: list[Point]  # (batch size, total context tokens, seconds per step)
    weight_bytes: int
    kv_bytes_per_token: int


@dataclass(frozen=True, slots=True)
class WorkerProfile:
    """What a worker measured of itself: samples per model, its copy speed and KV room."""

    models: dict[str, EngineSamples]
    copy_bytes_per_s: float
    kv_capacity_bytes: int


def profile_worker(worker, plan: EngineProfilePlan = EngineProfilePlan()) -> WorkerProfile:
    """Samples of every model of `worker`, one engine per shape.

    Models of one shape, dtype and packing (aliases of one checkpoint, say) cost the same, so one
    engine per shape is sampled and its samples shared. Leaves the last sampled model
    switched in. Takes a few seconds per shape on CPU.
    """
    by_shape: dict[tuple, EngineSamples] = {}
    models = {}
    for model_id, engine in worker.engines.items():
        shape = (engine.model_config, engine.dtype, worker.memory.models[model_id].index)
        if shape not in by_shape:
            worker.switch(model_id)
            by_shape[shape] = EngineSamples(*sample_engine(engine, plan), *engine_sizes(engine))
        models[model_id] = by_shape[shape]
    return WorkerProfile(models, measure_copy_bytes_per_s(), worker.memory.layout.kv.size)
