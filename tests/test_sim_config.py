"""Simulation configs (configs/sim/*.yaml): the paper's testbed, aliases, strictness."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tokenpool.controller.cost_fit import fit_gpu_profile
from tokenpool.sim.config import load_sim_config
from tokenpool.sim.workload import AegaeonWorkload, MarketWorkload
from tokenpool.errors import ConfigError, UnknownModelError

ROOT = Path(__file__).resolve().parents[1]
TESTBED = ROOT / "configs" / "sim" / "aegaeon-h800.yaml"
MARKET = ROOT / "configs" / "sim" / "market.yaml"
GiB = 2**30


@pytest.fixture(scope="module")
def testbed():
    return load_sim_config(TESTBED)


def test_the_papers_testbed(testbed):
    cluster = testbed.cluster
    assert (cluster.num_devices, cluster.num_prefill, cluster.num_decode) == (16, 6, 10)
    assert (testbed.slo.ttft_s, testbed.slo.tbt_s) == (10.0, 0.1)
    assert testbed.device.h2d_bytes_per_s == 64.0 * GiB
    assert testbed.scheduler.name == "token-level" and testbed.scheduler.max_group_size == 8
    assert Path(testbed.device.profile_dir).is_dir()  # resolved from configs/sim/


def test_kv_shapes_of_the_real_models(testbed):
    kv = {name: m.kv_bytes_per_token for name, m in testbed.models.items()}
    assert kv == {"qwen2_5_7b": 2 * 28 * 4 * 128 * 2,  # 56 KiB
                  "yi1_5_9b_chat": 2 * 48 * 4 * 128 * 2,  # 96 KiB
                  "llama2_13b_chat": 2 * 40 * 40 * 128 * 2}  # 800 KiB: MHA


def test_costs_by_hand(testbed):
    cm = testbed.cost_model()
    # 7.25 Gi parameters in bf16 = 14.5 GiB, over 64 GiB/s at 80% = 51.2 GiB/s
    assert cm.switch_time("qwen2_5_7b") == pytest.approx(14.5 / 51.2)
    assert cm.switch_time("llama2_13b_chat") == pytest.approx(24.4 / 51.2)
    # 80 GiB less two slots of Llama-2-13B's 24.4 GiB
    assert testbed.kv_capacity_bytes == 80 * GiB - 2 * int(24.4 * GiB)
    assert cm.kv_capacity_tokens("qwen2_5_7b") == testbed.kv_capacity_bytes // 57344  # 584206
    assert cm.kv_swap_time("qwen2_5_7b", 1000) == pytest.approx(57344e3 / (51.2 * GiB))


def test_alias_rule(testbed):
    assert testbed.real_model("synth_model_17") == "yi1_5_9b_chat"  # 7
    assert testbed.real_model("synth_model_123") == "qwen2_5_7b"  # 3
    assert testbed.real_model("synth_model_00") == "qwen2_5_7b"
    assert testbed.real_model("synth_model_08") == "llama2_13b_chat"
    assert testbed.real_model("llama2_13b_chat") == "llama2_13b_chat"
    for bad in ("gpt-4", "synth_model_", "synth_model_7x"):
        with pytest.raises(UnknownModelError):
            testbed.real_model(bad)


def test_cost_model_serves_aliases_and_caches_fits(testbed):
    testbed.cost_model()
    hits = fit_gpu_profile.cache_info().hits
    cm = testbed.cost_model(served=["synth_model_17", "synth_model_123"])
    assert fit_gpu_profile.cache_info().hits == hits + 3  # no profile read again
    assert cm.models["synth_model_17"] is cm.models["yi1_5_9b_chat"]
    assert cm.decode_step_time("synth_model_123", 8, 8000) == \
        cm.decode_step_time("qwen2_5_7b", 8, 8000) > 0


@pytest.mark.parametrize("devices, prefill, decode, nodes", [
    (16, 6, 10, 2), (8, 3, 5, 1), (24, 9, 15, 3),  # whole nodes keep 3:5
    (10, 4, 6, 1), (4, 2, 2, 1), (3, 1, 2, 1), (2, 1, 1, 1),  # rounded half up, >= 1 each
])
def test_with_num_devices_keeps_the_ratio(testbed, devices, prefill, decode, nodes):
    cluster = testbed.with_num_devices(devices).cluster
    assert (cluster.num_devices, cluster.num_prefill, cluster.num_decode, cluster.nodes) == \
        (devices, prefill, decode, nodes)


def test_too_few_devices(testbed):
    with pytest.raises(ValueError, match="at least 2"):
        testbed.with_num_devices(1)


def test_workloads_resolve_from_the_file(testbed):
    assert isinstance(testbed.workload, AegaeonWorkload)
    assert Path(testbed.workload.path).is_file()
    market = load_sim_config(MARKET).workload
    assert isinstance(market, MarketWorkload) and market.num_models == 300
    assert all(Path(p).is_file() for p in market.lengths)


# -- strictness -----------------------------------------------------------------------------

def write_variant(tmp_path: Path, edit) -> Path:
    """The testbed file with `edit(data)` applied, its paths absolute so it loads from tmp."""
    data = yaml.safe_load(TESTBED.read_text())
    data["device"]["profile_dir"] = str(load_sim_config(TESTBED).device.profile_dir)
    data["workload"]["path"] = str(load_sim_config(TESTBED).workload.path)
    edit(data)
    path = tmp_path / "sim.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["cluster"].update(prefil_per_node=3), "cluster.prefil_per_node: unknown key"),
    (lambda d: d["cluster"].update(decode_per_node=4), "must equal devices_per_node"),
    (lambda d: d["device"].update(kind="B200"), "no B200 profiles"),
    (lambda d: d["device"].update(memory_bytes="40GiB"), "no KV room"),
    (lambda d: d["device"].update(h2d_efficiency=1.5), "h2d_efficiency"),
    (lambda d: d["models"]["qwen2_5_7b"].update(layer=28), "models.qwen2_5_7b.layer: unknown"),
    (lambda d: d["aliases"]["residues"].update({"5-6": "qwen2_5_7b"}), "mapped twice"),
    (lambda d: d["aliases"]["residues"].pop("8-9"), "residue 8 of 10 is not mapped"),
    (lambda d: d["aliases"]["residues"].update({"8-9": "gpt4"}), "'gpt4' is not one of"),
    (lambda d: d["scheduler"].update(name="fifo"), "scheduler.name"),
    (lambda d: d["scheduler"].update(max_group_size=0), "max_group_size must be >= 1"),
    (lambda d: d["slo"].update(tbt_s=0), "slo: ttft_s and tbt_s must be positive"),
    (lambda d: d["workload"].update(kind="trace"), "workload.kind"),
    (lambda d: d["workload"].update(seed=1), "workload.seed: unknown key"),
    (lambda d: d.pop("slo"), "slo: required key is missing"),
])
def test_bad_configs_name_the_key(tmp_path, edit, message):
    with pytest.raises(ConfigError, match=message):
        load_sim_config(write_variant(tmp_path, edit))


def test_the_simulator_and_a_fleet_share_one_scheduler_block_with_their_own_defaults(tmp_path):
    from tokenpool.schedulers.config import SchedulerConfig

    path = write_variant(tmp_path, lambda d: d["scheduler"].pop("q_max_s"))
    sim = load_sim_config(path).scheduler
    assert type(sim) is SchedulerConfig
    assert (sim.q_max_s, sim.batch_prefill) == (4.0, False)  # DESIGN's Q_max, per request
    assert (SchedulerConfig().q_max_s, SchedulerConfig().batch_prefill) == (1.0, True)
    assert load_sim_config(TESTBED).scheduler.q_max_s == 1.0  # the file's own beats both
    path = write_variant(tmp_path, lambda d: d["scheduler"].update(switch_overhead_s=-1))
    with pytest.raises(ConfigError, match="scheduler.switch_overhead_s must be >= 0"):
        load_sim_config(path)


def test_rates_may_be_plain_numbers(tmp_path):
    path = write_variant(tmp_path, lambda d: d["device"].update(h2d_bytes_per_s=32e9))
    assert load_sim_config(path).device.h2d_bytes_per_s == 32e9


def test_profile_dir_is_relative_to_the_file(tmp_path):
    real = Path(load_sim_config(TESTBED).device.profile_dir)
    (tmp_path / "profiles").symlink_to(real)
    path = write_variant(tmp_path, lambda d: d["device"].update(profile_dir="profiles"))
    assert Path(load_sim_config(path).device.profile_dir) == real.resolve()


@pytest.mark.parametrize("family", ["qwen2", "gemma2", "phi3"])
def test_a_model_of_any_family_takes_its_sizes_from_its_checkpoint(tmp_path, family):
    """`checkpoint:` in place of the sizes: the simulator charges a switch the bytes the
    engine packs, and a token the KV bytes of the engine's page shape."""
    import torch

    from tokenpool.gpu_pool.worker_memory import ModelLayout
    from tokenpool.memory.arena import ALIGN
    from tokenpool.models.checkpoint import read_model_info
    from tokenpool.models.synth import write_synthetic_checkpoint

    ckpt = write_synthetic_checkpoint(tmp_path / family, family=family, num_layers=3,
                                      hidden_size=128, num_heads=4, num_kv_heads=2)
    path = write_variant(tmp_path, lambda d: d["models"].update(
        qwen2_5_7b={"checkpoint": str(ckpt)}))
    sim = load_sim_config(path)
    layout = ModelLayout.of(family, read_model_info(ckpt)[0], torch.bfloat16)
    spec = sim.models["qwen2_5_7b"]
    padding = layout.index.nbytes - spec.weight_bytes  # the packing aligns each tensor
    assert 0 <= padding <= ALIGN * len(layout.index.entries)
    assert spec.kv_bytes_per_token * layout.page_shape.block_size == layout.page_shape.page_bytes
    assert sim.cost_model().models["qwen2_5_7b"].weight_bytes == spec.weight_bytes
    both = write_variant(tmp_path, lambda d: d["models"].update(
        qwen2_5_7b={"checkpoint": str(ckpt), "layers": 3}))
    with pytest.raises(ConfigError, match="models.qwen2_5_7b: give checkpoint or layers"):
        load_sim_config(both)
