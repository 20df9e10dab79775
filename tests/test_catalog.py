"""The model catalog advertises the context a worker's engine really takes (DESIGN §7: a
prompt the edge accepts must not be refused by the engine), and the KV pages it holds."""

from __future__ import annotations

import pytest

from tokenpool.controller.catalog import build_catalog
from tokenpool.fleet import load_fleet
from tokenpool.gpu_pool.fleet_weights import FleetModels
from tokenpool.gpu_pool.worker import Worker
from tokenpool.memory.slabs import BLOCK_SIZE
from tokenpool.models.synth import write_synthetic_checkpoint

# 2 layers x 2 KV heads x 16 dims in float32: 8 KiB pages, 8192 positions (512 pages).
SHAPE = dict(num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_synthetic_checkpoint(tmp_path_factory.mktemp("catalog") / "m", **SHAPE)


# Slab rounding bites either way: 3.5 MiB of KV in 1 MiB slabs is 3 slabs; with arena_bytes
# set, the KV region is what the weight slots leave, whatever kv_cache_bytes says.
@pytest.mark.parametrize("memory", ["{slab_bytes: 1MiB}",
                                    "{slab_bytes: 1MiB, arena_bytes: 27MiB}"])
def test_the_catalog_advertises_the_engines_own_context_and_pages(checkpoint, tmp_path,
                                                                   memory):
    path = tmp_path / "fleet.yaml"
    path.write_text(f"models:\n  - {{id: m, source: {checkpoint}}}\n"
                    f"engine: {{dtype: float32, kv_cache_bytes: 3.5MiB}}\nmemory: {memory}\n")
    fleet = load_fleet(path)
    models = FleetModels(fleet)
    card = build_catalog(fleet, models, created=0)["m"]
    worker = Worker(list(models.layouts.values()), lambda model: None, fleet.engine,
                    fleet.memory, models.tokenizers)
    engine = worker.engine("m")
    assert card.max_model_len == engine.max_model_len
    assert card.kv_pages == engine.memory.pages.capacity
    # The old count, KV bytes over page bytes, promised more than the engine holds.
    page_bytes = models.layouts["m"].page_shape.page_bytes
    naive = fleet.engine.kv_cache_bytes // page_bytes * BLOCK_SIZE
    assert card.max_model_len < min(naive, 8192)
