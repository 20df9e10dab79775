"""The cost model (DESIGN §3.4): hand-checked arithmetic, and fits to real profiles.

GPU fits use the Aegaeon artifact's measured profiles in ../shared/data/aegaeon/profiles; the
CPU fit profiles a real (tiny, synthetic) engine.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tokenpool.controller.cost_fit import (
    PROFILE_TOKEN_BUDGET, fit_cpu_profile, fit_gpu_profile, fit_linear3, load_gpu_profile,
    profile_engine, trimmed_mean)
from tokenpool.gpu_pool.profiling import (EngineProfilePlan, engine_sizes,
                                          measure_copy_bytes_per_s, sample_engine)
from tokenpool.schedulers.cost import MIN_STEP_S, CostModel, Linear3, ModelCost

PROFILES = Path(__file__).resolve().parents[2] / "shared" / "data" / "aegaeon" / "profiles"
MODELS = ("qwen2_5_7b", "yi1_5_9b_chat", "llama2_13b_chat")
DEVICES = ("H800", "H100", "A100", "H20")


def hand_model() -> CostModel:
    cost = ModelCost(prefill=Linear3(0.01, 1e-4, 1e-8), decode=Linear3(0.005, 1e-3, 1e-6),
                     weight_bytes=2**30, kv_bytes_per_token=1024)
    return CostModel({"m": cost}, h2d_bytes_per_s=2**30, kv_capacity_bytes=10 * 2**20)


def test_linear3_is_a_plus_bx_plus_cy():
    assert Linear3(1.0, 2.0, 3.0)(4, 5) == 1 + 8 + 15


def test_cost_model_by_hand():
    cm = hand_model()
    # t = 30 tokens, s = 10^2 + 20^2 = 500
    assert cm.prefill_time("m", [10, 20]) == pytest.approx(0.01 + 30e-4 + 500e-8)
    assert cm.decode_step_time("m", 4, 100) == pytest.approx(0.005 + 4e-3 + 100e-6)
    assert cm.switch_time("m") == 1.0  # 1 GiB at 1 GiB/s
    assert cm.kv_swap_time("m", 1024) == pytest.approx(1 / 1024)  # 1 MiB at 1 GiB/s
    assert cm.kv_capacity_tokens("m") == 10 * 2**20 // 1024


def test_a_slowed_cost_model_scales_compute_and_keeps_copies():
    c = hand_model()
    slow = c.slowed(1.5)
    assert slow.prefill_time("m", [10, 20]) == pytest.approx(1.5 * c.prefill_time("m", [10, 20]))
    assert slow.decode_step_time("m", 4, 100) == pytest.approx(1.5 * c.decode_step_time("m", 4, 100))
    assert slow.switch_time("m") == c.switch_time("m")
    assert slow.kv_swap_time("m", 1024) == c.kv_swap_time("m", 1024)
    with pytest.raises(ValueError):
        c.slowed(0.0)


def test_step_times_never_reach_zero():
    free = ModelCost(Linear3(-1.0, 0.0, 0.0), Linear3(-1.0, 0.0, 0.0), 0, 1)
    cm = CostModel({"m": free}, 1.0, 0)
    assert cm.decode_step_time("m", 1, 1) == MIN_STEP_S
    assert cm.prefill_time("m", [1]) == MIN_STEP_S


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError):
        ModelCost(Linear3(0, 0, 0), Linear3(0, 0, 0), weight_bytes=1, kv_bytes_per_token=0)
    with pytest.raises(ValueError):
        CostModel({}, h2d_bytes_per_s=0.0, kv_capacity_bytes=1)


# -- fitting --------------------------------------------------------------------------------

def test_trimmed_mean_drops_min_and_max():
    assert trimmed_mean([1.0, 2.0, 3.0, 100.0]) == 2.5
    assert trimmed_mean([4.0, 6.0]) == 5.0  # too few to trim


def test_fit_recovers_an_exact_line():
    true = Linear3(0.01, 2e-5, 3e-9)
    points = [(x, y, true(x, y)) for x in (16, 256, 4096) for y in (0, 10**5, 10**7)]
    line, quality = fit_linear3(points)
    assert line.a == pytest.approx(true.a, rel=1e-6)
    assert line.b == pytest.approx(true.b, rel=1e-6)
    assert line.c == pytest.approx(true.c, rel=1e-6)
    assert quality.rel_rms < 1e-9 and quality.points == 9


def test_fit_keeps_coefficients_non_negative():
    # Made with a negative context term: the fit drops that term instead.
    points = [(b, b * ctx, 0.01 + 1e-4 * b - 1e-8 * b * ctx)
              for b in (1, 8, 64) for ctx in (16, 512)]
    line, _ = fit_linear3(points)
    assert min(line.a, line.b, line.c) >= 0.0
    assert line.c == 0.0


def test_cpu_samples_are_trimmed_per_configuration():
    true = Linear3(0.002, 1e-3, 1e-6)
    decode = []
    for batch, ctx in [(1, 100), (4, 400), (16, 1600), (4, 4000)]:
        clean = true(batch, ctx)
        decode += [(batch, ctx, clean), (batch, ctx, clean), (batch, ctx, 10 * clean),
                   (batch, ctx, clean / 10)]  # one outlier each way: both dropped
    prefill = [(t, t * t, 0.01 + 1e-4 * t) for t in (16, 64, 256)]
    fit = fit_cpu_profile(prefill, decode)
    assert fit.decode.a == pytest.approx(true.a, rel=1e-6)
    assert fit.decode.c == pytest.approx(true.c, rel=1e-6)
    assert fit.decode_quality.points == 4


def test_profiles_drop_chunked_prefills():
    prefill, decode = load_gpu_profile(PROFILES, "qwen2_5_7b", "H800")
    assert max(t for t, _, _ in prefill) == PROFILE_TOKEN_BUDGET
    assert len(prefill) == len(decode) == 68  # of 90 files; H800 Qwen also has i4096b1


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("model", MODELS)
def test_gpu_fits_are_close_to_the_profiles(model, device):
    """Relative RMS error per profiled configuration. Measured: prefill 6-13%, decode 3-7%,
    except decode on H20 (14-16%: its steps rise in a staircase a line cannot follow)."""
    fit = fit_gpu_profile(PROFILES, model, device)
    assert fit.prefill_quality.rel_rms < 0.14
    assert fit.decode_quality.rel_rms < (0.17 if device == "H20" else 0.08)
    for line in (fit.prefill, fit.decode):
        assert min(line.a, line.b, line.c) >= 0.0
    if device == "H800":  # the simulated testbed: tighter
        assert fit.prefill_quality.rel_rms < 0.11 and fit.decode_quality.rel_rms < 0.05


def test_h800_fit_against_one_profile_by_hand():
    data = json.loads((PROFILES / "qwen2_5_7b" / "H800" / "i1024b1.json").read_text())
    measured = trimmed_mean(data["prefill_latencies"])  # ~25.6 ms for one 1024-token prompt
    cost = fit_gpu_profile(PROFILES, "qwen2_5_7b", "H800").model_cost(1, 1)
    cm = CostModel({"q": cost}, 1.0, 0)
    assert cm.prefill_time("q", [1024]) == pytest.approx(measured, rel=0.15)  # 28.2 ms: +10%
    step = trimmed_mean(data["decode_latencies"])  # 9.3 ms, one sequence; fit 8.6 ms
    assert cm.decode_step_time("q", 1, 1024) == pytest.approx(step, rel=0.15)


# -- a real engine on CPU -------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_engine(tmp_path_factory):
    from helpers import make_engine
    from tokenpool.models.checkpoint import load_checkpoint
    from tokenpool.models.synth import write_synthetic_checkpoint

    path = write_synthetic_checkpoint(tmp_path_factory.mktemp("tiny"), num_layers=2,
                                      hidden_size=128, num_heads=4, num_kv_heads=2)
    # Unfused kernels: no first-use C++ build, so this file stays fast on its own.
    return make_engine(load_checkpoint(path, progress=False), fused_kernels=False)


def test_engine_sizes(tiny_engine):
    from tokenpool.gpu_pool.weights import packed_index

    weight_bytes, kv_per_token = engine_sizes(tiny_engine)
    assert kv_per_token == 2 * 2 * 2 * 32 * 4  # K and V x 2 layers x 2 heads x 32 dims x fp32
    assert weight_bytes == packed_index(tiny_engine.model_config, tiny_engine.dtype).nbytes


def test_profile_of_a_real_engine(tiny_engine):
    plan = EngineProfilePlan()
    prefill, decode = sample_engine(tiny_engine, plan)
    assert not tiny_engine.has_unfinished() and tiny_engine.num_used_pages == 0
    assert len(prefill) == 6 * plan.repeats  # 3 lengths x 2 batch sizes
    assert {b for b, _, _ in decode} == set(plan.decode_batches)
    fit = fit_cpu_profile(prefill, decode)
    # Timings on a shared 2-core machine are noisy; a line within 2x everywhere still
    # ranks batches correctly, which is what quotas and placement need.
    assert fit.prefill_quality.rel_max < 1.0 and fit.decode_quality.rel_max < 1.0
    assert fit.prefill.a > 0 and fit.decode.a > 0


def test_profile_engine_returns_a_model_cost(tiny_engine):
    small = EngineProfilePlan(prompt_lens=(16, 64), prefill_batches=(1, 2),
                              decode_batches=(1, 4), decode_steps=3, repeats=3)
    cost = profile_engine(tiny_engine, small)
    cm = CostModel({"tiny": cost}, measure_copy_bytes_per_s(8 << 20, repeats=3), 1 << 20)
    assert cost.kv_bytes_per_token == 1024
    assert cm.prefill_time("tiny", [64, 64]) >= cm.prefill_time("tiny", [64]) > 0
    assert 0 < cm.switch_time("tiny") < 1.0  # ~26 MB at several GB/s
