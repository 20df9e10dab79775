"""Pool membership: the policies' add / drain / remove / holds, and the controller core with
workers lost, back, grown and retired (schedulers/protocol.py, controller/elastic.py)."""

from __future__ import annotations

import heapq

import pytest

from tokenpool.controller.core import ControllerCore, CoreConfig
from tokenpool.controller.core_types import Arrival, WorkerJoined, WorkerLost
from tokenpool.controller.pool_stats import PoolStats
from tokenpool.gpu_pool.protocol import JobDone
from tokenpool.schedulers.registry import Roles, make_scheduler
from tokenpool.schedulers.scaling import Retire
from tokenpool.schedulers.types import SLO, PrefillDone, RequestInfo
from tokenpool.sim.timelines import TokenTimeline
from tokenpool.sim.worker import SimRequest, SimWorker

from test_schedulers import cost, req

SLO_ = SLO(5.0, 0.1)


def policy(name: str, prefill=(0, 1), decode=(0, 1)):
    return make_scheduler(name, Roles(tuple(prefill), tuple(decode)), cost("abcd"),
                          lambda m: SLO_, model_load={"a": 1.0, "b": 1.0, "c": 1.0})


def job_workers(s, idle) -> set[int]:
    return {job.worker for job in s.schedule(set(idle), 0.0)}


# -- policies --------------------------------------------------------------------------------

def test_token_level_colocated_drained_worker_gets_no_new_work_and_comes_back():
    s = policy("token-level")
    s.drain_worker(1)
    for i, model in enumerate("abcabc"):
        s.add_request(req(i, model), 0.0)
    assert s.holds(1) == 0 and s.holds(0) == 6
    (job,) = s.schedule({0, 1}, 0.0)
    assert job.worker == 0
    s.remove_worker(1)
    assert 1 not in s.prefill.queues and 1 not in s.decode.workers
    with pytest.raises(ValueError):
        s.add_worker(1, "decode")  # a colocated pool's workers do both
    s.add_worker(1, "prefill+decode")
    s.update([PrefillDone(0, "a", ("r0", "r3"), ())], 0.0)  # worker 0 decodes them
    s.add_request(req(9, "d"), 0.0)  # a new model: the lighter, returned worker takes it
    assert s.holds(1) == 1 and job_workers(s, {1}) == {1}


def test_token_level_disaggregated_drained_decode_worker_is_passed_over():
    s = policy("token-level", prefill=(0,), decode=(1, 2))
    s.drain_worker(2)
    s.add_request(req(0, "a"), 0.0)
    s.schedule({0}, 0.0)
    s.update([PrefillDone(0, "a", ("r0",), ())], 0.0)
    assert s.holds(1) == 1 and s.holds(2) == 0
    s.add_worker(2, "decode")  # takes work again: the next new model goes to the lighter one
    s.add_request(req(1, "b"), 0.0)
    s.schedule({0}, 0.0)
    s.update([PrefillDone(0, "b", ("r1",), ())], 0.0)
    assert s.holds(2) == 1


def test_what_a_drained_worker_holds_still_runs_there():
    s = policy("token-level", prefill=(0, 1), decode=(2,))
    s.add_request(req(0, "a"), 0.0)
    s.add_request(req(1, "b"), 0.0)
    w = next(x for x in (0, 1) if s.holds(x))
    s.drain_worker(w)
    assert job_workers(s, {w}) == {w}


def test_removing_a_worker_places_its_queued_prefills_again_and_pens_them_without_one():
    s = policy("token-level", prefill=(0, 1), decode=(2,))
    for i, model in enumerate("abab"):
        s.add_request(req(i, model), 0.0)
    assert s.holds(0) and s.holds(1)
    s.remove_worker(1)
    assert s.holds(0) == 4
    s.remove_worker(0)  # no prefill worker left: requests wait, and so does admission
    s.add_request(req(9, "c"), 0.0)
    assert s.estimate(req(10, "c"), SLO_).predicted_ttft_s == float("inf")
    s.add_worker(0, "prefill")
    assert s.holds(0) == 5 and s.num_unfinished() == 5


@pytest.mark.parametrize("name", ["request-level", "request-level-plus"])
def test_request_level_drained_worker_takes_no_new_model(name):
    s = policy(name)
    s.drain_worker(0)
    s.add_request(req(0, "a"), 0.0)
    assert job_workers(s, {0, 1}) == {1}
    s.add_request(req(1, "a"), 0.0)  # joins worker 1, which serves a
    assert s.holds(1) == 2 and s.holds(0) == 0
    s.add_worker(0, "prefill+decode")
    s.add_request(req(2, "b"), 0.0)
    assert job_workers(s, {0}) == {0}


def test_request_level_removed_worker_hands_back_what_never_started():
    s = policy("request-level")
    s.add_request(req(0, "a"), 0.0)
    s.schedule({0}, 0.0)  # worker 0 takes a: r0 prefills
    s.add_request(req(1, "a"), 0.0)  # pending on worker 0
    s.update([PrefillDone(0, "a", ("r0",), ("r0",))], 0.0)  # r0 done; r1 still pending
    s.remove_worker(0)
    assert s.num_unfinished() == 1 and job_workers(s, {1}) == {1}


def test_static_pins_a_new_worker_to_a_model_left_waiting():
    s = make_scheduler("static", Roles((0,), (0,)), cost(), lambda m: SLO_,
                       model_load={"a": 2.0, "b": 1.0})
    s.add_request(req(0, "b"), 0.0)  # b has no worker: it waits
    assert job_workers(s, {0}) == set()
    s.add_worker(1, "prefill+decode")
    assert s.holds(1) == 1 and job_workers(s, {1}) == {1}


# -- the core --------------------------------------------------------------------------------

class Pool:
    """The core over simulated workers, stepped by hand."""

    def __init__(self, scheduler, num_workers: int, **config):
        self.requests: dict[str, SimRequest] = {}
        self.core = ControllerCore(scheduler, CoreConfig(num_workers, **config),
                                   PoolStats(num_workers, {m: SLO_ for m in "abcd"}))
        self.sim = {}
        self.running: list = []  # (end, worker, results)
        self.dispatched: list[int] = []
        self.now = 0.0

    def arrive(self, i: int, model: str, output: int = 30, slo: SLO = SLO_):
        rid = f"r{i}"
        self.requests[rid] = SimRequest(rid, model, 100, output,
                                        TokenTimeline(self.now, slo.ttft_s, slo.tbt_s))
        return self.step(arrivals=[Arrival(RequestInfo(rid, model, 100, self.now, 64), slo)])

    def step(self, results=(), arrivals=()):
        out = self.core.step(self.now, arrivals, (), results)
        for job in out.jobs:
            w = job.job.worker
            worker = self.sim.setdefault(w, SimWorker(w, cost("abcd"), self.requests))
            end, res = worker.run(job.job, self.now)
            heapq.heappush(self.running, (end, w, res))
            self.dispatched.append(w)
        return out

    def lose(self, worker: int):
        self.running = [r for r in self.running if r[1] != worker]
        heapq.heapify(self.running)
        on_it = {rid: () for rid, t in self.core.requests.items() if t.worker == worker}
        return self.step([WorkerLost(worker, "node lost", on_it)])

    def advance(self) -> None:
        end, w, res = heapq.heappop(self.running)
        self.now = max(self.now, end)
        self.step([JobDone(w, res)])

    def drain(self) -> None:
        while self.running:
            self.advance()


def test_a_lost_worker_is_down_until_it_joins_and_its_requests_finish_elsewhere():
    pool = Pool(policy("token-level", prefill=(0,), decode=(1, 2)), 3,
                role_of=lambda w: "prefill" if w == 0 else "decode")
    for i, model in enumerate("abab"):
        pool.arrive(i, model)
    while not {1, 2} <= set(pool.dispatched):  # both decode workers have requests
        pool.advance()
    lost = {rid for rid, t in pool.core.requests.items() if t.worker == 1}
    pool.lose(1)
    assert lost and pool.core.stats.recomputed == len(lost)
    assert 1 not in pool.core.idle and pool.core.members.down == {1}
    assert 1 not in pool.core.scheduler.decode.workers
    pool.dispatched.clear()
    pool.drain()
    assert 1 not in pool.dispatched  # never dispatched to while down
    assert not pool.core.requests and all(r.remaining <= 0 for r in pool.requests.values())
    pool.step([WorkerJoined(1)])
    pool.step([WorkerJoined(1)])  # already up: nothing changes
    assert pool.core.members.up == {0, 1, 2} and 1 in pool.core.idle
    for i, model in enumerate("cdcd", start=10):
        pool.arrive(i, model)
    pool.drain()
    assert 1 in pool.dispatched and not pool.core.requests


def test_a_worker_lost_while_draining_is_retired_and_its_join_ignored():
    pool = Pool(policy("token-level"), 2, max_workers=3)
    pool.arrive(0, "a")
    busy = pool.dispatched[0]
    pool.core.members.draining.add(busy)
    pool.core.scheduler.drain_worker(busy)
    out = pool.lose(busy)
    assert out.scale == [Retire(busy)] and busy not in pool.core.members.down
    pool.step([WorkerJoined(busy)])  # its slot is free: no worker comes back unasked
    assert busy not in pool.core.members.up
    pool.drain()
    assert not pool.core.requests


def test_stats_have_room_for_every_slot_of_an_elastic_pool():
    pool = Pool(policy("token-level"), 2, max_workers=5)
    assert len(pool.core.stats.workers) == 5


def test_the_rule_leaves_unscaled_workers_alone():
    """Pinned models' workers are the core's `unscaled`: an idle pool drains its pooled
    workers down to the floor, never those, and they are not what the rule weighs."""
    from tokenpool.schedulers.scaling import ScalingConfig, ScalingRule

    rule = ScalingRule(ScalingConfig(min_workers=1, max_workers=4, check_s=0.1,
                                     idle_after_s=0.5, cooldown_s=0.0))
    pool = Pool(policy("token-level", prefill=(0, 1, 2, 3), decode=(0, 1, 2, 3)), 4,
                max_workers=4, scaling=rule, unscaled=frozenset({0, 1}))
    retired = []
    for tick in range(100):
        pool.now = tick * 0.1
        retired += [d.worker for d in pool.step().scale if type(d) is Retire]
    assert retired and not set(retired) & {0, 1}
    assert {0, 1} <= pool.core.members.up
    assert {w.worker for w in pool.core.members.view(pool.now, pool.core.idle).workers} \
        <= {2, 3}


def test_a_disaggregated_pool_grows_prefill_under_ttft_pressure():
    """Arrivals predicted over their TTFT SLO press on the one prefill worker of a pool of
    one prefill and one decode worker: it grows a prefill worker, in the slot its roles
    (PoolConfig.role, the initial share kept past num_workers) give prefill, and that worker
    takes prefill work."""
    from tokenpool.gpu_pool.pool_config import PoolConfig
    from tokenpool.schedulers.scaling import Grow, ScalingConfig, ScalingRule

    roles = PoolConfig(num_workers=2, prefill_workers=1, max_workers=4)
    assert [roles.role(w) for w in range(4)] == ["prefill", "decode", "prefill", "decode"]
    rule = ScalingRule(ScalingConfig(min_workers=2, max_workers=4, check_s=0.1,
                                     grow_after_s=0.5, cooldown_s=0.0))
    pool = Pool(policy("token-level", prefill=(0,), decode=(1,)), 2, max_workers=4,
                scaling=rule, role_of=roles.role, prefill_only=frozenset({0}))
    grown = []
    for i in range(40):  # a new model every 0.1 s: each a switch on the prefill worker
        pool.now = i * 0.1
        grown += [d for d in pool.arrive(i, "abcd"[i % 4], slo=SLO(0.5, 0.1)).scale
                  if type(d) is Grow]
        if grown:
            break
    assert grown == [Grow((2,))]
    pool.step([WorkerJoined(2)])
    assert 2 in pool.core.scheduler.prefill.queues and 2 in pool.core.prefill_only
    pool.dispatched.clear()
    for i in range(100, 140):  # more than the open groups on worker 0 take
        pool.arrive(i, "abcd"[i % 4])
    pool.drain()
    assert 2 in pool.dispatched and not pool.core.requests
