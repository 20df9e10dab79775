"""The serving controller over real workers (threads), without the network edge.

Six models (three shapes, each with an alias) on two workers. Every test checks what a
client would: each accepted request ends exactly once, with exactly the tokens a standalone
engine gives for it, and the workers' KV pages go back to zero.
"""

from __future__ import annotations

import random
import threading
import time
from collections import defaultdict

import pytest

from tokenpool.controller.serving_types import ServeRequest, TokenEvent
from tokenpool.gpu_pool.protocol import StepOutputs
from tokenpool.controller.stack import build_stack
from tokenpool.fleet import load_fleet
from tokenpool.models.checkpoint import load_checkpoint
from tokenpool.sampling import SamplingParams
from tokenpool.schedulers.types import SLO

SHAPES = {"a": "2,64,4,2", "b": "3,96,6,3", "c": "1,128,4,1"}
MODELS = [f"{shape}-{alias}" for shape in SHAPES for alias in ("x", "y")]
HANG_S = 300  # far beyond any run here: only a hung request gets near it


def fleet_file(root, **pool) -> str:
    models = "\n".join(f"  - {{id: {m}, source: 'synth:{SHAPES[m[0]]}@{ord(m[0])}'}}"
                       for m in MODELS)
    pool_yaml = ", ".join(f"{k}: {v}" for k, v in {"backend": "local", "num_workers": 2,
                                                    **pool}.items())
    path = root / f"fleet-{len(list(root.iterdir()))}.yaml"
    path.write_text(f"models:\n{models}\n"
                    "engine: {dtype: float32, kv_cache_bytes: 4MiB, max_num_seqs: 32}\n"
                    "memory: {slab_bytes: 1MiB, swap_bytes: 8MiB, host_cache_bytes: 1GiB, "
                    f"host_cache_dir: {root}}}\n"
                    f"pool: {{{pool_yaml}}}\n"
                    "scheduler: {q_max_s: 0.05, max_waiting: 4096, shed_ttft_factor: 1000}\n"
                    "slo: {ttft_s: 30, tbt_s: 5}\n")
    return str(path)


class Client:
    """Collects each request's events, as the proxy would."""

    def __init__(self, controller):
        self.controller = controller
        self.events: dict[str, list[TokenEvent]] = defaultdict(list)
        self.done = threading.Condition()
        self.finished: set[str] = set()

    def submit(self, rid: str, model: str, prompt: list[int], params: SamplingParams) -> None:
        req = ServeRequest(rid, model, tuple(prompt), params, SLO(30, 5), time.monotonic())
        self.controller.submit(req, lambda ev: self._on_event(ev))

    def _on_event(self, ev: TokenEvent) -> None:
        with self.done:
            assert ev.request_id not in self.finished, f"event after the end: {ev}"
            self.events[ev.request_id].append(ev)
            if ev.finished:
                self.finished.add(ev.request_id)
                self.done.notify_all()

    def wait(self, ids, timeout: float = HANG_S) -> None:
        with self.done:
            ok = self.done.wait_for(lambda: self.finished >= set(ids), timeout=timeout)
        assert ok, f"hung: {sorted(set(ids) - self.finished)[:10]}"

    def tokens(self, rid: str) -> list[int]:
        return [t for ev in self.events[rid] for t in ev.token_ids]


def wait_idle(stack) -> dict:
    """Until the controller holds no request and no worker is busy; its snapshot then."""
    deadline = time.monotonic() + HANG_S
    while time.monotonic() < deadline:
        snap = stack.controller.snapshot().as_json()
        if not stack.controller.core.requests and all(w["state"] == "idle"
                                                  for w in snap["workers"]):
            return snap
        time.sleep(0.05)
    raise AssertionError(f"never idle: {stack.controller.snapshot().as_json()}")


def assert_pages_free(stack) -> None:
    for runner in stack.controller.pool._runners.values():
        usage = runner.worker.usage()
        assert usage["kv"]["used"] == 0 and usage["swap"]["used"] == 0, usage


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """Standalone engines, one per shape (an alias has the same weights)."""
    from helpers import make_engine

    root = tmp_path_factory.mktemp("refs")
    fleet = load_fleet(fleet_file(root), check_memory=False)
    from tokenpool.gpu_pool.fleet_weights import FleetModels

    sources = FleetModels(fleet).sources
    return {m: make_engine(load_checkpoint(sources[m], progress=False), kv_cache_bytes=16 << 20)
            for m in MODELS if m.endswith("-x")}


def expected_tokens(references, model: str, prompt: list[int], params) -> list[int]:
    return references[model[:-1] + "x"].generate([prompt], params)[0]


def workload(n: int, seed: int):
    rng = random.Random(seed)
    for i in range(n):
        prompt = [rng.randrange(100, 40000) for _ in range(rng.randrange(3, 40))]
        params = SamplingParams(max_tokens=rng.randrange(1, 24), temperature=0.0,
                                ignore_eos=True)
        yield f"r{i}", MODELS[i % len(MODELS)], prompt, params


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = build_stack(load_fleet(fleet_file(tmp_path_factory.mktemp("fleet"))), progress=False,
                    log=lambda msg: None)
    yield s
    s.close()


def test_300_concurrent_requests_over_six_models_lose_nothing(stack, references):
    client = Client(stack.controller)
    requests = list(workload(300, seed=1))
    for rid, model, prompt, params in requests:
        client.submit(rid, model, prompt, params)
    client.wait([r[0] for r in requests])
    for rid, model, prompt, params in requests:
        events = client.events[rid]
        assert [ev.finished for ev in events].count(True) == 1 and events[-1].finished
        assert events[-1].error is None, events[-1]
        assert client.tokens(rid) == expected_tokens(references, model, prompt, params), rid
    snap = wait_idle(stack)
    assert_pages_free(stack)
    assert sum(m["switches"] for m in snap["models"]) >= len(MODELS)
    assert all(m["waiting"] == 0 and m["running"] == 0 for m in snap["models"])
    assert snap["loop_errors"] == 0


def test_cancelled_requests_free_their_pages_and_the_rest_complete(stack, references):
    client = Client(stack.controller)
    requests = [(rid, model, prompt, SamplingParams(max_tokens=200, temperature=0.0,
                                                    ignore_eos=True))
                for rid, model, prompt, _ in workload(24, seed=2)]
    for rid, model, prompt, params in requests:
        client.submit(f"c-{rid}", model, prompt, params)
    cancelled = {f"c-{rid}" for rid, *_ in requests[::2]}
    for rid in cancelled:
        stack.controller.cancel(rid)
    kept = [(f"c-{rid}", m, p, sp) for rid, m, p, sp in requests[1::2]]
    client.wait([r[0] for r in kept])
    for rid, model, prompt, params in kept:
        assert client.tokens(rid) == expected_tokens(references, model, prompt, params)
    wait_idle(stack)
    assert_pages_free(stack)
    for rid in cancelled:  # nothing after the cancel reached the client, and no end either
        assert not any(ev.finished for ev in client.events.get(rid, ()))


def crash_once(runner, after_tokens: int):
    """Make `runner` raise, as a worker dying mid-job would, at the first step after it has
    streamed `after_tokens` tokens (so its requests are mid-stream); that step's tokens are
    lost with it. The pool then replaces the runner, and the fault with it."""
    real_run, streamed = runner.run, [0]

    def crash_mid_job(inp):
        for item in real_run(inp):
            if isinstance(item, StepOutputs):
                if streamed[0] >= after_tokens:
                    raise RuntimeError("injected fault")
                streamed[0] += sum(len(out.new_token_ids) for out in item.outputs)
            yield item

    runner.run = crash_mid_job


def spy_jobs(monkeypatch, pool) -> list:
    """Every (worker, JobInput) the controller sends from now on."""
    sent, real_run = [], pool.run

    def run(worker, inp):
        sent.append((worker, inp))
        real_run(worker, inp)

    monkeypatch.setattr(pool, "run", run)
    return sent


def test_a_failed_worker_s_requests_are_recomputed_exactly_and_it_restarts(stack, references,
                                                                          monkeypatch):
    pool = stack.controller.pool
    runner = pool._runners[0]
    crash_once(runner, after_tokens=20)
    sent = spy_jobs(monkeypatch, pool)
    client = Client(stack.controller)
    requests = list(workload(30, seed=3))
    for rid, model, prompt, params in requests:
        client.submit(f"f-{rid}", model, prompt, params)
    client.wait([f"f-{r[0]}" for r in requests])
    # Nothing the dead worker held is lost or repeated: every client has exactly the
    # standalone engine's tokens, mid-stream ones continued from where they were cut.
    for rid, model, prompt, params in requests:
        assert client.events[f"f-{rid}"][-1].error is None, client.events[f"f-{rid}"][-1]
        assert client.tokens(f"f-{rid}") == expected_tokens(references, model, prompt, params)
    assert any(inp.resumed for _, inp in sent), "no request was cut mid-stream"
    snap = stack.controller.snapshot().as_json()
    assert snap["recomputed"] >= 1 and snap["lost"] == 0 and snap["loop_errors"] == 0
    assert pool.workers()[0].restarts == 1 and pool._runners[0] is not runner
    after = list(workload(12, seed=4))
    for rid, model, prompt, params in after:
        client.submit(f"g-{rid}", model, prompt, params)
    client.wait([f"g-{r[0]}" for r in after])
    for rid, model, prompt, params in after:
        assert client.events[f"g-{rid}"][-1].error is None, client.events[f"g-{rid}"][-1]
        assert client.tokens(f"g-{rid}") == expected_tokens(references, model, prompt, params)
    wait_idle(stack)
    assert_pages_free(stack)


def test_disaggregated_roles_hand_kv_from_prefill_to_decode(tmp_path, references):
    stack = build_stack(load_fleet(fleet_file(tmp_path, prefill_workers=1)), progress=False,
                        log=lambda msg: None)
    try:
        client = Client(stack.controller)
        requests = [(rid, model, prompt, SamplingParams(max_tokens=12, temperature=0.8,
                                                        seed=7, ignore_eos=True))
                    for rid, model, prompt, _ in workload(40, seed=5)]
        for rid, model, prompt, params in requests:
            client.submit(rid, model, prompt, params)
        client.wait([r[0] for r in requests])
        for rid, model, prompt, params in requests:
            assert client.tokens(rid) == expected_tokens(references, model, prompt, params)
        snap = wait_idle(stack)
        assert [w["role"] for w in snap["workers"]] == ["prefill", "decode"]
        assert_pages_free(stack)
    finally:
        stack.close()
