"""The start-up profile cache: a round trip is exact, and anything unreadable is a miss."""

from __future__ import annotations

import dataclasses

from tokenpool.gpu_pool.profiling import EngineProfilePlan
from tokenpool.controller.profile_cache import load_profile, profile_key, save_profile
from tokenpool.fleet import load_fleet
from tokenpool.gpu_pool.fleet_weights import FleetModels
from tokenpool.schedulers.cost import CostModel, Linear3, ModelCost


def cost_model() -> CostModel:
    a = ModelCost(Linear3(0.01, 2e-4, 1e-8), Linear3(0.02, 1e-3, 3e-7), 538060032, 46080)
    b = ModelCost(Linear3(0.001, 1e-5, 0.0), Linear3(0.003, 1e-4, 0.0), 1 << 20, 512)
    return CostModel({"m-a": a, "m-a2": a, "m-b": b}, 13.9e9, 512 << 20)


def test_a_saved_profile_loads_back_equal(tmp_path):
    path = tmp_path / "p.json"
    save_profile(path, cost_model())
    assert load_profile(path) == cost_model()
    assert not list(tmp_path.glob("*.tmp"))


def test_missing_or_corrupt_profiles_are_misses(tmp_path):
    assert load_profile(tmp_path / "none.json") is None
    (tmp_path / "bad.json").write_text('{"models": {"m": {"prefill": [1]}}}')
    assert load_profile(tmp_path / "bad.json") is None


def test_the_key_changes_with_what_the_costs_depend_on(tmp_path):
    (tmp_path / "f.yaml").write_text(
        "models:\n  - {id: s, source: 'synth:2,64,4,2@1'}\n"
        f"engine: {{dtype: float32}}\nmemory: {{host_cache_dir: {tmp_path}}}\n")
    fleet = load_fleet(tmp_path / "f.yaml")
    plan = EngineProfilePlan()
    key = profile_key(fleet, FleetModels(fleet), plan)
    assert key == profile_key(fleet, FleetModels(fleet), plan)
    bf16 = dataclasses.replace(fleet, engine=dataclasses.replace(fleet.engine, dtype="bfloat16"))
    assert profile_key(bf16, FleetModels(bf16), plan) != key
    int8 = dataclasses.replace(fleet, engine=dataclasses.replace(fleet.engine,
                                                                 quantization="int8"))
    assert profile_key(int8, FleetModels(int8), plan) != key
    assert profile_key(fleet, FleetModels(fleet), dataclasses.replace(plan, repeats=9)) != key
    threads = dataclasses.replace(fleet, pool=dataclasses.replace(fleet.pool, torch_threads=2))
    assert profile_key(threads, FleetModels(threads), plan) != key
