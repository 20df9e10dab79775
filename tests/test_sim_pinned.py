"""Pinned models in the simulator: pinned devices beside the pool, and the capacity report."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from tokenpool.errors import ConfigError
from tokenpool.sim import run as sim_run
from tokenpool.sim.config import load_sim_config
from tokenpool.sim.pinning import hottest, pins_for
from tokenpool.sim.workload import load_aegaeon_csv

ROOT = Path(__file__).resolve().parents[1]
TESTBED = ROOT / "configs" / "sim" / "aegaeon-h800.yaml"
WORKLOAD = ROOT.parent / "shared" / "data" / "aegaeon" / "workloads" / "synth-10-0.1-1.0-1.0.csv"


@pytest.fixture(scope="module")
def testbed():
    return load_sim_config(TESTBED).with_num_devices(4)


@pytest.fixture(scope="module")
def workload():
    return load_aegaeon_csv(WORKLOAD)


def test_pinned_devices_come_first_in_both_roles_and_load_their_model_once(testbed, workload):
    top = hottest(workload, 2)
    config = dataclasses.replace(testbed, pins={top[0]: 1, top[1]: 2})
    roles = sim_run.roles_of(config)
    assert roles.prefill[:3] == roles.decode[:3] == (0, 1, 2)
    assert len(roles.all) == 3 + 4 and set(roles.prefill[3:]).isdisjoint(roles.decode[3:])
    result = sim_run.run_one(config, workload, "token-level", config.slo)
    assert result["num_devices"] == 7 and result["finished"] == len(workload)
    assert result["switches_per_device"][:3] == [1, 1, 1]
    assert sum(result["switches_per_device"][3:]) > 0  # the pool switches among the rest


def test_pins_in_a_sim_file_are_checked(tmp_path):
    data = yaml.safe_load(TESTBED.read_text())
    data["device"]["profile_dir"] = str(load_sim_config(TESTBED).device.profile_dir)
    data["workload"]["path"] = str(load_sim_config(TESTBED).workload.path)
    path = tmp_path / "sim.yaml"
    for pins, message in (({"synth_model_00": -1}, "pins.synth_model_00: expected a whole"),
                          ({"llama_70b": 1}, "'llama_70b' is neither")):
        path.write_text(yaml.safe_dump({**data, "pins": pins}))
        with pytest.raises(ConfigError, match=message):
            load_sim_config(path)
    path.write_text(yaml.safe_dump({**data, "pins": {"synth_model_03": 2}}))
    config = load_sim_config(path)
    assert config.pins == {"synth_model_03": 2}
    assert pins_for(config, [], 0, 1) == {"synth_model_03": 2}


def test_capacity_sizes_a_pinned_fleet_against_the_all_pooled_one(tmp_path, workload):
    from tokenpool.cli.main import main

    out = tmp_path / "capacity.json"
    assert main(["simulate", "capacity", "--config", str(TESTBED), "--workload", str(WORKLOAD),
                 "--schedulers", "token-level", "--pin-top", "1", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    pooled, pinned = report["token-level"], report["token-level+pins"]
    assert pinned["pins"] == {hottest(workload, 1)[0]: 1} and pinned["pinned_devices"] == 1
    assert pinned["devices"] == 1 + pinned["pooled_devices"]
    assert pinned["extra_devices"] == pinned["devices"] - pooled["devices"]
    assert all(t["num_devices"] == 1 + t["pooled_devices"] for t in pinned["tried"])
    assert pinned["pinned_switches"] == [1]
    for split in (pinned, pinned["all_pooled"]):
        assert split["hot"]["requests"] + split["rest"]["requests"] == len(workload)
        assert set(split["hot"]) == {"requests", "slo_attainment", "ttft_p50_s", "ttft_p99_s",
                                     "tbt_p99_s"}
    assert pinned["all_pooled"]["devices"] == pooled["devices"]
