"""`tokenpool bench chat` (prefix caching on against off, over fresh servers and the official
openai client) and `tokenpool bench chunked` (stream gaps while a long prompt prefills, on one
in-process worker), end to end on a fleet of two tiny synthetic models."""

from __future__ import annotations

import json

import pytest

from tokenpool.cli.main import main
from helpers import TINY_FLEET

pytest.importorskip("openai")

FLEET = TINY_FLEET
RUN_KEYS = {"turns", "errors", "all", "hits", "first_turns", "later_turns", "prompt_tokens",
            "cached_tokens", "cached_fraction", "wall_s", "metrics", "turn_records"}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("bench-prefix")
    path = root / "fleet.yaml"
    path.write_text(FLEET.replace("CACHE", str(root)))
    return str(path)


def bench(capsys, tmp_path, kind: str, *args) -> tuple[dict, str]:
    out = tmp_path / f"{kind}.json"
    code = main(["bench", kind, *map(str, args), "--json", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(out.read_text()), captured.out


def test_chat_caching_on_serves_cached_tokens_and_off_none(fleet, tmp_path, capsys):
    result, table = bench(capsys, tmp_path, "chat", "--config", fleet, "--sessions", 3,
                          "--turns", 3, "--concurrency", 2, "--system-tokens", 100,
                          "--user-tokens", 10, "--max-tokens", 4)
    on, off = result["runs"]["on"], result["runs"]["off"]
    assert RUN_KEYS <= set(on) and RUN_KEYS <= set(off)
    assert result["models"] == ["t0", "t1"] and result["cpu"]["logical_cores"] >= 1
    for run in (on, off):
        assert run["turns"] == 9 and run["errors"] == 0
        assert [(r["session"], r["turn"]) for r in run["turn_records"]] == \
            [(s, t) for s in range(3) for t in range(3)]
        assert all(r["ttft_s"] > 0 and r["completion_tokens"] >= 1 for r in run["turn_records"])
        # The usage the client summed is what the server's counters counted.
        assert run["metrics"] == {"prefix_cache_queries_total": run["prompt_tokens"],
                                  "prefix_cache_hits_total": run["cached_tokens"]}
    assert off["cached_tokens"] == 0 and off["hits"]["count"] == 0
    # Every later turn extends its session's last prompt; session 2's first turn shares
    # session 0's system prompt (both talk to t0).
    assert 0 < on["cached_tokens"] < on["prompt_tokens"]
    assert on["hits"]["count"] == 7 and on["hits"]["ttft_p50_s"] > 0
    assert result["hit_turns_compared"] == 7
    assert result["ttft_p50_ratio_hits"] > 0
    assert result["ttft_speedup_hits"] == pytest.approx(1 / result["ttft_p50_ratio_hits"])
    assert "hit turns (7)" in table


POINT_KEYS = {"rate", "sessions", "requests", "finished", "errors", "slo_attainment",
              "slo_met_fraction", "ttft_p50_s", "ttft_p90_s", "prompt_tokens", "cached_tokens",
              "turns_per_s", "metrics"}


def test_chat_rate_points_score_turns_as_the_sweep_scores_requests():
    from tokenpool.bench.chat_sweep import point_summary, session_starts
    from tokenpool.bench.chat_workload import TurnRecord
    from tokenpool.schedulers.types import SLO

    assert session_starts(1.0, 30.0, 0) == sorted(session_starts(1.0, 30.0, 0))
    assert all(0 <= t < 30 for t in session_starts(1.0, 30.0, 0))
    on_time = TurnRecord(0, 0, "t0", 0.1, 0.3, 100, 64, 3, sent_at=10.0,
                         chunks=[(10.1, 1), (10.2, 1), (10.3, 1)])
    late = TurnRecord(0, 1, "t0", 2.0, 2.0, 120, 100, 1, sent_at=11.0, chunks=[(13.0, 1)])
    cut = TurnRecord(1, 0, "t0", error="cut off: the grace time passed", sent_at=12.0)
    p = point_summary(0.5, 2, [on_time, late, cut], 10.0, lambda m: SLO(1.0, 0.5))
    assert (p["requests"], p["finished"], p["errors"]) == (3, 2, 1)
    assert p["slo_attainment"] == pytest.approx((1.0 + 0.5 + 0.0) / 3)
    assert p["slo_met_fraction"] == pytest.approx(1 / 3)
    assert (p["prompt_tokens"], p["cached_tokens"]) == (220, 164)


@pytest.mark.slow  # four fresh servers: 45 s on a quiet 2-core machine, 3 min on a busy one
def test_chat_rates_reports_points_and_sustainable_rate(fleet, tmp_path, capsys):
    result, table = bench(capsys, tmp_path, "chat", "--config", fleet, "--rates", "0.5,1",
                          "--duration", 3, "--grace", 20, "--turns", 2, "--system-tokens", 100,
                          "--user-tokens", 10, "--max-tokens", 4)
    assert result["rates"] == [0.5, 1.0] and set(result["sustainable_rate"]) == {"on", "off"}
    for name in ("on", "off"):
        points = result["settings"][name]["points"]
        assert [p["rate"] for p in points] == [0.5, 1.0]
        for p in points:
            assert POINT_KEYS <= set(p) and p["errors"] == 0
            assert p["requests"] == p["finished"] == 2 * p["sessions"] > 0
            assert 0 <= p["slo_attainment"] <= 1 and p["ttft_p50_s"] > 0
            assert p["metrics"]["prefix_cache_hits_total"] == p["cached_tokens"]
    assert all(p["cached_tokens"] > 0 for p in result["settings"]["on"]["points"])
    assert all(p["cached_tokens"] == 0 for p in result["settings"]["off"]["points"])
    # 30 s TTFT and 5 s TBT SLOs on tiny models: every turn on time.
    assert result["sustainable_rate"] == {"on": 1.0, "off": 1.0}
    assert "sustainable rate" in table


def test_chunked_steps_keep_the_budget_and_unchunked_runs_one_step(fleet, tmp_path, capsys):
    result, table = bench(capsys, tmp_path, "chunked", "--config", fleet, "--prompt-tokens", 300,
                          "--streams", 4, "--budget", 64, "--decode-steps", 3)
    assert (result["model"], result["other"], result["prompt_tokens"]) == ("t0", "t1", 300)
    assert result["tbt_slo_s"] == 5.0 and "isa" in result["cpu"]
    on, off = result["runs"]["on"], result["runs"]["off"]
    assert on["max_num_batched_tokens"] == 64 and off["max_num_batched_tokens"] == 304
    steps = on["same_model"]["prompt_steps"]
    assert len(steps) == 5 and sum(s["prompt_tokens"] for s in steps) == 300
    assert all(s["tokens"] <= 64 and s["decodes"] == 4 for s in steps)
    assert [(s["prompt_tokens"], s["decodes"]) for s in off["same_model"]["prompt_steps"]] == \
        [(300, 4)]
    # The streams ride every chunk step: a gap per stream per step; unchunked, one.
    assert on["same_model"]["gaps"] == 4 * len(steps) and off["same_model"]["gaps"] == 4
    # B's prompt on A's worker: unchunked, one gap per stream across B's whole prefill;
    # chunked, B's first chunk, then 4 turns of B (the other 236 tokens) between A's steps.
    turns = {"on": -(-(300 - 64) // 64), "off": 0}
    for name, run in (("on", on), ("off", off)):
        assert run["baseline"]["gaps"] == 4 * 3
        assert run["other_model"]["gaps"] == 4 * (turns[name] + 1)
        assert len(run["other_model"]["switch_s"]) == 2 + 2 * turns[name]
        for phase in ("same_model", "other_model"):
            g = run[phase]
            assert 0 < g["itl_p50_s"] <= g["itl_p99_s"] <= g["itl_max_s"]
            assert 0 <= g["over_tbt_slo"] <= 1 and g["long_ttft_s"] > 0
    assert result["same_model_max_gap_ratio"] > 0
    assert "same_model" in table and "TBT SLO 5000 ms" in table


def test_chunked_cuts_a_prompt_to_the_context(fleet):
    from tokenpool.bench.chunked_bench import ChunkedPlan, plan_fleet
    from tokenpool.fleet import load_fleet

    _, models, plan = plan_fleet(load_fleet(fleet), ChunkedPlan("t0", "t1", 10**6))
    assert plan.prompt_tokens == min(models.max_model_lens().values()) - 1


@pytest.mark.parametrize("kind, args, message", [
    ("chunked", ["--streams", "16", "--budget", "16"], "must exceed --streams"),
    ("chunked", ["--models", "t0,t0"], "two different model ids"),
    ("chat", ["--models", "t0,nope"], "nope"),
])
def test_bad_arguments_exit_2(fleet, tmp_path, capsys, kind, args, message):
    assert main(["bench", kind, "--config", fleet, *args, "--json",
                 str(tmp_path / "o.json")]) == 2
    assert message in capsys.readouterr().err
