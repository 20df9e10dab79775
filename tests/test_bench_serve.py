"""`tokenpool bench serve` against the session's real server, over HTTP and gRPC, and
`tokenpool bench sweep` end to end on fresh `tokenpool serve` processes."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

pytest.register_assert_rewrite("grpc_fixtures", "serving_fixtures")
from helpers import TINY_FLEET  # noqa: E402
from serving_fixtures import FLEET_IDS, MODEL  # noqa: E402
from tokenpool.cli.main import main  # noqa: E402

pytest_plugins = ["serving_fixtures", "grpc_fixtures"]

VLLM_KEYS = ("request_throughput", "request_goodput", "output_throughput", "mean_ttft_ms",
             "median_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "median_tpot_ms", "p99_tpot_ms",
             "mean_itl_ms", "median_itl_ms", "p99_itl_ms")
# Three models of the artifact's naming, 7 requests inside 2 s, then one past the window.
TRACE = """Request Time,Model Name,Input Length,Output Length
00:00:00.000,synth_model_00,12,5
00:00:00.100,synth_model_01,30,3
00:00:00.300,synth_model_02,7,6
00:00:00.600,synth_model_00,20,4
00:00:01.000,synth_model_01,9,2
00:00:01.200,synth_model_02,16,5
00:00:01.900,synth_model_00,11,3
00:00:09.000,synth_model_01,10,4
"""
IN_WINDOW = 7
OUTPUT_TOKENS = 5 + 3 + 6 + 4 + 2 + 5 + 3


@pytest.fixture(scope="module")
def trace(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bench") / "trace.csv"
    path.write_text(TRACE)
    return path


def _bench(args: list[str], out: Path) -> dict:
    assert main(["bench", "serve", *args, "--duration", "2", "--warmup", "2",
                 "--json", str(out)]) == 0
    return json.loads(out.read_text())


def _check(result: dict) -> None:
    assert result["num_requests"] == IN_WINDOW
    assert result["completed"] == IN_WINDOW and result["shed"] == result["failed"] == 0
    # ignore_eos and exact counts from the stream: every token arrived, none twice.
    assert result["total_output_tokens"] == OUTPUT_TOKENS
    assert all(result[k] is not None and result[k] >= 0 for k in VLLM_KEYS)
    assert 0 < result["mean_ttft_ms"] <= result["mean_e2el_ms"]
    assert 0 <= result["slo_attainment"] <= 1
    # synth_model_K -> fleet id K mod 3
    assert set(result["per_model"]) == set(FLEET_IDS)
    assert result["per_model"][MODEL]["num_requests"] == 3


def test_bench_serve_over_http(server, trace, tmp_path):
    result = _bench(["--url", server.url, "--workload", str(trace), "--plot",
                     str(tmp_path / "p.png")], tmp_path / "out.json")
    _check(result)
    assert result["backend"] == "http" and result["slo"][MODEL] == {"ttft_s": 600.0,
                                                                    "tbt_s": 60.0}
    assert (tmp_path / "p.png").stat().st_size > 0


def test_bench_serve_over_grpc(grpc_edge, trace, tmp_path):
    result = _bench(["--url", grpc_edge.address, "--grpc", "--workload", str(trace)],
                    tmp_path / "out.json")
    _check(result)
    assert result["backend"] == "grpc"


def test_continuous_usage_counts_every_token_once(server):
    body = {"model": MODEL, "prompt": [300, 301, 302], "max_tokens": 9, "ignore_eos": True,
            "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=120) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
    counts = [c["usage"]["completion_tokens"] for c in chunks]
    assert counts == sorted(counts) and counts[-1] == 9
    assert all(c["usage"]["prompt_tokens"] == 3 for c in chunks)


def test_bench_serve_bad_arguments_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "serve", "--url", "http://127.0.0.1:1", "--workload", "w.csv",
              "--length-scale", "1", "--json", str(tmp_path / "o.json")])
    assert exc.value.code == 2
    assert "expected two values" in capsys.readouterr().err


def test_bench_sweep_without_a_bench_block_exits_2(fleet_path, tmp_path, capsys):
    assert main(["bench", "sweep", "--config", str(fleet_path), "--json",
                 str(tmp_path / "o.json")]) == 2
    assert "no bench: block" in capsys.readouterr().err


SWEEP_FLEET = TINY_FLEET + """\
bench:
  rates: [2]
  duration_s: 2
  workload:
    kind: poisson
    path: TRACE
    lengths: {input_scale: 1, output_scale: 1, max_input: 32, max_output: 6}
"""


def test_bench_sweep_runs_fresh_servers_and_writes_its_report(trace, tmp_path):
    config = tmp_path / "fleet.yaml"
    config.write_text(SWEEP_FLEET.replace("CACHE", str(tmp_path)).replace("TRACE", str(trace)))
    out, plot, report = tmp_path / "s.json", tmp_path / "s.png", tmp_path / "docs" / "s.md"
    assert main(["bench", "sweep", "--config", str(config), "--schedulers",
                 "token-level,request-level", "--json", str(out), "--plot", str(plot),
                 "--report", str(report), "--baseline-switch-overhead", "0.25"]) == 0
    result = json.loads(out.read_text())
    assert set(result) == {"token-level", "request-level"}
    assert result["request-level"]["baseline_switch_overhead_s"] == 0.25
    assert result["token-level"]["baseline_switch_overhead_s"] == 0.0
    for entry in result.values():
        (point,) = entry["points"]
        assert point["rate"] == 2 and point["failed"] == 0
        assert point["completed"] + point["shed"] == point["num_requests"] > 0
        assert entry["max_rate_at_90"] in (None, 2.0) and entry["num_workers"] == 1
        met = point["slo_met_fraction"] >= 0.9  # DESIGN §8's goodput criterion, beside it
        assert entry["max_rate_at_90_met"] == (2.0 if met else None)
        assert isinstance(point["shed_reasons"], dict)
        # The simulator ran the same requests on the cost model the server fitted, and again
        # with its steps as slow as the server measured them against that model.
        assert point["decode_step_ratio"] > 0
        for key in ("simulated", "simulated_measured_steps"):
            (predicted,) = entry[key]["points"]
            assert predicted["rate"] == 2 and 0 <= predicted["slo_attainment"] <= 1
    text = report.read_text()
    assert "| token-level | 2 |" in text and "tokenpool bench sweep --config" in text
    assert "by goodput (90% of requests meet both)" in text and "The SLOs used are" in text
    assert "baselines held their worker 0.25 s after every switch" in text
    assert "simulated, measured steps" in text and "steps / profile" in text
    assert plot.stat().st_size > 0
