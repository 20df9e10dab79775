"""The controller loop on the wall clock, driving real workers with the same policies.

Three synthetic Llamas of different shapes share one worker (colocated roles). Requests of
all three arrive at staggered times; whatever the interleaving of switches, prefills, turns
and swaps, each request's greedy tokens must equal a standalone engine's.
"""

from __future__ import annotations


import pytest

from tokenpool.controller import loop
from tokenpool.gpu_pool.worker_executor import WorkerExecutor
from tokenpool.models.checkpoint import load_checkpoint
from tokenpool.models.synth import write_synthetic_checkpoint
from tokenpool.sampling import SamplingParams
from tokenpool.schedulers.registry import Roles, make_scheduler
from tokenpool.schedulers.types import SLO, RequestInfo

SHAPES = {"m-a": dict(num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2),
          "m-b": dict(num_layers=3, hidden_size=96, num_heads=6, num_kv_heads=3,
                      tie_word_embeddings=False),
          "m-c": dict(num_layers=1, hidden_size=128, num_heads=4, num_kv_heads=1)}
PROMPTS = [[1, 504, 3458, 282], [30, 2200, 17, 4302, 9, 88], [7, 7, 7], [400, 12, 99, 1000, 5]]
# Mixed lengths, so requests also finish inside other requests' units (an engine step serves
# all of a model's running requests): those finishes must reach the policy too.
PARAMS = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in (12, 2, 5, 1)]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("real-fleet")
    return {name: load_checkpoint(write_synthetic_checkpoint(root / name, seed=i, **shape),
                                  progress=False)
            for i, (name, shape) in enumerate(SHAPES.items())}


@pytest.fixture(scope="module")
def expected(checkpoints):
    from helpers import make_engine

    return {name: make_engine(ckpt, kv_cache_bytes=8 << 20).generate(PROMPTS, PARAMS)
            for name, ckpt in checkpoints.items()}


def make_worker(checkpoints):
    from helpers import worker_over

    return worker_over(checkpoints, kv_cache_bytes=8 << 20, swap_bytes=1 << 30, prefetch=True)


@pytest.fixture(scope="module")
def worker_costs(checkpoints):
    """The real worker's own cost model: a short profile of each engine (DESIGN §3.4)."""
    from tokenpool.controller.cost_fit import cost_model_of
    from tokenpool.gpu_pool.profiling import EngineProfilePlan, profile_worker

    plan = EngineProfilePlan(prompt_lens=(8, 32), prefill_batches=(1, 2),
                             decode_batches=(1, 4), decode_prompt_lens=(8, 32), repeats=2)
    return cost_model_of(profile_worker(make_worker(checkpoints), plan))


def test_the_profiled_costs_are_sane(worker_costs):
    for name in SHAPES:
        assert 0 < worker_costs.decode_step_time(name, 1, 16) < 1.0
        assert worker_costs.decode_step_time(name, 8, 400) >= worker_costs.decode_step_time(
            name, 1, 16)
        assert 0 < worker_costs.switch_time(name) < 0.1  # a few MB at memcpy speed


@pytest.mark.parametrize("scheduler_name", ["token-level", "request-level"])
def test_real_workers_serve_interleaved_models_exactly(checkpoints, expected, worker_costs,
                                                       scheduler_name):
    worker = make_worker(checkpoints)
    outputs: dict[str, list[int]] = {}
    clock = loop.WallClock()
    executor = WorkerExecutor([worker], lambda out: outputs.setdefault(
        out.request_id, []).extend(out.new_token_ids), clock.now)
    scheduler = make_scheduler(scheduler_name, Roles((0,), (0,)), worker_costs,
                               lambda model: SLO(5.0, 0.5), q_max_s=0.05)
    arrivals = []
    for i, (prompt, params) in enumerate(zip(PROMPTS, PARAMS)):
        for j, name in enumerate(SHAPES):
            request_id = f"{name}/{i}"
            executor.register(request_id, prompt, params)
            arrivals.append((0.01 * (i * len(SHAPES) + j),
                             RequestInfo(request_id, name, len(prompt), 0.0, params.max_tokens)))
    loop.run(scheduler, executor, clock, 1, arrivals)
    for name in SHAPES:
        got = [outputs[f"{name}/{i}"] for i in range(len(PROMPTS))]
        assert got == expected[name], name
    assert worker.num_switches >= len(SHAPES)
    assert worker.usage()["kv"]["used"] == 0 and worker.usage()["swap"]["used"] == 0
    assert scheduler.num_unfinished() == 0
