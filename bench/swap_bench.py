"""`tokenpool bench swap`: what a model switch costs (the measures: cli/bench.py's help)."""

from __future__ import annotations

import dataclasses
import statistics
import time
from pathlib import Path

import torch

from tokenpool.gpu_pool.fleet_weights import FleetModels, FleetWeights
from tokenpool.gpu_pool.worker import Worker
from tokenpool.memory.host_cache import HostModelCache
from tokenpool.sampling import SamplingParams


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def switch_and_memcpy_seconds(worker: Worker, a: str, b: str,
                              repeats: int) -> tuple[list[float], list[float]]:
    """Alternate a and b, timing a plain copy of the target's size before each switch.

    Interleaved so both see the same machine load. The worker has one weight slot, so
    every switch copies. The plain copy goes from ordinary (pinned on CUDA) host memory to
    device memory, the kind of buffers a switch copies between. Models of two families
    differ in size, so each switch has its own bound.
    """
    sizes = {m: worker.memory.models[m].index.nbytes for m in (a, b)}
    device = worker.device
    src = torch.ones(max(sizes.values()), dtype=torch.uint8, pin_memory=device.type == "cuda")
    dst = torch.zeros(max(sizes.values()), dtype=torch.uint8, device=device)
    dst.copy_(src)  # first touch
    worker.switch(a)
    switches, copies = [], []
    for i in range(repeats):
        target = b if i % 2 == 0 else a
        n = sizes[target]
        copies.append(_timed(lambda: dst[:n].copy_(src[:n]), device))
        switches.append(_timed(lambda: worker.switch(target), device))
        assert worker.slots.holds == [target]
    return switches, copies


def prefetched_switch_seconds(worker: Worker, a: str, b: str, repeats: int) -> list[float]:
    """Prefetch the other model, wait for the copy, then time the switch itself."""
    worker.switch(a)
    times = []
    for i in range(repeats):
        target = b if i % 2 == 0 else a
        worker.prefetch(target)
        worker.slots.wait_prefetch()
        _sync(worker.device)
        start = time.perf_counter()
        record = worker.switch(target)
        times.append(time.perf_counter() - start)
        assert record.prefetched, "the switch copied: prefetch did not land"
    return times


def kv_swap_gbps(worker: Worker, model_id: str, prompt_len: int, repeats: int) -> float:
    """Swap one prefilled sequence out and back in; bytes moved per second, median."""
    engine = worker.engine(model_id)
    worker.switch(model_id)
    prompt = [(7 * i) % engine.model_config.vocab_size for i in range(prompt_len)]
    request_id = engine.add_request(prompt, SamplingParams(max_tokens=2, ignore_eos=True))
    engine.step()  # the prefill: the sequence now owns its pages
    rates = []
    for _ in range(repeats):
        _sync(worker.device)
        start = time.perf_counter()
        moved = engine.swapper.swap_out(request_id) + engine.swapper.swap_in(request_id)
        _sync(worker.device)
        rates.append(moved / (time.perf_counter() - start) / 1e9)
    engine.abort(request_id)
    return statistics.median(rates)


def hf_load_seconds(path: Path, dtype: torch.dtype) -> float:
    """transformers from_pretrained of the same checkpoint, with its file already cached."""
    from tokenpool.bench.hf_reference import load_hf_model

    for f in ([path] if path.is_file() else sorted(path.iterdir())):
        if f.is_file():
            f.read_bytes()  # page cache warm
    start = time.perf_counter()
    model = load_hf_model(path, dtype)
    seconds = time.perf_counter() - start
    del model
    return seconds


def make_worker(models: FleetModels, weights: FleetWeights, ids: list[str],
                prefetch: bool) -> Worker:
    fleet = models.fleet
    memory = dataclasses.replace(fleet.memory, prefetch=prefetch)
    return Worker([models.layouts[i] for i in ids], weights.host_bytes, fleet.engine, memory,
                  {i: models.tokenizers[i] for i in ids})


def host_cache_for(fleet, namespace: str) -> HostModelCache:
    return HostModelCache(fleet.memory.host_cache_bytes, namespace,
                          root=fleet.memory.host_cache_dir)


def with_alias(fleet, model_id: str):
    """The fleet plus a second id for `model_id`'s checkpoint: an alias is its own model."""
    spec = fleet.model(model_id)
    alias = dataclasses.replace(spec, id=f"{model_id}-alias")
    return dataclasses.replace(fleet, models=[*fleet.models, alias]), alias.id


def bytes_by_format(index) -> dict[str, int]:
    """A packed index's tensor bytes per format (float dtype or quant_formats name), padding
    between entries left out."""
    sizes: dict[str, int] = {}
    for entry in index.entries:
        sizes[entry.dtype] = sizes.get(entry.dtype, 0) + entry.nbytes
    return dict(sorted(sizes.items()))


def run(fleet, a: str, b: str, repeats: int, hf: bool, namespace: str) -> dict:
    models = FleetModels(fleet)
    cache = host_cache_for(fleet, namespace)
    try:
        weights = FleetWeights(models, cache)
        weights.populate()
        return _measure(models, weights, a, b, repeats, hf)
    finally:
        cache.close()
        cache.destroy()


def _measure(models, weights, a, b, repeats, hf) -> dict:
    layout = models.layouts[a]
    nbytes = layout.index.nbytes
    worker = make_worker(models, weights, [a, b], prefetch=False)
    device = worker.device
    switches, copies = switch_and_memcpy_seconds(worker, a, b, repeats)
    targets = [b if i % 2 == 0 else a for i in range(repeats)]  # as the switches alternate
    memcpy_gbps = statistics.median(models.layouts[t].index.nbytes / c / 1e9
                                    for t, c in zip(targets, copies))
    kv_gbps = kv_swap_gbps(worker, a, min(1024, worker.engine(a).max_model_len - 8), repeats)
    del worker
    worker = make_worker(models, weights, [a, b], prefetch=True)
    prefetched = prefetched_switch_seconds(worker, a, b, repeats)
    del worker
    switch_s = statistics.median(switches)
    hf_s = hf_load_seconds(models.sources[a], layout.dtype) if hf else None
    quant = {m: models.fleet.engine_config(m).quantization for m in (a, b)}
    return {
        "models": [a, b], "device": str(device), "dtype": str(layout.dtype).split(".")[-1],
        "families": [models.layouts[m].config.model_type for m in (a, b)],
        "quant": quant[a],
        "quant_by_model": quant,
        "weight_bytes": nbytes,
        "weight_bytes_by_format": bytes_by_format(layout.index),
        "switch_bytes": {m: models.layouts[m].index.nbytes for m in (a, b)},
        "memcpy_gbps": memcpy_gbps,
        "switch_s": switch_s,
        "switch_s_all": switches,
        "switch_s_by_target": {m: statistics.median(s for t, s in zip(targets, switches)
                                                    if t == m) for m in (a, b)},
        "memcpy_s_all": copies,
        "prefetched_switch_s": statistics.median(prefetched),
        "prefetched_switch_s_all": prefetched,
        "hf_load_s": hf_s,
        # each switch against the plain copy of its own bytes (sizes differ across families)
        "ratio_to_memcpy_bound": statistics.median(s / c for s, c in zip(switches, copies)),
        "speedup_vs_hf_load": hf_s / switch_s if hf_s else None,
        "kv_swap_gbps": kv_gbps,
        "repeats": repeats,
    }
