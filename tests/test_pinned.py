"""Pinned models (issue 26 item 7): a hot model keeps workers of its own, the rest pool.

The composite policy on the simulator and on hand-made calls, its membership forwarding,
the registry's worker split, and the fleet file's `pin:` checks.
"""

from __future__ import annotations

import pytest

from tokenpool.errors import ConfigError
from tokenpool.schedulers.cost import CostModel, Linear3, ModelCost
from tokenpool.schedulers.partitioned import PartitionedScheduler, split_workers
from tokenpool.schedulers.registry import Roles, make_scheduler
from tokenpool.schedulers.types import (SLO, DecodeDone, Job, Prefill, PrefillDone,
                                        RequestInfo, Switch)
from tokenpool.sim.simulator import simulate
from tokenpool.sim.workload import WorkloadRequest

GiB = 1 << 30
MODELS = ("a", "b", "c")


def cost(models=MODELS) -> CostModel:
    # Prefill 10 ms + 0.1 ms/token; decode 10 ms + 1 ms per request; switch 1 s.
    spec = ModelCost(Linear3(0.01, 1e-4, 0.0), Linear3(0.01, 1e-3, 0.0), GiB, 1024)
    return CostModel({m: spec for m in models}, float(GiB), 1024 * 10_000)


def slo_of(_model: str) -> SLO:
    return SLO(10.0, 0.1)


class Recording:
    """A policy that keeps every job it hands out, around the one under test."""

    def __init__(self, inner):
        self.inner, self.jobs = inner, []

    def schedule(self, idle, now):
        jobs = self.inner.schedule(idle, now)
        self.jobs += jobs
        return jobs

    def __getattr__(self, name):
        return getattr(self.inner, name)


def workload(n: int = 60) -> list[WorkloadRequest]:
    """Half the requests for `a`, the rest split between b and c, 20 ms apart from 0.5 s."""
    return [WorkloadRequest(f"r{i}", "a" if i % 2 == 0 else MODELS[1 + i % 4 // 2],
                            0.5 + i * 0.02, 50 + i % 7 * 10, 5 + i % 5) for i in range(n)]


@pytest.mark.parametrize("name", ["token-level", "request-level", "static"])
def test_a_pinned_model_runs_only_on_its_workers_which_load_it_once(name):
    policy = make_scheduler(name, Roles((0, 1, 2, 3), (0, 1, 2, 3)), cost(), slo_of,
                            model_load={m: 1.0 for m in MODELS}, pins={"a": 2})
    assert isinstance(policy, PartitionedScheduler) and policy.pinned == {0: "a", 1: "a"}
    recorded = Recording(policy)
    outcome = simulate(workload(), recorded, 4, cost(), slo_of)
    assert all(tl.finished for tl in outcome.timelines)
    assert policy.num_unfinished() == 0
    for job in recorded.jobs:
        models = {u.model for u in job.units}
        assert (models == {"a"}) == (job.worker in (0, 1)), job
    # One load each, at start-up before any request, never a switch afterwards.
    assert [w.switches for w in outcome.workers[:2]] == [1, 1]
    first = {w: next(j for j in recorded.jobs if j.worker == w) for w in (0, 1)}
    assert first[0].units == (Switch(0, "a"),) and first[1].units == (Switch(1, "a"),)
    switches = [u for j in recorded.jobs if j.worker < 2 for u in j.units if type(u) is Switch]
    assert len(switches) == 2
    prefilled = {r for j in recorded.jobs for u in j.units if type(u) is Prefill
                 for r in u.request_ids if j.worker < 2}
    assert prefilled == {f"r{i}" for i in range(0, 60, 2)}


def test_requests_estimates_and_state_route_by_model_and_worker():
    policy = make_scheduler("token-level", Roles((0, 1, 2), (0, 1, 2)), cost(), slo_of,
                            model_load={m: 1.0 for m in MODELS}, pins={"b": 1})
    a, b = RequestInfo("x", "a", 100, 0.0, 8), RequestInfo("y", "b", 100, 0.0, 8)
    policy.add_request(a, 0.0)
    policy.add_request(b, 0.0)
    assert policy.num_unfinished() == 2
    assert policy.estimate(b, slo_of("b")) is not None
    jobs = {j.worker: j for j in policy.schedule({0, 1, 2}, 0.0)}
    # b's request on its worker 0 (after its load), a's on the pool's 1 or 2.
    assert [type(u) for u in jobs[0].units] == [Switch, Prefill]
    assert {u.model for w, j in jobs.items() if w for u in j.units} == {"a"}
    assert policy.worker_state(0) is not None and policy.worker_state(7) is None


class Fake:
    """An inner policy that records what reaches it."""

    name = "fake"

    def __init__(self):
        self.calls, self.idle, self.results = [], [], []

    def schedule(self, idle, now):
        self.idle.append(set(idle))
        return []

    def update(self, results, now):
        self.results += list(results)

    def num_unfinished(self):
        return 1

    def add_worker(self, worker, role):
        self.calls.append(("add", worker, role))

    def drain_worker(self, worker):
        self.calls.append(("drain", worker))

    def remove_worker(self, worker):
        self.calls.append(("remove", worker))

    def holds(self, worker):
        return 10 + worker


def test_membership_goes_to_the_workers_partition_and_new_workers_pool():
    pinned, pooled = Fake(), Fake()
    policy = PartitionedScheduler({"a": (pinned, [0])}, (pooled, [1, 2]))
    assert policy.num_unfinished() == 2
    policy.add_worker(5, "prefill+decode")
    policy.drain_worker(0)
    policy.drain_worker(5)
    assert policy.holds(0) == 10 and policy.holds(5) == 15 and policy.holds(9) == 0
    policy.remove_worker(0)
    assert pinned.calls == [("drain", 0), ("remove", 0)]
    assert pooled.calls == [("add", 5, "prefill+decode"), ("drain", 5)]
    assert policy.schedule({0, 1, 5}, 0.0) == []  # worker 0 is gone: nobody loads it
    assert pooled.idle[-1] == {1, 5} and pinned.idle == []
    # A pinned worker that comes back rejoins its model, and loads it again.
    policy.add_worker(0, "prefill+decode")
    assert pinned.calls[-1] == ("add", 0, "prefill+decode")
    assert policy.schedule({0}, 1.0) == [Job(0, (Switch(0, "a"),))]
    policy.add_worker(0, "prefill+decode")  # taken back from draining: its weights are in
    assert policy.schedule({0}, 1.0) == []
    done = [DecodeDone(0, "a", ("p",), 1, ()), PrefillDone(1, "b", ("q",), ())]
    policy.update(done, 1.0)
    assert pinned.results == done[:1] and pooled.results == done[1:]


def test_membership_with_the_token_level_policy_inside():
    policy = make_scheduler("token-level", Roles((0, 1), (0, 1)), cost(), slo_of,
                            model_load={m: 1.0 for m in MODELS}, pins={"a": 1})
    policy.add_worker(2, "prefill+decode")  # joins the pool, which drains its first worker
    policy.drain_worker(1)
    assert policy.holds(1) == 0
    policy.remove_worker(1)
    policy.add_request(RequestInfo("x", "b", 100, 0.0, 8), 0.0)
    policy.add_request(RequestInfo("y", "a", 100, 0.0, 8), 0.0)
    assert (policy.holds(0), policy.holds(2)) == (1, 1)
    jobs = {j.worker: j.units for j in policy.schedule({0, 1, 2}, 0.0)}
    assert [(type(u), u.model) for u in jobs[0]] == [(Switch, "a"), (Prefill, "a")]
    assert {u.model for u in jobs[2]} == {"b"} and 1 not in jobs


def test_the_pool_keeps_workers_for_unpinned_models():
    both = (0, 1, 2, 3)
    assert split_workers({"a": 1, "b": 2, "c": 0}, both, both).pinned == \
        {"a": (0,), "b": (1, 2)}
    # Mixed roles: pins take workers that do both; the pool keeps its prefill:decode split.
    split = split_workers({"a": 2}, (0, 1, 2, 3), (0, 1, 4, 5))
    assert split.pinned == {"a": (0, 1)}
    assert (split.prefill, split.decode, split.pooled) == ((2, 3), (4, 5), [2, 3, 4, 5])
    with pytest.raises(ConfigError, match="both prefill and decode"):
        split_workers({"a": 1}, (0, 1), (2, 3))
    with pytest.raises(ConfigError, match="leave none"):
        split_workers({"a": 2}, (0, 1), (0, 1))
    # Every model pinned: no pool needed.
    policy = make_scheduler("token-level", Roles((0, 1), (0, 1)), cost(("a", "b")), slo_of,
                            model_load={"a": 1.0, "b": 1.0}, pins={"a": 1, "b": 1})
    assert policy.pooled is None and policy.pinned == {0: "a", 1: "b"}
    with pytest.raises(ValueError, match="not pinned"):
        policy.add_request(RequestInfo("x", "c", 10, 0.0, 4), 0.0)


FLEET = """\
models:
  - {{id: t0, source: "synth:2,64,4,2@1", pin: {pin}}}
  - {{id: t1, source: "synth:2,64,4,2@2"}}
engine: {{device: cpu, dtype: float32, kv_cache_bytes: 16MiB}}
pool: {{backend: local, num_workers: {workers}, prefill_workers: {prefill}}}
"""


def fleet(tmp_path, pin=1, workers=2, prefill=0):
    from tokenpool.fleet import load_fleet

    path = tmp_path / "fleet.yaml"
    path.write_text(FLEET.format(pin=pin, workers=workers, prefill=prefill))
    return load_fleet(path, check_memory=False)


@pytest.mark.parametrize("kwargs, message", [
    (dict(pin=-1), "models.t0.pin must be >= 0"),
    (dict(pin="two"), "models.*pin"),
    (dict(pin=2), "pins take 2 of pool.num_workers .2., leaving none"),
    (dict(pin=1, workers=3, prefill=1), "pin: pinned models need colocated workers"),
])
def test_bad_pins_in_a_fleet_file_name_the_key(tmp_path, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        fleet(tmp_path, **kwargs)


def test_a_fleet_file_pins_its_first_workers(tmp_path):
    from tokenpool.controller.stack import scheduler_for

    spec = fleet(tmp_path, pin=2, workers=4)
    assert [m.pin for m in spec.models] == [2, 0]
    policy = scheduler_for(spec, cost(("t0", "t1")))
    assert policy.pinned == {0: "t0", 1: "t0"}
    assert sorted(policy.pooled.workers) == [2, 3]
    assert not isinstance(scheduler_for(fleet(tmp_path, pin=0), cost(("t0", "t1"))),
                          PartitionedScheduler)


# -- real workers ------------------------------------------------------------------------------

SHAPES = {"m-a": dict(num_layers=1, hidden_size=64, num_heads=4, num_kv_heads=2),
          "m-b": dict(num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=1),
          "m-c": dict(num_layers=1, hidden_size=32, num_heads=2, num_kv_heads=1)}
PROMPTS = [[1, 504, 3458, 282], [30, 2200, 17, 4302, 9, 88], [7, 7, 7]]


def run_core(core, runners, arrivals) -> tuple[dict, dict]:
    """The core over real workers' job runners, one job at a time in this thread: each
    request's tokens, and each worker's switches."""
    from tokenpool.gpu_pool.protocol import JobDone

    tokens, switched = {}, {w: [] for w in range(len(runners))}
    now, pending = 0.0, core.step(0.0, arrivals).jobs
    while pending:
        done = []
        for inp in pending:
            for item in runners[inp.job.worker].run(inp):
                if isinstance(item, JobDone):
                    done.append(item)
                    switched[item.worker] += [s.model for s in item.switches]
                    continue
                for out in item.outputs:
                    tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
        now += 0.01
        pending = core.step(now, (), (), done).jobs
    return tokens, switched


def test_real_workers_serve_a_pinned_model_on_its_own_worker_exactly(tmp_path):
    from helpers import make_engine, synthetic_checkpoints, worker_over

    from tokenpool.controller.core import ControllerCore, CoreConfig
    from tokenpool.controller.core_types import Arrival
    from tokenpool.controller.pool_stats import PoolStats
    from tokenpool.gpu_pool.job_runner import JobRunner
    from tokenpool.sampling import SamplingParams

    checkpoints = synthetic_checkpoints(tmp_path, SHAPES)
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in (6, 2, 4)]
    expected = {m: make_engine(ckpt, kv_cache_bytes=4 << 20).generate(PROMPTS, params)
                for m, ckpt in checkpoints.items()}
    policy = make_scheduler("token-level", Roles((0, 1), (0, 1)), cost(tuple(SHAPES)), slo_of,
                            model_load={m: 1.0 for m in SHAPES}, pins={"m-a": 1}, q_max_s=0.05)
    core = ControllerCore(policy, CoreConfig(2), PoolStats(2, {m: slo_of(m) for m in SHAPES}))
    runners = [JobRunner(worker_over(checkpoints, kv_cache_bytes=4 << 20, swap_bytes=1 << 24), w)
               for w in range(2)]
    arrivals = [Arrival(RequestInfo(f"{m}/{i}", m, len(p), 0.0, q.max_tokens), slo_of(m),
                        (tuple(p), q))
                for i, (p, q) in enumerate(zip(PROMPTS, params)) for m in SHAPES]
    try:
        tokens, switched = run_core(core, runners, arrivals)
    finally:
        for runner in runners:
            runner.close()
    for m in SHAPES:
        assert [tokens[f"{m}/{i}"] for i in range(len(PROMPTS))] == expected[m], m
    assert switched[0] == ["m-a"] and "m-a" not in switched[1]
    assert policy.num_unfinished() == 0 and not core.requests
