"""The controller core on the wall clock, driving a real worker with the same policies.

Three synthetic models of different families and shapes (a Qwen2, a Gemma 2 and a Llama)
share one worker (colocated roles). Requests of all three arrive at staggered times; whatever
the interleaving of switches across families, prefills, turns and swaps, each request's
greedy tokens must equal a standalone engine's.
"""

from __future__ import annotations

import time

import pytest

from tokenpool.controller.core import ControllerCore, CoreConfig
from tokenpool.controller.pool_stats import PoolStats
from tokenpool.controller.service import ServingController
from tokenpool.gpu_pool.job_runner import JobRunner
from tokenpool.gpu_pool.pool import LocalPool
from tokenpool.gpu_pool.pool_config import PoolConfig
from tokenpool.models.checkpoint import load_checkpoint
from tokenpool.models.synth import write_synthetic_checkpoint
from tokenpool.sampling import SamplingParams
from tokenpool.schedulers.registry import Roles, make_scheduler
from tokenpool.schedulers.types import SLO

SHAPES = {"m-a": dict(family="qwen2", num_layers=2, hidden_size=64, num_heads=4,
                      num_kv_heads=2),
          "m-b": dict(family="gemma2", num_layers=3, hidden_size=96, num_heads=6,
                      num_kv_heads=3, tie_word_embeddings=False),
          "m-c": dict(num_layers=1, hidden_size=128, num_heads=4, num_kv_heads=1)}
PROMPTS = [[1, 504, 3458, 282], [30, 2200, 17, 4302, 9, 88], [7, 7, 7], [400, 12, 99, 1000, 5]]
# Mixed lengths, so requests of one model finish in different turns.
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
    from serving_fixtures import wait_until_idle
    from test_service import Client

    worker = make_worker(checkpoints)
    scheduler = make_scheduler(scheduler_name, Roles((0,), (0,)), worker_costs,
                               lambda model: SLO(5.0, 0.5), q_max_s=0.05)
    slos = {name: SLO(5.0, 0.5) for name in SHAPES}
    pool = LocalPool(PoolConfig(num_workers=1), lambda i: JobRunner(worker, i))
    controller = ServingController(pool)
    pool.start(controller)
    controller.start(ControllerCore(scheduler, CoreConfig(1), PoolStats(1, slos)))
    client = Client(controller)
    try:
        for i, (prompt, params) in enumerate(zip(PROMPTS, PARAMS)):
            for name in SHAPES:
                client.submit(f"{name}/{i}", name, prompt, params)
                time.sleep(0.01)
        client.wait([f"{name}/{i}" for name in SHAPES for i in range(len(PROMPTS))])
        snap = wait_until_idle(controller, timeout_s=60)
    finally:
        controller.close()
    for name in SHAPES:
        got = [client.tokens(f"{name}/{i}") for i in range(len(PROMPTS))]
        assert got == expected[name], name
    assert worker.num_switches >= len(SHAPES)
    assert snap["loop_errors"] == 0
    assert worker.usage()["kv"]["used"] == 0 and worker.usage()["swap"]["used"] == 0
    assert scheduler.num_unfinished() == 0
