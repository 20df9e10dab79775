"""Token-level decode placement and prefetch, and what keeps the simulator fast and
reproducible (issue 4): hand-built situations, plus runs in fresh processes."""

from __future__ import annotations

import gc
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from tokenpool.schedulers.choices import candidates
from tokenpool.schedulers.decode import WeightedRoundRobinDecode
from tokenpool.schedulers.decode_batches import SLOWDOWN_SMOOTHING
from tokenpool.schedulers.types import Decode, Prefetch, RequestInfo, Switch

from test_schedulers import SIM_CONFIG, WORKLOADS, cost


def decode_units(job):
    return next(u for u in job.units if isinstance(u, Decode))


def test_placement_looks_at_the_next_round_not_the_last_ones_alpha():
    d = WeightedRoundRobinDecode([0, 1], cost(), q_max_s=0.5)
    d.place("r0", "a", 100, 0.1, local=1)  # worker 1 holds a
    d.workers[0].alpha = 3.0  # an overloaded round long ago; worker 0 is empty now
    # Worker 1 with b too: d = 0.011 s each, n = 9.09, sum 1/n = 0.22, c0 = 2 s:
    # alpha = 2 / (9.09 * 0.5) + 0.22 = 0.66. Worker 0 with b alone: the floor, 0.5.
    assert d._alpha_with(d.workers[1], "b", 100, 0.1) == pytest.approx(0.66, abs=1e-3)
    assert d.place("r1", "b", 100, 0.1) == 0


def test_predicted_alpha_is_the_alpha_of_the_round_that_follows():
    d = WeightedRoundRobinDecode([0], cost(), q_max_s=1.0)
    d.place("r0", "a", 300, 0.1)
    d.place("r1", "a", 200, 0.1)
    predicted = d._alpha_with(d.workers[0], "b", 150, 0.05)
    d.place("r2", "b", 150, 0.05)
    d.next_job(0)
    assert d.workers[0].alpha == pytest.approx(predicted)
    assert d.workers[0].alpha > 0.5  # above the floor: the formula itself, not the floor


def test_last_turn_of_a_round_prefetches_the_model_the_next_round_opens_with():
    d = WeightedRoundRobinDecode([0], cost())
    d.place("r0", "a", 100, 0.1)
    d.place("r1", "b", 100, 0.1)
    first = d.next_job(0)
    assert Prefetch(0, "b") in first.units
    d.decoded(0, ("r0",), steps=3, finished=())
    last = d.next_job(0)  # b's turn ends the round; the next one opens with a (r0 is older)
    assert Switch(0, "b") in last.units and Prefetch(0, "a") in last.units
    d.decoded(0, ("r1",), steps=3, finished=())
    assert decode_units(d.next_job(0)).model == "a"


def test_a_lone_model_prefetches_nothing():
    d = WeightedRoundRobinDecode([0], cost())
    d.place("r0", "a", 100, 0.1)
    assert not any(isinstance(u, Prefetch) for u in d.next_job(0).units)


def test_kv_bytes_follow_the_requests():
    c = cost()
    d = WeightedRoundRobinDecode([0], c)
    d.place("r0", "a", 100, 0.1)
    d.place("r1", "b", 40, 0.1)
    d.place("r2", "a", 60, 0.1)
    d.next_job(0)
    d.decoded(0, ("r0", "r2"), steps=7, finished=("r2",))
    w = d.workers[0]
    assert w.tokens == {"a": 107, "b": 40}
    assert w.kv_bytes == c.kv_bytes("a", 107) + c.kv_bytes("b", 40)
    d.decoded(0, ("r0",), steps=1, finished=("r0",))
    d.decoded(0, ("r1",), steps=1, finished=("r1",))
    assert (w.kv_bytes, w.tokens, w.counts, d.active) == (0, {}, {}, set())


def test_turns_slower_than_predicted_raise_the_measured_alpha_only():
    c = cost()
    d = WeightedRoundRobinDecode([0, 1], c, q_max_s=0.5)
    d.place("r0", "a", 100, 0.1, local=0)
    d.place("r1", "a", 100, 0.1, local=1)
    for _ in range(30):  # worker 0's turns take twice the predicted step time
        predicted = c.decode_step_time("a", 1, d.workers[0].tokens["a"])
        d.decoded(0, ("r0",), steps=10, finished=(), seconds=20 * predicted)
        d.decoded(1, ("r1",), steps=10, finished=())  # the same turns, not measured
    assert d.workers[0].slowdown == pytest.approx(2.0, rel=0.01)
    assert d.workers[1].slowdown == 1.0
    new = RequestInfo("r2", "b", 99, 0.0, 16)
    profiled = d.alpha_with(0, new, 0.1)
    assert profiled == d.alpha_with(1, new, 0.1)  # placement: the profile's
    assert d.alpha_with(0, new, 0.1, measured=True) > profiled
    assert d.alpha_with(1, new, 0.1, measured=True) == profiled


def test_rounds_are_planned_with_the_measured_step_time():
    """A turn decodes for its quota in seconds: on steps twice as slow as profiled, a round
    planned by the profile yields half the tokens, and token gaps twice the planned ones."""
    from tokenpool.schedulers.quota import round_quotas

    c = cost()
    d = WeightedRoundRobinDecode([0, 1], c, q_max_s=10.0)  # alpha at its floor, 0.5
    for w in (0, 1):
        d.place(f"a{w}", "a", 100, 0.1, local=w)
        d.place(f"b{w}", "b", 100, 0.1, local=w)
    d.workers[0].slowdown = 2.0  # as `decoded` leaves it after turns that ran 2x slow
    steps = [c.decode_step_time(m, 1, 100) for m in ("a", "b")]
    switch = c.switch_time("a") + c.switch_time("b")
    slow, profiled = (round_quotas([s * k for s in steps], [0.1, 0.1], switch, 10.0)
                      for k in (2.0, 1.0))
    assert decode_units(d.next_job(0)).quota_s == pytest.approx(slow.quotas[0])
    assert decode_units(d.next_job(1)).quota_s == pytest.approx(profiled.quotas[0])
    assert slow.quotas[0] > profiled.quotas[0]  # the same tokens take longer
    assert (d.workers[0].alpha, d.workers[1].alpha) == (pytest.approx(slow.alpha),
                                                        pytest.approx(profiled.alpha))


def test_slowdown_moves_gradually_and_within_its_range():
    c = cost()
    d = WeightedRoundRobinDecode([0], c)
    d.place("r0", "a", 100, 0.1)
    predicted = c.decode_step_time("a", 1, 100)
    d.decoded(0, ("r0",), steps=1, finished=(), seconds=1000 * predicted)  # one stall
    assert d.workers[0].slowdown == pytest.approx(1.0 + SLOWDOWN_SMOOTHING * (4.0 - 1.0))
    d.decoded(0, ("r0",), steps=0, finished=(), seconds=5.0)  # no steps: nothing measured
    d.decoded(0, ("r0",), steps=3, finished=())  # not measured (the simulator)
    assert d.workers[0].slowdown == pytest.approx(1.6)


def test_sampled_candidates_are_the_draws_randrange_would_make():
    items = list(range(125))
    ours, reference = random.Random(7), random.Random(7)
    for _ in range(500):
        expected = [items[reference.randrange(len(items))] for _ in range(4)]
        assert candidates(items, ours) == expected
    assert candidates(items[:16], ours) == items[:16]  # few enough: compare them all


def test_simulation_leaves_the_garbage_collector_as_it_found_it():
    from test_schedulers import simulate_file

    assert gc.isenabled()
    simulate_file("synth-8-0.1-1.0-1.0.csv", "token-level")
    assert gc.isenabled()
    gc.disable()
    try:
        simulate_file("synth-8-0.1-1.0-1.0.csv", "token-level")
        assert not gc.isenabled()
    finally:
        gc.enable()


def simulate_in_a_fresh_process(tmp_path: Path, hash_seed: str) -> bytes:
    out = tmp_path / f"out-{hash_seed}.json"
    command = [sys.executable, "-m", "tokenpool.cli.main", "simulate", "--config",
               str(SIM_CONFIG), "--workload", str(WORKLOADS / "synth-40-0.1-1.0-1.0.csv"),
               "--json", str(out)]
    env = {**os.environ, "PYTHONHASHSEED": hash_seed}
    subprocess.run(command, check=True, env=env, capture_output=True)
    return out.read_bytes()


def test_same_json_whatever_the_string_hash_seed(tmp_path):
    """Determinism across runs of the CLI: separate processes, whose string hashes (and so
    the order of any set of model names) differ."""
    first = simulate_in_a_fresh_process(tmp_path, "1")
    assert first == simulate_in_a_fresh_process(tmp_path, "2")
    assert json.loads(first)["requests"] > 0
