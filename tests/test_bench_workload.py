"""The bench's workloads on a fleet, and its client-side report (no server needed)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from tokenpool.bench.bench_workload import (BenchWorkload, LengthScale, load_models_map,
                                            poisson_requests, trace_requests)
from tokenpool.bench.load_client import RequestRecord
from tokenpool.bench.serve_report import bench_report, timeline
from tokenpool.sim.workload import WorkloadRequest, load_aegaeon_csv
from tokenpool.errors import ConfigError
from tokenpool.schedulers.types import SLO

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SYNTH8 = DATA / "aegaeon" / "workloads" / "synth-8-0.1-1.0-1.0.csv"
AZURE = DATA / "traces" / "azure-llm-2023-conv.csv"
FLEET = ["a", "b", "c"]


def test_aegaeon_models_map_onto_fleet_ids_k_mod_n():
    raw = load_aegaeon_csv(SYNTH8)
    mapped = trace_requests(BenchWorkload("trace", str(SYNTH8)), FLEET)
    assert len(mapped) == len(raw)
    for before, after in zip(raw, mapped):
        k = int(before.model.removeprefix("synth_model_"))
        assert after.model == FLEET[k % 3]
        assert (after.arrival_s, after.prompt_len, after.output_len) == \
            (before.arrival_s, min(before.prompt_len, 512), min(before.output_len, 128))


def test_models_map_file_and_its_errors(tmp_path):
    names = {r.model for r in load_aegaeon_csv(SYNTH8)}
    path = tmp_path / "map.yaml"
    path.write_text("".join(f"{n}: b\n" for n in sorted(names)))
    mapped = trace_requests(BenchWorkload("trace", str(SYNTH8)), FLEET,
                            models_map=load_models_map(path))
    assert {r.model for r in mapped} == {"b"}
    with pytest.raises(ConfigError, match="no fleet id for workload model"):
        trace_requests(BenchWorkload("trace", str(SYNTH8)), FLEET, models_map={"x": "a"})
    with pytest.raises(ConfigError, match="'z' is not a fleet id"):
        trace_requests(BenchWorkload("trace", str(SYNTH8)), FLEET,
                       models_map={n: "z" for n in names})


def test_rate_scale_compresses_and_duration_cuts():
    spec = BenchWorkload("trace", str(SYNTH8))
    full = trace_requests(spec, FLEET)
    fast = trace_requests(spec, FLEET, rate_scale=4.0, duration_s=10.0)
    assert fast and all(r.arrival_s <= 10.0 for r in fast)
    assert [r.arrival_s for r in fast] == pytest.approx([r.arrival_s / 4 for r in
                                                          full[:len(fast)]])
    assert len(fast) == sum(r.arrival_s / 4 <= 10.0 for r in full)


def test_azure_trace_spreads_by_zipf_and_is_deterministic():
    spec = BenchWorkload("trace", str(AZURE), zipf_s=1.0)
    one = trace_requests(spec, FLEET, duration_s=600.0, seed=3)
    assert one == trace_requests(spec, FLEET, duration_s=600.0, seed=3)
    counts = Counter(r.model for r in one)
    assert counts["a"] > counts["b"] > counts["c"] > 0  # rank 1 is the most popular
    assert all(r.arrival_s <= 600.0 for r in one)


def test_length_scale_rounds_then_clamps():
    scale = LengthScale(input_scale=0.5, output_scale=0.25, min_input=4, max_input=100,
                        min_output=2, max_output=50)
    assert scale.apply(10, 100) == (5, 25)
    assert scale.apply(2, 4) == (4, 2)  # raised to the minimums
    assert scale.apply(1000, 1000) == (100, 50)
    with pytest.raises(ConfigError):
        LengthScale(input_scale=0)


def test_poisson_count_rate_and_determinism():
    spec = BenchWorkload("poisson", str(SYNTH8), LengthScale(0.5, 0.5))
    requests = poisson_requests(spec, FLEET, rate=4.0, duration_s=200.0, seed=1)
    assert requests == poisson_requests(spec, FLEET, rate=4.0, duration_s=200.0, seed=1)
    assert abs(len(requests) - 800) < 4 * 800 ** 0.5  # Poisson(800): within 4 sigma
    arrivals = [r.arrival_s for r in requests]
    assert arrivals == sorted(arrivals) and 0 <= arrivals[0] and arrivals[-1] <= 200.0
    assert {r.model for r in requests} == set(FLEET)
    assert [r.request_id for r in requests] == [str(i) for i in range(len(requests))]


def _record(model: str, arrival: float, chunks, status: str = "ok") -> RequestRecord:
    record = RequestRecord(WorkloadRequest("0", model, arrival, 8, sum(n for _, n in chunks)))
    record.chunks, record.status = list(chunks), status
    return record


def test_report_counts_a_shed_request_as_a_miss():
    slo = SLO(1.0, 0.5)
    on_time = _record("a", 0.0, [(0.5, 1), (0.9, 1), (1.3, 2)])
    shed = _record("a", 0.0, [], status="shed")
    report = bench_report([on_time, shed], lambda _m: slo, duration_s=2.0)
    assert report["completed"] == 1 and report["shed"] == 1
    assert report["slo_attainment"] == pytest.approx(0.5)  # 1.0 and 0.0
    assert report["request_goodput"] == pytest.approx(0.5)  # one met request in 2 s
    assert report["total_output_tokens"] == 4
    assert report["output_throughput"] == pytest.approx(2.0)
    # ITL is per chunk (vLLM): 0.4 s and 0.4 s; TPOT is per token: (1.3 - 0.5) / 3.
    assert report["median_itl_ms"] == pytest.approx(400.0)
    assert report["mean_tpot_ms"] == pytest.approx(800.0 / 3)
    assert report["mean_ttft_ms"] == pytest.approx(500.0)
    assert set(report["per_model"]) == {"a"}


def test_report_late_tokens_lower_attainment():
    slo = SLO(1.0, 0.1)
    late = _record("b", 0.0, [(2.0, 1)])  # due at 1.0, came at 2.0: late for half its time
    tl = timeline(late, slo)
    assert tl.attainment == pytest.approx(0.5)
    report = bench_report([late], lambda _m: slo, duration_s=2.0)
    assert report["slo_attainment"] == pytest.approx(0.5) and report["request_goodput"] == 0


def test_report_counts_shed_reasons_with_numbers_blanked():
    http = '{"error": {"message": "predicted time to first token 5.10 s exceeds the SLO of 4.3 s"}}'
    records = [_record("a", 0.0, [], status="shed") for _ in range(3)]
    records[0].error = f"HTTP 429: {http}"
    records[1].error = f"HTTP 429: {http.replace('5.10', '7.25')}"
    records[2].error = "RESOURCE_EXHAUSTED: decode is overloaded (round alpha 1.62 > 1.5)"
    report = bench_report(records, lambda _m: SLO(1.0, 0.5), duration_s=1.0)
    assert report["shed_reasons"] == {
        "predicted time to first token # s exceeds the SLO of # s": 2,
        "decode is overloaded (round alpha # > #)": 1}


def test_memory_sampler_splits_private_from_shared_pages():
    import os
    import time

    from tokenpool.bench.overload import MemorySampler

    with MemorySampler(os.getpid(), interval_s=0.05) as memory:
        time.sleep(0.3)
    summary = memory.between(0.0, float("inf"))
    assert summary["num_samples"] >= 2
    # Shared pages (this interpreter's libraries, at least) count in RSS, not in private.
    assert 0 < summary["private_peak_mib"] < summary["rss_peak_mib"]
    assert summary["private_slope_mib_per_min"] is not None
