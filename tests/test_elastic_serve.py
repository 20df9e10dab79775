"""An elastic pool under a real server: load steps up, the pool grows; load stops, the pool
drains and shrinks back to its minimum; every request ends with its exact tokens. Once with
both models pooled, once with t0 pinned to a worker of its own (`pin: 1`): then the pool grows
and shrinks around that worker, which serves t0 alone and is never drained.

Real parts throughout: `tokenpool serve`'s stack over local workers, real HTTP through
uvicorn, the official openai client. The SLO is set so tight (TBT 1 ms) that any decoding
keeps every round over its budget, which is the rule's growth signal; the rule's timers are
shortened from seconds to tenths so the test takes seconds.
"""

from __future__ import annotations

import threading
import time

import pytest

from helpers import TINY_FLEET
from serving_fixtures import stack_over_http, wait_until_idle

openai = pytest.importorskip("openai")

FLEET = TINY_FLEET.replace(
    "pool: {backend: local, num_workers: 1}",
    "pool: {backend: local, num_workers: 1, min_workers: 1, max_workers: 3}").replace(
    "slo: {ttft_s: 30, tbt_s: 5}", """slo: {ttft_s: 60, tbt_s: 0.001}
scheduler: {max_alpha: 1000000, shed_ttft_factor: 1000000}
scaling: {check_s: 0.05, grow_after_s: 0.2, cooldown_s: 0.2, idle_after_s: 0.5}""")
PINNED_FLEET = FLEET.replace('"synth:2,64,4,2@1"}', '"synth:2,64,4,2@1", pin: 1}').replace(
    "num_workers: 1, min_workers: 1, max_workers: 3", "num_workers: 2, min_workers: 2, max_workers: 4")
PROMPTS = ["one two three four", "the sky is", "a b c d e f g", "hello there my friend"]
MAX_TOKENS = 60
LOAD_S = 6.0  # how long the load phase keeps requests coming
TIMEOUT_S = 300  # a guard against a hang, never a performance bound


@pytest.fixture(scope="module", params=["pooled", "pinned"])
def served(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("elastic")
    (root / "cache").mkdir()
    path = root / "fleet.yaml"
    fleet = FLEET if request.param == "pooled" else PINNED_FLEET
    assert fleet.count("pin: 1") == (request.param == "pinned")
    path.write_text(fleet.replace("CACHE", str(root / "cache")))
    with stack_over_http(path) as (stack, live):
        yield stack, live


def complete(live, model: str, prompt: str) -> str:
    with openai.OpenAI(base_url=live.url + "/v1", api_key="-", max_retries=0,
                       timeout=TIMEOUT_S) as client:
        text = ""
        for chunk in client.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS,
                                               temperature=0, stream=True,
                                               extra_body={"ignore_eos": True}):
            text += chunk.choices[0].text
        return text


def test_the_pool_grows_under_load_and_shrinks_when_it_stops(served):
    stack, live = served
    floor, initial = stack.fleet.pool.workers_range[0], stack.fleet.pool.num_workers
    pinned = {0} if initial == 2 else set()  # a fleet file pins its first workers
    reference = {(m, p): complete(live, m, p) for m in ("t0", "t1") for p in PROMPTS}
    sizes, served_by, ran, results, errors = [], set(), set(), [], []
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            workers = stack.controller.snapshot().workers
            sizes.append(len(workers))
            served_by.update(w.id for w in workers if w.state == "busy")
            ran.update((w.id, w.model) for w in workers if w.state == "busy")
            time.sleep(0.02)

    def client(model: str, prompt: str):
        deadline = time.monotonic() + LOAD_S
        while time.monotonic() < deadline:
            try:
                results.append(((model, prompt), complete(live, model, prompt)))
            except Exception as exc:  # noqa: BLE001 - every failure is a finding here
                errors.append(repr(exc))

    watcher = threading.Thread(target=watch)
    watcher.start()
    clients = [threading.Thread(target=client, args=key) for key in reference]
    for thread in clients:
        thread.start()
    for thread in clients:
        thread.join(timeout=TIMEOUT_S)
    wait_until_idle(stack.controller)
    deadline = time.monotonic() + TIMEOUT_S
    while len(stack.controller.pool.workers()) > floor and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    watcher.join()

    assert not errors, errors[:3]
    assert results and all(text == reference[key] for key, text in results)
    assert max(sizes) > initial, "the pool never grew"
    assert served_by - set(range(initial)), "no grown worker ran a job"
    # Shrunk to min_workers (which pooled worker stays is the rule's choice).
    assert len(stack.controller.pool.workers()) == floor
    snap = wait_until_idle(stack.controller)
    assert snap["lost"] == 0 and snap["loop_errors"] == 0
    assert len(snap["workers"]) == floor and all(w["state"] == "idle" for w in snap["workers"])
    if pinned:  # t0 ran on its own worker only, which ran nothing else and stayed
        assert {w for w, model in ran if model == "t0"} == pinned
        assert {model for w, model in ran if w in pinned} == {"t0"}
        assert pinned <= {w["id"] for w in snap["workers"]}
