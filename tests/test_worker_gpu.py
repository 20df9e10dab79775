"""The CUDA path of issue 3: pinned staging, side-stream copies, events (skipped without CUDA)."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from test_worker import GREEDY, PROMPTS, fleet_yaml
from tokenpool.fleet import load_fleet
from tokenpool.gpu_pool.fleet_weights import FleetModels, FleetWeights
from tokenpool.gpu_pool.weight_copy import WeightCopier
from tokenpool.gpu_pool.worker import Worker
from tokenpool.memory.host_cache import HostModelCache

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def cuda_worker(tmp_path_factory):
    path = fleet_yaml(tmp_path_factory.mktemp("gpu-fleet"), "{slab_bytes: 4MiB}")
    fleet = load_fleet(path)
    fleet = dataclasses.replace(fleet, engine=dataclasses.replace(fleet.engine, device="cuda"))
    models = FleetModels(fleet)
    cache = HostModelCache(fleet.memory.host_cache_bytes, f"gpu{os.getpid()}")
    weights = FleetWeights(models, cache)
    weights.populate(progress=False)
    worker = Worker(list(models.layouts.values()), weights.host_bytes, fleet.engine,
                    fleet.memory, models.tokenizers)
    yield worker
    worker.close()
    cache.close()
    cache.destroy()


def test_chunked_staged_copy_is_exact():
    copier = WeightCopier(torch.device("cuda"), chunk_bytes=1 << 20)
    src = torch.randint(0, 256, (5 * (1 << 20) + 123,), dtype=torch.uint8)
    dst = torch.zeros_like(src, device="cuda")
    copier.wait(copier.copy(src, dst))
    assert torch.equal(dst.cpu(), src)


def test_switches_keep_outputs_and_allocate_nothing(cuda_worker):
    first = {}
    for model_id in cuda_worker.engines:
        cuda_worker.switch(model_id)
        first[model_id] = cuda_worker.engine(model_id).generate(PROMPTS, GREEDY)
    torch.cuda.synchronize()
    allocated = torch.cuda.memory_allocated()
    for model_id in ["synth-a", "smollm2", "synth-b", "smollm2"]:
        cuda_worker.switch(model_id)
        torch.cuda.synchronize()
        assert torch.cuda.memory_allocated() == allocated  # switches allocate nothing
        assert cuda_worker.engine(model_id).generate(PROMPTS, GREEDY) == first[model_id]


def test_prefetch_overlaps_compute_and_lands(cuda_worker):
    cuda_worker.switch("synth-a")
    engine = cuda_worker.engine("synth-a")
    expected = engine.generate(PROMPTS, GREEDY)
    cuda_worker.prefetch("smollm2")
    assert engine.generate(PROMPTS, GREEDY) == expected  # computing while the copy runs
    record = cuda_worker.switch("smollm2")
    assert record.prefetched and record.bytes_copied == 0


def test_kv_swap_round_trip_through_pinned_host_slabs(cuda_worker):
    cuda_worker.switch("smollm2")
    engine = cuda_worker.engine("smollm2")
    assert cuda_worker.memory.swap_region.is_pinned()
    rid = engine.add_request(PROMPTS[0], GREEDY)
    engine.step()
    table = list(engine.blocks.block_table(rid))
    before = torch.cat([engine.memory.kv.page_bytes_view(p).cpu() for p in table])
    engine.swap_out([rid])
    engine.swapper.swap_in(rid)
    after = torch.cat([engine.memory.kv.page_bytes_view(p).cpu()
                       for p in engine.blocks.block_table(rid)])
    assert torch.equal(before, after)
    engine.abort(rid)
