"""`tokenpool serve` on a Ray cluster an operator started: `ray start --head`, a second node
with `ray start --address`, the server joining with `ray_address: auto`.

Workers go one per node, placed by the custom resource each node declares; `/pool` names
their nodes. Then a whole node is lost under streamed load: every request still ends with
exactly the tokens of an undisturbed run (or an explicit error), the pool shrinks to the
surviving worker, and when a new node joins, the lost worker comes back there and takes load.
"""

from __future__ import annotations

import threading

import httpx
import pytest

from ray_cluster import AUTH, WORKER_RESOURCE, Cluster, wait_for

pytest.importorskip("ray")
openai = pytest.importorskip("openai")

FLEET = """\
models:
  - {id: t0, source: "synth:2,64,4,2@1"}
  - {id: t1, source: "synth:2,64,4,2@2"}
engine: {device: cpu, dtype: float32, kv_cache_bytes: 16MiB}
memory: {slab_bytes: 4MiB, host_cache_bytes: 256MiB, swap_bytes: 8MiB, host_cache_dir: CACHE}
pool: {backend: ray, ray_address: auto, num_workers: 2, worker_resource: RESOURCE}
slo: {ttft_s: 60, tbt_s: 0.005}
scheduler: {max_alpha: 1000000, shed_ttft_factor: 1000000}
"""
# The TBT SLO is tight so that one worker's round of both models is heavy enough for
# placement to spread requests over every worker (a light one would keep them together,
# saving switches); admission is set never to shed.
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
def server(cluster, tmp_path_factory):
    from tokenpool.bench.sweep import served

    root = tmp_path_factory.mktemp("ray-cluster")
    path = root / "fleet.yaml"
    (root / "cache").mkdir()
    path.write_text(FLEET.replace("CACHE", str(root / "cache"))
                    .replace("RESOURCE", WORKER_RESOURCE))
    with pytest.MonkeyPatch.context() as patch:
        for name, value in AUTH.items():  # as README tells operators
            patch.setenv(name, value)
        # `auto` finds the newest cluster on this host; another Ray of the test run (or of
        # a developer) must not be the one it joins.
        patch.setenv("RAY_ADDRESS", cluster.address)
        with served(str(path), "token-level", root / "serve.log") as live:
            yield live


def pool_of(server) -> dict:
    return httpx.get(server.url + "/pool", timeout=30).json()


def requests_of() -> list[tuple[str, str]]:
    return [(model, prompt) for model in ("t0", "t1") for prompt in PROMPTS]


def complete_all(server, stream: bool = False, on_tokens=None) -> dict:
    """(model, prompt) -> (text, error), for every request at once."""
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

    threads = [threading.Thread(target=one, args=r) for r in requests_of()]
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
    streamed = threading.Event()
    killer = threading.Thread(target=_kill_when_busy,
                              args=(cluster, server, victim, victim_node, streamed))
    killer.start()
    results = complete_all(server, stream=True, on_tokens=streamed.set)
    killer.join(timeout=TIMEOUT_S)
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
    results = complete_all(server)
    assert {key: text for key, (text, _) in results.items()} == reference
    assert _worker(server, victim)["switches"] > before  # it took load on the new node


def _worker(server, worker: int) -> dict:
    return next(w for w in pool_of(server)["workers"] if w["id"] == worker)


def _kill_when_busy(cluster, server, victim: int, node: str, streamed) -> None:
    """Once tokens stream and the victim worker decodes some requests, lose its node."""
    streamed.wait(TIMEOUT_S)
    wait_for(lambda: _worker(server, victim)["running"] > 0, TIMEOUT_S,
             "the victim to decode", poll_s=0.01)
    cluster.kill_node(node)
