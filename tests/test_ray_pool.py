"""Workers as real Ray actors (a local cluster): streaming, concurrency and restarts.

One pool of two actors serves every test. The fleet is two small synthetic Llamas packed into
a /dev/shm host cache by this process before the pool starts, as the server does; the actors
only map it. Greedy outputs of a standalone engine are the yardstick for every token.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
import uuid

import pytest

from tokenpool.controller.cost_fit import cost_model_of
from tokenpool.fleet import load_fleet
from tokenpool.gpu_pool.fleet_weights import FleetModels, FleetWeights
from tokenpool.gpu_pool.pool import WorkerInfo
from tokenpool.gpu_pool.protocol import JobDone, JobInput, StepOutputs
from tokenpool.gpu_pool.pool_config import PoolConfig
from tokenpool.memory.host_cache import HostModelCache
from tokenpool.models.checkpoint import load_checkpoint
from tokenpool.models.synth import write_synthetic_checkpoint
from tokenpool.sampling import SamplingParams
from tokenpool.schedulers.types import Decode, DecodeDone, Job, Prefill, PrefillDone, Switch

pytest.importorskip("ray")

SHORT = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
# Long enough that a job is still running when its first tokens arrive (hundreds of steps).
LONG = SamplingParams(max_tokens=300, temperature=0.0, ignore_eos=True)
PROMPTS = [[1, 504, 3458, 282, 4649, 314], [30, 2200, 17, 4302, 9, 88, 14, 2, 715]]
SHAPES = {"synth-a": dict(num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2),
          "synth-b": dict(num_layers=3, hidden_size=96, num_heads=6, num_kv_heads=3,
                          tie_word_embeddings=False)}
ENDS = ("done", "failure")  # the events that end a job
JOB_TIMEOUT_S = 300  # only a guard against a hang, never a performance bound
_ids = itertools.count()


class Recorder:
    """A PoolListener that keeps every event, in arrival order, with its arrival time."""

    def __init__(self):
        self.events: list[tuple[str, int, object, float]] = []  # (kind, worker, item, at)
        self.on_first_step = None  # called once from the pool's thread, for the kill test
        self.on_first_done = None  # likewise, as the first JobDone is handed on
        self.forward = None  # a listener (a controller) that gets every event too
        self._changed = threading.Condition()

    def on_step(self, out: StepOutputs) -> None:
        self._add("step", out.worker, out)
        if self.forward:
            self.forward.on_step(out)
        hook, self.on_first_step = self.on_first_step, None
        if hook:
            hook(out)

    def on_done(self, done: JobDone) -> None:
        self._add("done", done.worker, done)
        if self.forward:
            self.forward.on_done(done)
        hook, self.on_first_done = self.on_first_done, None
        if hook:
            hook(done)

    def on_failure(self, worker: int, error: BaseException) -> None:
        self._add("failure", worker, error)
        if self.forward:
            self.forward.on_failure(worker, error)

    def on_joined(self, worker: int) -> None:
        self._add("joined", worker, None)
        if self.forward:
            self.forward.on_joined(worker)

    def _add(self, kind, worker, item) -> None:
        with self._changed:
            self.events.append((kind, worker, item, time.monotonic()))
            self._changed.notify_all()

    def mark(self) -> int:
        with self._changed:
            return len(self.events)

    def wait_for(self, since: int, predicate) -> list[tuple]:
        """Events after `since`, once `predicate` holds for them."""
        with self._changed:
            assert self._changed.wait_for(lambda: predicate(self.events[since:]),
                                          timeout=JOB_TIMEOUT_S), self.events[since:]
            return self.events[since:]

    def wait_ends(self, since: int, workers: list[int]) -> list[tuple]:
        """Events after `since`, once each of `workers` has ended a job (done or failure)."""
        return self.wait_for(since, lambda events: {
            w for kind, w, _, _ in events if kind in ENDS}.issuperset(workers))


def generate_job(worker: int, model: str, params: SamplingParams) -> JobInput:
    """Switch, prefill both prompts, decode them to the end: one request's whole life."""
    ids = tuple(f"r{next(_ids)}" for _ in PROMPTS)
    units = (Switch(worker, model), Prefill(worker, model, ids),
             Decode(worker, model, ids, quota_s=JOB_TIMEOUT_S))
    return JobInput(Job(worker, units), prompts={i: (tuple(p), params)
                                                  for i, p in zip(ids, PROMPTS)})


def tokens_of(job: JobInput, events) -> list[list[int]]:
    got = {i: [] for i in job.prompts}
    for kind, _, item, _ in events:
        if kind == "step":
            for out in item.outputs:
                got[out.request_id].extend(out.new_token_ids)
    return [got[i] for i in job.prompts]


def of_worker(events, worker: int) -> list[tuple]:
    return [e for e in events if e[1] == worker]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ray-fleet")
    for name, shape in SHAPES.items():
        write_synthetic_checkpoint(tmp / name, seed=len(name), **shape)
    path = tmp / "fleet.yaml"
    path.write_text("models:\n"
                    "  - {id: synth-a, source: synth-a}\n"
                    "  - {id: synth-b, source: synth-b}\n"
                    "engine: {dtype: float32, kv_cache_bytes: 16MiB}\n"
                    "memory: {slab_bytes: 4MiB, swap_bytes: 8MiB, host_cache_bytes: 256MiB}\n")
    return load_fleet(path)


@pytest.fixture(scope="module")
def namespace(fleet):
    """A host cache packed here, before any actor starts; the actors map the same files."""
    name = f"raytest{os.getpid()}_{uuid.uuid4().hex[:6]}"
    cache = HostModelCache(fleet.memory.host_cache_bytes, name)
    FleetWeights(FleetModels(fleet), cache).populate(progress=False)
    yield name
    cache.close()
    cache.destroy()


@pytest.fixture(scope="module")
def reference(fleet):
    """Each model's greedy outputs from a standalone engine: no host cache, no worker."""
    import torch
    from helpers import make_engine

    out, threads = {}, torch.get_num_threads()
    torch.set_num_threads(1)  # as a worker runs; more only fight the actors for 2 cores
    try:
        for spec in fleet.models:
            path = os.path.join(fleet.base_dir, spec.source)
            engine = make_engine(load_checkpoint(path, progress=False), kv_cache_bytes=16 << 20)
            out[spec.id] = {p.max_tokens: engine.generate(PROMPTS, p) for p in (SHORT, LONG)}
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.fixture(scope="module")
def pool(fleet, namespace):
    from tokenpool.gpu_pool.ray_pool import RayPool

    recorder = Recorder()
    pool = RayPool(PoolConfig(backend="ray", num_workers=2, object_store_bytes=80 << 20),
                   fleet, namespace)
    pool.start(recorder)
    pool.recorder = recorder
    yield pool
    pool.close()


def test_import_does_not_load_ray():
    import subprocess
    import sys

    code = "import sys, tokenpool.gpu_pool.ray_pool; assert 'ray' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_workers_are_actor_processes(pool):
    infos = pool.workers()
    assert [w.id for w in infos] == [0, 1]
    assert all(w.alive and w.device == "cpu" and w.role == "prefill+decode" for w in infos)
    assert len({w.pid for w in infos} | {os.getpid()}) == 3


def test_profile_fits_a_cost_model_on_a_worker(pool, fleet):
    from tokenpool.gpu_pool.profiling import EngineProfilePlan

    plan = EngineProfilePlan(prompt_lens=(8, 16), prefill_batches=(1, 2), decode_batches=(1, 2),
                             decode_prompt_lens=(8, 16), decode_steps=2, repeats=1)
    cost = cost_model_of(pool.profile(plan))
    assert set(cost.models) == {m.id for m in fleet.models}
    assert cost.switch_time("synth-a") > 0 and cost.kv_capacity_tokens("synth-b") > 0


def test_streamed_tokens_equal_standalone_greedy(pool, reference):
    for worker, model in [(0, "synth-a"), (1, "synth-b"), (0, "synth-b")]:
        job = generate_job(worker, model, SHORT)
        since = pool.recorder.mark()
        pool.run(worker, job)
        events = pool.recorder.wait_ends(since, [worker])
        kinds = [kind for kind, *_ in events]
        # A StepOutputs per engine step, as the steps end, and the JobDone last.
        assert kinds[-1] == "done" and set(kinds[:-1]) == {"step"} and len(kinds) > 2, kinds
        assert tokens_of(job, events) == reference[model][SHORT.max_tokens], (worker, model)
        done = events[-1][2]
        assert [type(r) for r in done.results] == [PrefillDone, DecodeDone]
        assert done.model == model and done.worker == worker


def test_two_workers_run_jobs_concurrently(pool, reference):
    jobs = {0: generate_job(0, "synth-a", LONG), 1: generate_job(1, "synth-b", LONG)}
    since = pool.recorder.mark()
    for worker, job in jobs.items():
        pool.run(worker, job)
    events = pool.recorder.wait_ends(since, [0, 1])
    spans = {}
    for worker, job in jobs.items():
        mine = of_worker(events, worker)
        assert [k for k, *_ in mine][-1] == "done"
        assert tokens_of(job, mine) == reference[job.job.units[0].model][LONG.max_tokens]
        steps = [item for kind, _, item, _ in mine if kind == "step"]
        spans[worker] = (steps[0].emitted_at, steps[-1].emitted_at)
        # Streamed, not batched at the end: the first step reached this process before the
        # worker had produced its last one (one machine, so one monotonic clock).
        first_arrival = next(at for kind, _, _, at in mine if kind == "step")
        assert first_arrival < steps[-1].emitted_at
    assert max(s for s, _ in spans.values()) < min(e for _, e in spans.values()), spans


def test_killed_actor_fails_its_job_then_restarts_and_serves(pool, reference):
    victim, before = 1, pool.workers()[1]
    since = pool.recorder.mark()
    # Killed from its first streamed step, so it dies while the job is surely running.
    pool.recorder.on_first_step = lambda out: pool.kill(out.worker)
    pool.run(victim, generate_job(victim, "synth-a", LONG))
    events = pool.recorder.wait_ends(since, [victim])
    assert events[-1][0] == "failure" and events[-1][1] == victim
    assert "done" not in [kind for kind, *_ in events]

    # Queued right away: it runs once Ray has rebuilt the actor, on a fresh worker.
    assert_serves_short(pool, victim, reference)
    after = pool.workers()[victim]
    assert after.alive and after.restarts == before.restarts + 1 and after.pid != before.pid
    assert pool.workers()[0].restarts == 0


def test_a_death_just_after_a_job_ends_fails_the_next_job_not_that_one(pool):
    """Every job ends exactly once. An actor that dies after its JobDone was handed on, while
    its task is still finishing, had its next job sent already (the controller dispatches on
    the JobDone): the death is that job's, whose requests were to be on the dead actor. Told
    as a second end of the finished job, the controller charged it to the next one, which
    then ran on the restarted actor anyway: two ends for one job, and the policy and the
    controller disagreeing about who holds what.

    The worker body here lingers after its JobDone, so the kill always lands in that window;
    with real workers it is a few milliseconds wide, and a loaded machine hit it."""
    import ray

    from tokenpool.gpu_pool.ray_link import WorkerLink, WorkerRestarted

    class LingersAfterDone:
        def describe(self):
            return os.getpid(), "cpu", "node"

        def run(self, job_input, expected_pid, kv_by_ref):
            if os.getpid() != expected_pid:
                raise WorkerRestarted("restarted")
            yield JobDone(job_input.job.worker, ())
            time.sleep(3)  # the task is still running when the kill comes

    actor = ray.remote(LingersAfterDone).options(
        max_restarts=1, max_task_retries=0, num_cpus=0).remote()
    recorder = Recorder()
    pid, device, node = ray.get(actor.describe.remote())
    link = WorkerLink(WorkerInfo(7, "prefill+decode", device, pid, node=node), actor,
                      recorder, restart_timeout_s=JOB_TIMEOUT_S)
    recorder.on_first_done = lambda done: ray.kill(actor, no_restart=False)
    link.thread.start()
    try:
        for _ in range(3):
            link.inbox.put(JobInput(Job(7, ())))
        recorder.wait_for(0, lambda events: sum(kind in ENDS for kind, *_ in events) >= 3)
        link.inbox.put(None)  # the thread ends once every queued job has ended
        link.thread.join(timeout=JOB_TIMEOUT_S)
        ends = [kind for kind, *_ in recorder.events]
        # The first job done; the second failed, never run, and the worker is back; the
        # third run on the new process.
        assert ends == ["done", "failure", "joined", "done"], recorder.events
        assert link.info.alive and link.info.restarts == 1
    finally:
        link.stopping.set()
        ray.kill(actor, no_restart=True)


def test_failed_job_restarts_its_worker_afresh(pool, reference):
    """A job that raises leaves its worker's state unknown: it is rebuilt, like a crash."""
    worker, before = 0, pool.workers()[0]
    since = pool.recorder.mark()
    # Nothing to decode: the runner raises, as on a policy bug.
    pool.run(worker, JobInput(Job(worker, (Decode(worker, "synth-a", ("nobody",), 1.0),))))
    events = pool.recorder.wait_ends(since, [worker])
    assert events[-1][0] == "failure" and "does not hold them" in str(events[-1][2])

    job = generate_job(worker, "synth-b", SHORT)
    since = pool.recorder.mark()
    pool.run(worker, job)
    events = pool.recorder.wait_ends(since, [worker])
    assert tokens_of(job, events) == reference["synth-b"][SHORT.max_tokens]
    assert pool.workers()[worker].restarts == before.restarts + 1


def assert_serves_short(pool, worker: int, reference) -> None:
    """A short job on `worker` ends done, with the standalone engine's tokens."""
    job = generate_job(worker, "synth-a", SHORT)
    since = pool.recorder.mark()
    pool.run(worker, job)
    events = pool.recorder.wait_ends(since, [worker])
    assert events[-1][0] == "done"
    assert tokens_of(job, events) == reference["synth-a"][SHORT.max_tokens]


def serving_controller(pool, fleet):
    """A serving controller over the module's pool, and the core it will run: token-level,
    fitted to a quick profile of the pool."""
    from tokenpool.controller.core import ControllerCore, CoreConfig
    from tokenpool.controller.pool_stats import PoolStats
    from tokenpool.controller.service import ServingController
    from tokenpool.gpu_pool.profiling import EngineProfilePlan
    from tokenpool.schedulers.admission import SLOAdmission
    from tokenpool.schedulers.registry import Roles, make_scheduler
    from tokenpool.schedulers.types import SLO

    plan = EngineProfilePlan(prompt_lens=(8, 16), prefill_batches=(1, 2), decode_batches=(1, 2),
                             decode_prompt_lens=(8, 16), decode_steps=2, repeats=1)
    roles, slo = Roles((0, 1), (0, 1)), SLO(600, 60)
    slos = {spec.id: slo for spec in fleet.models}
    scheduler = make_scheduler("token-level", roles, cost_model_of(pool.profile(plan)),
                               lambda model: slo)
    core = ControllerCore(scheduler, CoreConfig(2, admission=SLOAdmission(1000, 1000, 4096)),
                          PoolStats(2, slos))
    return ServingController(pool), core


def kill_mid_stream(controller, client, pool, min_tokens: int) -> int:
    """Once clients hold `min_tokens` tokens, kill the actor of a worker decoding some."""
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while time.monotonic() < deadline:
        with client.done:
            streamed = sum(len(ev.token_ids) for evs in client.events.values() for ev in evs)
        running = [w["id"] for w in controller.snapshot().as_json()["workers"] if w["running"]]
        if streamed >= min_tokens and running:
            pool.kill(running[-1])
            return running[-1]
        time.sleep(0.005)
    raise AssertionError("no worker was decoding")


def test_a_killed_actor_s_requests_are_recomputed_elsewhere_exactly(pool, fleet, reference,
                                                                    monkeypatch):
    """Under a controller: the actor of one of two workers is killed while its requests are
    mid-stream; every client still gets exactly the standalone tokens, one end each, within
    a bounded wait; the actor comes back and serves; no KV page is left held."""
    from serving_fixtures import wait_until_idle
    from test_service import Client, spy_jobs

    controller, core = serving_controller(pool, fleet)
    sent = spy_jobs(monkeypatch, pool)
    pool.recorder.forward = controller
    controller.start(core)
    try:
        client = Client(controller)
        requests = [(f"k{copy}-{model}-{j}", model, j) for copy in range(2)
                    for model in SHAPES for j in range(len(PROMPTS))]
        restarts = [w.restarts for w in pool.workers()]
        for rid, model, j in requests:
            client.submit(rid, model, PROMPTS[j], LONG)
        victim = kill_mid_stream(controller, client, pool, min_tokens=40)
        client.wait([r[0] for r in requests], timeout=JOB_TIMEOUT_S)
        for rid, model, j in requests:
            assert client.events[rid][-1].error is None, client.events[rid][-1]
            assert client.tokens(rid) == reference[model][LONG.max_tokens][j], rid
        assert any(inp.resumed for _, inp in sent), "no request was cut mid-stream"

        snap = wait_until_idle(controller, timeout_s=JOB_TIMEOUT_S)
        info = pool.workers()[victim]
        assert info.alive and info.restarts == restarts[victim] + 1
        assert pool.workers()[1 - victim].restarts == restarts[1 - victim]
        assert snap["recomputed"] >= 1 and snap["lost"] == 0 and snap["loop_errors"] == 0
        assert all(w["kv_pages_used"] == 0 for w in snap["workers"]), snap["workers"]
    finally:
        controller.stop()
        pool.recorder.forward = None
    # The restarted actor serves again (the policy may well have sent it nothing since).
    assert_serves_short(pool, victim, reference)
