"""Workloads for the simulator: the artifact's CSVs, the Azure trace, the model market."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tokenpool.sim.config import load_sim_config
from tokenpool.sim.workload import (
    MarketWorkload, load_aegaeon_csv, load_azure_trace, load_length_pairs, market_rates,
    market_workload, model_names, parse_clock, zipf_weights)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SYNTH8 = DATA / "aegaeon" / "workloads" / "synth-8-0.1-1.0-1.0.csv"
AZURE = DATA / "traces" / "azure-llm-2023-conv.csv"
MARKET = Path(__file__).resolve().parents[1] / "configs" / "sim" / "market.yaml"


def test_parse_clock():
    assert parse_clock("00:01:02.500") == 62.5
    assert parse_clock("01:00:00.001") == pytest.approx(3600.001)


def test_aegaeon_csv_first_rows():
    requests = load_aegaeon_csv(SYNTH8)
    first = [(r.request_id, r.model, r.arrival_s, r.prompt_len, r.output_len)
             for r in requests[:3]]
    assert first == [("0", "synth_model_01", 3.071, 619, 503),
                     ("1", "synth_model_04", 5.068, 706, 28),
                     ("2", "synth_model_00", 6.799, 1275, 141)]
    assert len(requests) == 81
    assert {r.model for r in requests} <= set(model_names(8))
    arrivals = [r.arrival_s for r in requests]
    assert arrivals == sorted(arrivals) and arrivals[-1] < 120.0


def test_aegaeon_csv_columns_in_any_order_and_blank_lines(tmp_path):
    path = tmp_path / "w.csv"
    path.write_text("Output Length,Model Name,Input Length,Request Time\n"
                    "5,m1,10,00:00:02.000\n\n7,m0,20,00:00:01.500\n")
    requests = load_aegaeon_csv(path)
    assert [(r.request_id, r.model, r.arrival_s, r.prompt_len, r.output_len)
            for r in requests] == [("1", "m0", 1.5, 20, 7), ("0", "m1", 2.0, 10, 5)]
    path.write_text("Request Time,Model Name,Input Length\n00:00:01.000,m0,3\n")
    with pytest.raises(ValueError, match="missing column.*Output Length"):
        load_aegaeon_csv(path)


def test_names_and_zipf():
    assert model_names(8)[:2] == ["synth_model_00", "synth_model_01"]
    assert model_names(300)[5] == "synth_model_005"
    assert zipf_weights(3, 1.0) == pytest.approx([6 / 11, 3 / 11, 2 / 11])


def test_azure_trace_spread_over_models():
    requests = load_azure_trace(AZURE, num_models=10, zipf_s=1.0, seed=0)
    assert len(requests) == 19366
    first = requests[0]
    assert (first.arrival_s, first.prompt_len, first.output_len) == (0.0, 374, 44)
    # 19:14:08.4025270 - 18:15:46.6805900
    assert requests[-1].arrival_s == pytest.approx(58 * 60 + 21.721937)
    share = sum(r.model == "synth_model_00" for r in requests) / len(requests)
    assert share == pytest.approx(1 / sum(1 / k for k in range(1, 11)), abs=0.01)  # 0.341
    again = load_azure_trace(AZURE, num_models=10, zipf_s=1.0, seed=0)
    other = load_azure_trace(AZURE, num_models=10, zipf_s=1.0, seed=1)
    assert again == requests and other != requests


def test_length_pairs_from_both_formats(tmp_path):
    pairs = load_length_pairs([SYNTH8, AZURE])
    assert pairs.shape == (81 + 19366, 2)
    assert tuple(pairs[0]) == (619, 503) and tuple(pairs[81]) == (374, 44)
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="neither"):
        load_length_pairs([bad])


def test_market_rates_split_head_and_tail():
    rates = market_rates(300, total_rate=15.0)  # 18 head models, 282 tail models
    assert rates.sum() == pytest.approx(15.0)
    assert rates[18:].sum() == pytest.approx(15.0 * 0.0135)
    assert (rates[18:] < 0.2).all() and (rates[:18] >= 0.2).all()
    assert np.all(np.diff(rates) <= 0)  # popularity falls with rank, head into tail


def test_market_refuses_a_split_that_is_not_a_long_tail():
    lengths = np.array([[10, 10]])
    with pytest.raises(ValueError, match="busiest tail model"):
        market_workload(300, 10.0, 0, total_rate=5000.0, lengths=lengths)
    with pytest.raises(ValueError, match="quietest head model"):
        market_workload(300, 10.0, 0, total_rate=5.0, lengths=lengths)


@pytest.fixture(scope="module")
def market():
    spec = load_sim_config(MARKET).workload
    assert isinstance(spec, MarketWorkload)
    return spec, spec.requests()


def test_market_skew_from_the_config(market):
    spec, requests = market
    counts = np.zeros(spec.num_models)
    index = {name: k for k, name in enumerate(model_names(spec.num_models))}
    for r in requests:
        counts[index[r.model]] += 1
    observed = counts / spec.duration_s
    assert len(requests) == pytest.approx(spec.total_rate * spec.duration_s, rel=0.05)
    assert (observed < spec.tail_max_rate).mean() == pytest.approx(0.94, abs=0.01)
    tail = round(spec.num_models * spec.tail_fraction)
    assert counts[-tail:].sum() / len(requests) == pytest.approx(0.0135, abs=0.003)


def test_market_requests_are_ordered_and_reproducible(market):
    spec, requests = market
    assert [r.request_id for r in requests] == [str(i) for i in range(len(requests))]
    arrivals = [r.arrival_s for r in requests]
    assert arrivals == sorted(arrivals) and 0 <= arrivals[0] and arrivals[-1] < spec.duration_s
    pool = {tuple(p) for p in load_length_pairs(spec.lengths).tolist()}
    assert all((r.prompt_len, r.output_len) in pool for r in requests)
    assert spec.requests() == requests
    lengths = load_length_pairs(spec.lengths)
    other = market_workload(spec.num_models, spec.duration_s, spec.seed + 1,
                            total_rate=spec.total_rate, lengths=lengths)
    assert other != requests
