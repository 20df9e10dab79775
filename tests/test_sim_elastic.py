"""The elastic pool on the simulator's clock: the load steps up and down, the pool follows,
and every request finishes (sim/simulator.py, sim/autoscale.py)."""

from __future__ import annotations

import random

import pytest

from tokenpool.schedulers.registry import Roles, make_scheduler
from tokenpool.schedulers.scaling import ScalingConfig, ScalingRule
from tokenpool.schedulers.types import SLO
from tokenpool.sim.autoscale import elastic_role_of, shaped
from tokenpool.sim.simulator import Elastic, simulate
from tokenpool.sim.workload import WorkloadRequest

from test_schedulers import cost

MODELS = "abcdefgh"
SLO_ = SLO(5.0, 0.1)


def stepped_load(rates=((60, 0.5), (120, 12.0), (240, 0.5)), seed=0):
    """Poisson arrivals over MODELS at each (seconds, requests per second) in turn."""
    rng, t, out = random.Random(seed), 0.0, []
    start = 0.0
    for seconds, rate in rates:
        t = start
        while True:
            t += rng.expovariate(rate)
            if t >= start + seconds:
                break
            out.append(WorkloadRequest(f"r{len(out)}", rng.choice(MODELS), t,
                                       rng.randint(50, 400), rng.randint(20, 120)))
        start += seconds
    return out


def run(role_of, roles: Roles, name="token-level", **tuning):
    config = ScalingConfig(**{"min_workers": 2, "max_workers": 8, "start_s": 10.0,
                              "idle_after_s": 20.0, **tuning})
    scheduler = make_scheduler(name, roles, cost(MODELS), lambda m: SLO_)
    elastic = Elastic(ScalingRule(config), config.max_workers, role_of, config.start_s)
    workload = stepped_load()
    return workload, simulate(workload, scheduler, 2, cost(MODELS), lambda m: SLO_, elastic)


def sizes_between(outcome, start: float, end: float) -> list[int]:
    before = [n for t, n in outcome.pool_sizes if t <= start][-1:]
    return before + [n for t, n in outcome.pool_sizes if start < t <= end]


def assert_grew_shrank_and_served_all(workload, outcome, max_workers=8):
    assert len(outcome.timelines) == len(workload)
    assert all(tl.finished for tl in outcome.timelines)  # 0 requests lost
    low, peak, high = (max(sizes_between(outcome, 0, 40)),
                       max(sizes_between(outcome, 60, 180)), outcome.pool_sizes[-1][1])
    assert low == 2 and peak > 2 and high < peak
    assert all(2 <= n <= max_workers for _, n in outcome.pool_sizes)
    # Device time counts every worker up or starting: between the floor and the peak.
    assert 2 * outcome.end_time < outcome.device_s < peak * outcome.end_time


def test_disaggregated_pool_grows_with_the_load_and_shrinks_after_it():
    role = lambda w: "prefill" if w % 4 == 0 else "decode"  # noqa: E731
    workload, outcome = run(role, Roles((0,), (1,)))
    assert_grew_shrank_and_served_all(workload, outcome)


def test_colocated_pool_grows_with_the_load_and_shrinks_after_it():
    workload, outcome = run(lambda w: "prefill+decode", Roles((0, 1), (0, 1)))
    assert_grew_shrank_and_served_all(workload, outcome)


def test_request_level_pool_serves_every_request_while_it_scales():
    workload, outcome = run(lambda w: "prefill+decode", Roles((0, 1), (0, 1)),
                            name="request-level")
    assert all(tl.finished for tl in outcome.timelines)


def test_a_fixed_pool_run_is_unchanged_by_the_elastic_machinery():
    workload = stepped_load(rates=((30, 4.0),))
    scheduler = make_scheduler("token-level", Roles((0,), (1, 2)), cost(MODELS),
                               lambda m: SLO_)
    outcome = simulate(workload, scheduler, 3, cost(MODELS), lambda m: SLO_)
    assert outcome.device_s == pytest.approx(3 * outcome.end_time)
    assert [w.worker for w in outcome.workers] == [0, 1, 2]


def test_sim_roles_keep_the_cluster_s_prefill_share_in_every_prefix_of_ids():
    class Cluster:
        prefill_per_node, devices_per_node = 3, 8

    class Config:
        cluster = Cluster()

    role = elastic_role_of(Config(), "token-level")
    roles = [role(w) for w in range(16)]
    assert "".join(r[0] for r in roles) == "pdpddpdd" * 2
    assert elastic_role_of(Config(), "static")(5) == "prefill+decode"


def test_a_shaped_workload_keeps_the_shares_of_each_stretch():
    workload = [WorkloadRequest(f"r{i}", "a", i * 0.01, 10, 10) for i in range(10_000)]
    kept = shaped(workload, [0.25, 1.0])
    first = sum(r.arrival_s < 50 for r in kept)
    assert first == pytest.approx(1250, abs=5) and len(kept) - first == pytest.approx(5000, 5)
    with pytest.raises(ValueError):
        shaped(workload, [1.5])
