"""Prefix caching in the simulator (issue 25): chat sessions whose prompts share prefixes,
simulated workers whose caches are the truth, and what caching does to TTFT."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from tokenpool.errors import ConfigError
from tokenpool.memory.prefix_cache import page_hashes
from tokenpool.schedulers.cost import CostModel, Linear3, ModelCost
from tokenpool.schedulers.types import Job, Prefill, Switch
from tokenpool.sim.chat_workload import ChatWorkload
from tokenpool.sim.config import load_sim_config
from tokenpool.sim.timelines import TokenTimeline
from tokenpool.sim.worker import SimRequest, SimWorker
from tokenpool.sim.workload import build_workload

CHAT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "sim" / "chat-h800.yaml"
GiB = 1 << 30


def chat(**overrides) -> ChatWorkload:
    spec = dict(kind="chat", num_models=3, duration_s=60.0, session_rate=0.5, turns=4.0,
                system_prompt_tokens=1000, seed=7)
    return ChatWorkload(**{**spec, **overrides})


# -- the workload --------------------------------------------------------------------------

def test_chat_sessions_are_deterministic_and_their_prompts_share_prefixes():
    requests = chat().requests()
    assert requests == chat().requests() and requests != chat(seed=8).requests()
    assert [r.arrival_s for r in requests] == sorted(r.arrival_s for r in requests)
    system_pages = 1000 // 16
    by_model: dict[str, list] = {}
    for r in requests:
        assert len(r.page_hashes) == r.prompt_len // 16 and r.prompt_len > 1000
        by_model.setdefault(r.model, []).append(r)
    for turns in by_model.values():  # one system prompt per model
        assert len({r.page_hashes[:system_pages] for r in turns}) == 1
    # A later turn of a session extends an earlier one's prompt past the system prompt.
    extends = [(a, b) for turns in by_model.values() for a in turns for b in turns
               if a.arrival_s < b.arrival_s and len(a.page_hashes) > system_pages + 1
               and b.page_hashes[:len(a.page_hashes)] == a.page_hashes]
    assert extends
    models = {r.model for r in requests}
    assert len({r.page_hashes[0] for r in requests}) == len(models)  # names carry the model


def test_a_sim_config_selects_the_chat_workload_and_rejects_a_typo():
    config = load_sim_config(CHAT_CONFIG)
    assert isinstance(config.workload, ChatWorkload)
    assert config.workload.system_prompt_tokens == 1000
    with pytest.raises(ConfigError, match="workload.sessions: unknown key"):
        build_workload({"kind": "chat", "num_models": 2, "duration_s": 10, "sessions": 1})
    with pytest.raises(ConfigError, match="max_prompt_tokens"):
        build_workload({"kind": "chat", "num_models": 2, "duration_s": 10,
                        "session_rate": 1.0, "max_prompt_tokens": 500})


# -- the simulated worker's cache ----------------------------------------------------------

def cost(kv_tokens: int = 100_000) -> CostModel:
    # Prefill 10 ms + 1 ms a token, switch 1 s, 1 KiB of KV a token.
    spec = ModelCost(Linear3(0.01, 1e-3, 0.0), Linear3(0.01, 1e-3, 0.0), GiB, 1024)
    return CostModel({"a": spec, "b": spec}, float(GiB), 1024 * kv_tokens)


def request(rid: str, model: str, ids: list[int]) -> SimRequest:
    return SimRequest(rid, model, len(ids), 4, TokenTimeline(0.0, 10.0, 0.1),
                      page_hashes(model, ids))


def prefill_seconds(worker: SimWorker, model: str, rid: str, t: float) -> float:
    end, _ = worker.run(Job(worker.worker, (Switch(worker.worker, model),
                                            Prefill(worker.worker, model, (rid,)))), t)
    return end - t - 1.0  # less the switch


def test_a_prefill_computes_only_what_the_cache_lacks_and_the_cache_survives_switches():
    first = list(range(1000))
    reqs = {"r0": request("r0", "a", first), "r1": request("r1", "b", first),
            "r2": request("r2", "a", first + list(range(5000, 5100)))}
    w = SimWorker(0, cost(), reqs)
    assert prefill_seconds(w, "a", "r0", 0.0) == pytest.approx(0.01 + 1.0)
    assert prefill_seconds(w, "b", "r1", 10.0) == pytest.approx(0.01 + 1.0)  # other model
    # Back on "a": its 62 full pages of the first 1000 tokens were kept through "b".
    assert prefill_seconds(w, "a", "r2", 20.0) == pytest.approx(0.01 + (1100 - 992) * 1e-3)
    assert (w.prefix_queried_tokens, w.prefix_hit_tokens) == (3100, 992)


def test_the_simulated_cache_keeps_within_the_kv_region():
    first, other = list(range(1000)), list(range(2000, 3000))
    reqs = {"r0": request("r0", "a", first), "r1": request("r1", "a", other),
            "r2": request("r2", "a", first)}
    w = SimWorker(0, cost(kv_tokens=1200), reqs)  # room for 75 pages, not two prompts' 124
    for i, rid in enumerate(reqs):
        prefill_seconds(w, "a", rid, 10.0 * i)
    # r1's pages pushed out r0's last 49: its first 13 are still there for r2.
    assert w.prefix_hit_tokens == 13 * 16 and w.prefix_cache.used_bytes <= 1200 * 1024


# -- whole runs ----------------------------------------------------------------------------

def run_chat(strip: bool, scheduler: str = "token-level") -> dict:
    from tokenpool.sim import run as sim_run

    config = load_sim_config(CHAT_CONFIG).with_num_devices(8)
    spec = dataclasses.replace(config.workload, num_models=8, session_rate=3.0,
                               duration_s=120.0, system_prompt_tokens=2000)
    workload = spec.requests()
    if strip:
        workload = [dataclasses.replace(r, page_hashes=()) for r in workload]
    return sim_run.run_one(config, workload, scheduler, config.slo)


def test_chat_sessions_hit_the_cache_and_get_their_first_tokens_sooner():
    cached, again, plain = run_chat(False), run_chat(False), run_chat(True)
    assert json.dumps(cached, sort_keys=True) == json.dumps(again, sort_keys=True)
    assert cached["finished"] == cached["requests"] == plain["requests"]
    assert cached["prefix_cache_hit_tokens"] > 0.8 * cached["prefix_cache_queried_tokens"]
    assert "prefix_cache_hit_tokens" not in plain
    assert cached["ttft_p50_s"] < plain["ttft_p50_s"]
    assert cached["ttft_p99_s"] < plain["ttft_p99_s"]


def test_the_baselines_hit_the_simulated_caches_too():
    result = run_chat(False, "request-level")
    assert 0 < result["prefix_cache_hit_tokens"] < result["prefix_cache_queried_tokens"]


def test_simulate_runs_the_config_s_workload_and_reports_cache_hits(tmp_path):
    from tokenpool.cli.main import main

    out = tmp_path / "chat.json"
    assert main(["simulate", "--config", str(CHAT_CONFIG), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["prefix_cache_queried_tokens"] > result["prefix_cache_hit_tokens"] > 0
    assert 0 < result["prefix_cache_hit_rate"] < 1
