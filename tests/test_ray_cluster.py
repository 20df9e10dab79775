"""`tokenpool serve` on a Ray cluster an operator started: `ray start --head`, a second node
with `ray start --address`, the server joining with `ray_address: auto`.

Workers go one per node, placed by the custom resource each node declares; `/pool` names
their nodes. Then a whole node is lost under streamed load: every request still ends with
exactly the tokens of an undisturbed run (or an explicit error), the pool shrinks to the
surviving worker, and when a new node joins, the lost worker comes back there and takes load.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest

from helpers import TINY_FLEET
from ray_cluster import AUTH, WORKER_RESOURCE, Cluster, wait_for

pytest.importorskip("ray")
openai = pytest.importorskip("openai")

FLEET = TINY_FLEET.replace(
    "pool: {backend: local, num_workers: 1}",
    "pool: {backend: ray, ray_address: auto, num_workers: 2, worker_resource: RESOURCE}"
).replace("slo: {ttft_s: 30, tbt_s: 5}", """slo: {ttft_s: 60, tbt_s: 5}
scheduler: {max_alpha: 1000000, shed_ttft_factor: 1000000}""")
# The TBT SLO is loose so that no worker's round looks overloaded at its measured step times
# on any machine (a busy 2-core host slows them several-fold): placement then orders the
# workers by their profiled next round, and a model sent while the other decodes goes to
# the idle worker. Admission is set never to shed.
PROMPTS = ["one two three four", "the sky is", "a b c d e f g", "hello there my friend"]
MAX_TOKENS = 200
TIMEOUT_S = 300  # a guard against a hang, never a performance bound


@pytest.fixture(scope="module")
def cluster():
    cluster = Cluster()
    try:
        cluster.start_head()
        cluster.add_node()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def fleet_path(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray-cluster")
    (root / "cache").mkdir()
    path = root / "fleet.yaml"
    path.write_text(FLEET.replace("CACHE", str(root / "cache"))
                    .replace("RESOURCE", WORKER_RESOURCE))
    return path


@pytest.fixture(scope="module")
def server(cluster, fleet_path):
    from tokenpool.bench.sweep import served

    with pytest.MonkeyPatch.context() as patch:
        for name, value in AUTH.items():  # as README tells operators
            patch.setenv(name, value)
        # `auto` finds the newest cluster on this host; another Ray of the test run (or of
        # a developer) must not be the one it joins.
        patch.setenv("RAY_ADDRESS", cluster.address)
        with served(str(fleet_path), "token-level", fleet_path.parent / "serve.log") as live:
            yield live


def pool_of(server) -> dict:
    return httpx.get(server.url + "/pool", timeout=30).json()


def requests_of() -> list[tuple[str, str]]:
    return [(model, prompt) for model in ("t0", "t1") for prompt in PROMPTS]


def complete_all(server, stream: bool = False, on_tokens=None, models=("t0", "t1")) -> dict:
    """(model, prompt) -> (text, error), for every request of `models` at once."""
    results: dict = {}

    def one(model, prompt):
        with openai.OpenAI(base_url=server.url + "/v1", api_key="-", max_retries=0,
                           timeout=TIMEOUT_S) as client:
            try:
                args = dict(model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                            extra_body={"ignore_eos": True})
                if not stream:
                    results[model, prompt] = (client.completions.create(**args)
                                              .choices[0].text, None)
                    return
                text = ""
                for chunk in client.completions.create(stream=True, **args):
                    text += chunk.choices[0].text
                    if on_tokens:
                        on_tokens()
                results[model, prompt] = (text, None)
            except openai.APIError as exc:
                results[model, prompt] = (None, str(exc))

    threads = [threading.Thread(target=one, args=r) for r in requests_of() if r[0] in models]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=TIMEOUT_S)
    return results


@pytest.fixture(scope="module")
def reference(server):
    results = complete_all(server)
    assert all(error is None for _, error in results.values()), results
    return {key: text for key, (text, _) in results.items()}


def test_workers_are_placed_one_per_node_and_pool_names_the_nodes(cluster, server):
    workers = pool_of(server)["workers"]
    assert sorted(w["node"] for w in workers) == sorted(cluster.nodes)
    assert all(w["state"] != "dead" for w in workers)


def test_a_lost_node_s_requests_finish_exactly_and_a_new_node_takes_its_worker(
        cluster, server, reference):
    victim_node = cluster.nodes[1]
    victim = next(w["id"] for w in pool_of(server)["workers"] if w["node"] == victim_node)
    streamed, finished, killed = threading.Event(), threading.Event(), []
    killer = threading.Thread(target=_kill_when_busy, args=(
        cluster, server, victim, victim_node, streamed, finished, killed))
    killer.start()
    results = _one_model_then_the_other(server, on_tokens=streamed.set)
    finished.set()
    killer.join(timeout=TIMEOUT_S)
    assert killed, ("every request ended before the victim worker decoded any",
                    pool_of(server))
    for key, (text, error) in results.items():
        # Every request ends once: its exact tokens, or an explicit error (none expected).
        assert error is None and text == reference[key], (key, error)
    pool = pool_of(server)
    assert pool["recomputed"] >= 1 and pool["lost"] == 0, pool
    lost = next(w for w in pool["workers"] if w["id"] == victim)
    assert lost["state"] == "dead" and lost["failures"] >= 1, lost

    new_node = cluster.add_node()
    wait_for(lambda: _worker(server, victim)["node"] == new_node and
             _worker(server, victim)["state"] != "dead", TIMEOUT_S, "the worker's return")
    before = _worker(server, victim)["switches"]
    results = _one_model_then_the_other(server)
    assert {key: text for key, (text, _) in results.items()} == reference
    assert _worker(server, victim)["switches"] > before  # it took load on the new node


def _one_model_then_the_other(server, on_tokens=None) -> dict:
    """Every request, streamed, t1's sent once t0's stream: placement then sees a worker
    decoding t0 and sends t1 to the other. Sent all at once, both models' groups would be
    placed while no worker decodes yet, and might share a worker."""
    first_tokens = threading.Event()

    def streamed():
        first_tokens.set()
        if on_tokens:
            on_tokens()

    results: dict = {}
    first = threading.Thread(target=lambda: results.update(complete_all(
        server, stream=True, on_tokens=streamed, models=("t0",))))
    first.start()
    first_tokens.wait(TIMEOUT_S)
    results.update(complete_all(server, stream=True, on_tokens=on_tokens, models=("t1",)))
    first.join(timeout=TIMEOUT_S)
    return results


def _worker(server, worker: int) -> dict:
    return next(w for w in pool_of(server)["workers"] if w["id"] == worker)


def _kill_when_busy(cluster, server, victim: int, node: str, streamed, finished,
                    killed: list) -> None:
    """Once tokens stream and the victim worker decodes some requests, lose its node (and
    say so in `killed`); give up once every request has ended."""
    streamed.wait(TIMEOUT_S)
    seen = wait_for(lambda: ("busy" if _worker(server, victim)["running"] > 0 else
                             "finished" if finished.is_set() else None),
                    TIMEOUT_S, "the victim to decode", poll_s=0.01)
    if seen == "busy":
        cluster.kill_node(node)
        killed.append(node)


def test_a_grown_worker_is_resource_demand_until_a_node_joins(cluster, server, fleet_path):
    """What Ray's autoscaler (and KubeRay's) acts on: a worker a pool grows while no node
    has room waits as a pending actor, whose resources the autoscaler's view of the cluster
    lists as demand; once a node with them joins, the worker starts there and serves. The
    pool runs in a driver process of its own (tests/grown_worker_driver.py)."""
    first = cluster.add_node()  # the server holds every other node's worker slot
    env = {**os.environ, **AUTH, "RAY_ADDRESS": cluster.address}
    driver = subprocess.Popen([sys.executable, str(Path(__file__).with_name(
        "grown_worker_driver.py")), str(fleet_path)], env=env, stdout=subprocess.PIPE,
        text=True)
    try:
        pending = json.loads(driver.stdout.readline())
        assert pending["phase"] == "pending", pending
        assert {WORKER_RESOURCE: 1.0}.items() <= pending["demands"][0].items()
        assert pending["starting"] == [False, True]
        second = cluster.add_node()
        joined = json.loads(driver.stdout.readline())
        assert joined["phase"] == "joined", joined
        assert joined["workers"] == [[first, True], [second, True]]
        assert joined["tokens"][0] == joined["tokens"][1] and len(joined["tokens"][0]) == 16
        assert driver.wait(timeout=TIMEOUT_S) == 0
    finally:
        if driver.poll() is None:
            driver.kill()
