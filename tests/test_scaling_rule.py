"""The elastic pool's scaling rule on hand-built views (schedulers/scaling.py)."""

from __future__ import annotations

import pytest

from tokenpool.errors import ConfigError
from tokenpool.schedulers.scaling import (MIN_OVER, ScaleDown, ScaleUp, ScalingConfig,
                                          ScalingRule, ScalingView, WorkerLoad)


def rule(**tuning) -> ScalingRule:
    bounds = {"min_workers": 2, "max_workers": 8}
    return ScalingRule(ScalingConfig(**{**bounds, **tuning}))


def worker(w: int, role: str = "decode", load: float | None = 0.7, holds: int = 3,
           idle_s: float = 0.0, busy: float | None = None, draining: bool = False):
    if role == "prefill":
        load = None
    return WorkerLoad(w, role, holds, idle_s, load, draining, busy)


def pool(*workers, pending=(), room=(4, 4)) -> ScalingView:
    return ScalingView(tuple(workers), tuple(pending), *room)


def disaggregated(*loads, prefill_busy=(None,)):
    """Prefill workers 0.. (with their busy shares), then decode workers with `loads`."""
    ps = [worker(i, "prefill", busy=b) for i, b in enumerate(prefill_busy)]
    return pool(*ps, *[worker(len(ps) + i, load=x) for i, x in enumerate(loads)])


def run(r: ScalingRule, view: ScalingView, start: float, end: float, step: float = 1.0):
    """Decisions at every check from start to end (inclusive), as (time, decision)."""
    out, t = [], start
    while t <= end + 1e-9:
        d = r.decide(t, view)
        if d is not None:
            out.append((t, d))
        t += step
    return out


# -- growing ---------------------------------------------------------------------------------

def test_sustained_decode_overload_grows_enough_decode_workers():
    r = rule()
    hot = disaggregated(1.6, 1.3)
    decisions = run(r, hot, 0.0, 10.0)
    # Both decode workers as loaded as the lightest (1.3), brought to 0.8 each:
    # ceil(2 * 1.3 / 0.8) - 2 = 2 more; once grow_after_s (10 s) of overload has held.
    assert decisions == [(10.0, ScaleUp(0, 2))]


def test_a_blip_of_overload_does_not_grow():
    r = rule()
    assert run(r, disaggregated(1.5, 1.5), 0.0, 6.0) == []
    assert run(r, disaggregated(0.5, 1.5), 7.0, 7.0) == []  # one worker has room: clock off
    assert run(r, disaggregated(1.5, 1.5), 8.0, 17.0) == []  # 10 s not held again yet
    assert run(r, disaggregated(1.5, 1.5), 18.0, 18.0) == [(18.0, ScaleUp(0, 2))]


def test_one_overloaded_worker_among_light_ones_does_not_grow_the_pool():
    r = rule()
    assert run(r, disaggregated(5.0, 0.3, 0.2), 0.0, 60.0) == []


def test_arrivals_predicted_over_their_ttft_slo_grow_a_prefill_worker():
    r = rule()
    r.decide(0.0, disaggregated(0.5))
    for i in range(20):
        r.arrived(i * 0.5, over_slo=i % 4 == 0)  # 5 of 20 over: 25%
    assert r.decide(10.0, disaggregated(0.5)) == ScaleUp(1, 0)


def test_a_few_arrivals_over_the_slo_are_a_blip():
    r = rule()
    r.decide(0.0, disaggregated(0.5))
    for i in range(10):
        r.arrived(i, over_slo=i < MIN_OVER - 1)  # 20% over, but fewer than MIN_OVER
    assert r.decide(10.0, disaggregated(0.5)) is None


def test_no_growth_while_workers_are_starting_nor_beyond_the_room_left():
    r = rule()
    hot = disaggregated(2.0, 2.0)
    starting = pool(*hot.workers, pending=(5,))
    assert run(r, starting, 0.0, 30.0) == []
    full = pool(*hot.workers, room=(0, 1))
    assert run(r, full, 31.0, 41.0) == [(41.0, ScaleUp(0, 1))]  # capped at the room
    assert run(r, pool(*hot.workers, room=(0, 0)), 42.0, 80.0) == []


def test_cooldown_separates_two_actions():
    r = rule(cooldown_s=30.0)
    hot = disaggregated(1.5, 1.5)
    first = run(r, hot, 0.0, 60.0)
    assert [t for t, _ in first] == [30.0, 60.0]  # every 30 s, though 10 s of overload suffice


# -- shrinking -------------------------------------------------------------------------------

def test_a_worker_idle_and_empty_long_enough_is_drained():
    r = rule()
    view = pool(worker(0, "prefill"), worker(1), worker(2, holds=0, load=0.0, idle_s=29.0),
                worker(3, holds=0, load=0.0, idle_s=40.0))
    # Worker 3 has held nothing for idle_after_s (30 s), worker 2 not quite.
    assert r.decide(0.0, view) is None  # the first look starts the cooldown
    assert r.decide(10.0, view) == ScaleDown((3,))


def test_never_the_last_worker_of_a_role_nor_below_min_workers():
    r = rule(min_workers=1)
    lone = pool(worker(0, "prefill", holds=0, idle_s=99.0), worker(1, holds=0, load=0.0,
                                                                  idle_s=99.0))
    assert run(r, lone, 0.0, 60.0) == []
    r = rule(min_workers=3)
    three = pool(worker(0, "prefill"), *[worker(w, holds=0, load=0.0, idle_s=99.0)
                                          for w in (1, 2)])
    assert run(r, three, 0.0, 60.0) == []


def test_min_workers_counts_the_workers_the_rule_leaves_alone():
    """Pinned models' workers are not in the view, but min_workers bounds the whole pool: 3
    pooled workers stay at a floor of 3; with a pinned one up besides, one of them may go."""
    idle = [worker(0, "prefill"), *[worker(w, holds=0, load=0.0, idle_s=99.0) for w in (1, 2)]]
    alone = ScalingView(tuple(idle), (), 4, 4)
    assert run(rule(min_workers=3), alone, 0.0, 60.0) == []
    pinned = ScalingView(tuple(idle), (), 4, 4, unscaled=1)
    assert run(rule(min_workers=3), pinned, 0.0, 10.0) == [(10.0, ScaleDown((2,)))]


def test_decode_work_that_fits_fewer_workers_drains_the_lightest_at_once():
    r = rule()
    light = disaggregated(0.3, 0.1, 0.2, 0.25)
    decisions = run(r, light, 0.0, 40.0)
    # Sum 0.85 at 0.6 each needs 2 of the 4: the two lightest (0.1, 0.2) go, after 30 s calm.
    assert decisions == [(30.0, ScaleDown((2, 3)))]


def test_no_shrinking_while_any_decode_worker_is_overloaded():
    r = rule()
    view = pool(worker(0, "prefill"), worker(1, load=1.4), worker(2, load=0.0, holds=0,
                                                                 idle_s=99.0))
    assert run(r, view, 0.0, 60.0) == []


def test_a_worker_still_starting_goes_first_when_load_falls():
    r = rule()
    light = pool(*disaggregated(0.1, 0.1, 0.1).workers, pending=(6,))
    assert run(r, light, 0.0, 30.0) == [(30.0, ScaleDown((6,)))]


def test_idle_prefill_capacity_drains_the_least_busy_prefill_worker():
    r = rule()
    view = disaggregated(0.7, 0.7, prefill_busy=(0.3, 0.1, 0.2))
    # 0.6 of prefill work over 2 workers: 0.3 <= 0.6. Not before a whole window (30 s).
    assert run(r, view, 0.0, 30.0) == [(30.0, ScaleDown((1,)))]
    r = rule()
    assert run(r, disaggregated(0.7, 0.7, prefill_busy=(0.9, 0.8)), 0.0, 60.0) == []


# -- config ----------------------------------------------------------------------------------

@pytest.mark.parametrize("tuning", [{"grow_after_s": 0}, {"cooldown_s": -1},
                                    {"grow_step": 0}, {"min_workers": 3, "max_workers": 2},
                                    {"shrink_load": -0.1}])
def test_bad_tuning_is_refused(tuning):
    with pytest.raises(ConfigError):
        ScalingConfig(**tuning)


def test_bounds_come_from_the_pool_unless_set_and_the_rule_needs_them():
    c = ScalingConfig(max_workers=9).bounded(2, 6)
    assert (c.min_workers, c.max_workers) == (2, 9)
    with pytest.raises(ValueError):
        ScalingRule(ScalingConfig())


def test_fleet_and_simulation_files_carry_a_scaling_block():
    from pathlib import Path

    from tokenpool.config import build
    from tokenpool.fleet import FleetConfig
    from tokenpool.sim.config import load_sim_config

    fleet = build(FleetConfig, {"models": [{"id": "m", "source": "x.gguf"}],
                                "pool": {"num_workers": 2, "max_workers": 4},
                                "scaling": {"grow_after_s": 5}})
    assert fleet.pool.elastic and fleet.scaling.grow_after_s == 5
    with pytest.raises(ConfigError, match="pool.min_workers"):
        build(FleetConfig, {"models": [{"id": "m", "source": "x.gguf"}],
                            "scaling": {"max_workers": 4}})
    with pytest.raises(ConfigError, match="scaling.grow_typo"):
        build(FleetConfig, {"models": [{"id": "m", "source": "x.gguf"}],
                            "scaling": {"grow_typo": 4}})
    configs = Path(__file__).resolve().parents[1] / "configs" / "sim"
    assert load_sim_config(configs / "market-day.yaml").scaling.start_s == 60.0


def test_an_elastic_fleet_s_core_runs_the_rule_over_every_slot():
    from tokenpool.config import build
    from tokenpool.controller.stack import make_core
    from tokenpool.fleet import FleetConfig

    from test_schedulers import cost

    fleet = build(FleetConfig, {"models": [{"id": "m", "source": "x.gguf"}],
                                "pool": {"num_workers": 2, "min_workers": 1,
                                         "max_workers": 4}})
    core = make_core(fleet, cost(("m",)))
    assert core.members.max_workers == 4 and len(core.stats.workers) == 4
    assert (core.members.rule.config.min_workers, core.members.rule.config.max_workers) == (1, 4)
    fixed = make_core(build(FleetConfig, {"models": [{"id": "m", "source": "x.gguf"}]}),
                      cost(("m",)))
    assert fixed.members.rule is None
