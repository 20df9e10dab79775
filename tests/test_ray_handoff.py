"""KV handed from a prefill actor to a decode actor on real Ray actors (a local cluster):
by object reference (the driver holds only references) and through the driver (arrays), both
bit-exact against a standalone engine; a handoff whose exporter died is recomputed, still
exact; and `tokenpool bench handoff` end to end.

One Ray start serves the module: the by-reference pool starts the cluster, and the driver
pool and the bench's pools join it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

import test_ray_pool
from test_ray_pool import JOB_TIMEOUT_S, SHORT, Recorder
from tokenpool.gpu_pool.pool_config import PoolConfig
from tokenpool.gpu_pool.protocol import JobInput
from tokenpool.models.checkpoint import load_checkpoint
from tokenpool.schedulers.types import Decode, Job, Prefill, SwapIn, Switch

ray = pytest.importorskip("ray")

# test_ray_pool's synthetic fleet, packed into a host cache of this module's own.
fleet = test_ray_pool.fleet
namespace = test_ray_pool.namespace

MODEL = "synth-a"
# Lengths under a page, over one and over two (16 tokens a page): every handoff has pages.
PROMPTS = [[1, 504, 3458, 282, 4649, 314], [30, 2200, 17, 4302, 9, 88, 14, 2, 715] * 2,
           [(7 * i + 3) % 500 for i in range(40)]]


@pytest.fixture(scope="module")
def reference(fleet):
    import torch
    from helpers import make_engine

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as a worker runs; more only fight the actors for 2 cores
    try:
        path = os.path.join(fleet.base_dir, fleet.model(MODEL).source)
        engine = make_engine(load_checkpoint(path, progress=False), kv_cache_bytes=16 << 20)
        return engine.generate(PROMPTS, SHORT)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pools(fleet, namespace):
    """kv_by_ref -> a started pool of a prefill worker (0) and a decode worker (1)."""
    from tokenpool.gpu_pool.ray_pool import RayPool

    # CPUs for both pools and the bench's two: Ray's CPU slots, not cores.
    config = PoolConfig(backend="ray", num_workers=2, prefill_workers=1, num_cpus=8,
                        object_store_bytes=80 << 20)
    started = {}
    try:
        for by_ref in (True, False):  # the first starts Ray, the second joins it
            pool = RayPool(config, fleet, namespace, kv_by_ref=by_ref)
            pool.recorder = Recorder()
            pool.start(pool.recorder)
            started[by_ref] = pool
        yield started
    finally:
        for pool in reversed(started.values()):  # the pool that started Ray stops it last
            pool.close()


def run_job(pool, worker: int, job: JobInput):
    """Run `job` on `worker`: its JobDone and the tokens it streamed, by request id."""
    since = pool.recorder.mark()
    pool.run(worker, job)
    events = pool.recorder.wait_ends(since, [worker])
    kind, _, done, _ = events[-1]
    assert kind == "done", done
    tokens: dict = {}
    for kind, _, item, _ in events:
        if kind == "step":
            for out in item.outputs:
                tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    return done, tokens


def prefill(pool, tag: str):
    ids = tuple(f"{tag}{i}" for i in range(len(PROMPTS)))
    job = JobInput(Job(0, (Switch(0, MODEL), Prefill(0, MODEL, ids))),
                   prompts={r: (tuple(p), SHORT) for r, p in zip(ids, PROMPTS)},
                   export_after_prefill=True)
    done, tokens = run_job(pool, 0, job)
    assert sorted(done.handoffs) == sorted(ids) and done.kv_pages_used == 0
    return ids, done, tokens


def decode(pool, ids, handoffs, tokens):
    """SwapIn and decode the handed-off requests on worker 1; each one's whole output."""
    job = JobInput(Job(1, (SwapIn(1, MODEL, ids), Switch(1, MODEL),
                           Decode(1, MODEL, ids, quota_s=JOB_TIMEOUT_S))), handoffs=handoffs)
    done, more = run_job(pool, 1, job)
    assert not done.errors and done.kv_pages_used == 0
    return done, [tokens[r] + more.get(r, []) for r in ids]


@pytest.mark.parametrize("by_ref", [True, False], ids=["by_ref", "driver"])
def test_a_handoff_between_actors_is_exact(pools, reference, by_ref):
    pool = pools[by_ref]
    ids, prefilled, tokens = prefill(pool, f"h{int(by_ref)}-")
    kinds = {type(h.kv) for h in prefilled.handoffs.values()}
    # By reference the driver holds no KV bytes, only references; otherwise the arrays.
    assert kinds == ({ray.ObjectRef} if by_ref else {np.ndarray}), kinds
    decoded, outputs = decode(pool, ids, prefilled.handoffs, tokens)
    assert outputs == reference
    assert decoded.decode_timings, "a decode step recomputed a prompt: the KV did not arrive"


def test_bench_handoff_reports_both_modes(pools, fleet, tmp_path, capsys):
    from tokenpool.cli.main import main

    out = tmp_path / "handoff.json"
    code = main(["bench", "handoff", "--config", str(Path(fleet.base_dir) / "fleet.yaml"),
                 "--model", MODEL, "--requests", "2", "--prompt-tokens", "40",
                 "--repeats", "1", "--json", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads(out.read_text())
    assert {"model", "requests", "prompt_tokens", "repeats", "results", "ratio",
            "cpu"} <= set(result)
    assert result["model"] == MODEL and result["tokens_agree"] and "isa" in result["cpu"]
    assert [r["mode"] for r in result["results"]] == ["driver", "by_ref"]
    for r in result["results"]:
        assert r["handoffs"] == 1 and r["handoff_bytes"] > 0 and r["bytes_per_s"] > 0
        assert r["handoff_s_p50"] > 0 and r["driver_cpu_s_per_handoff"] >= 0
    assert {r["handoff_bytes"] for r in result["results"]} == {2 * 3 * result["page_bytes"]}
    assert "by_ref" in captured.out and "driver CPU" in captured.out


def test_a_handoff_whose_exporter_died_is_recomputed_exactly(pools, reference):
    """The KV objects belong to the prefill actor: once Ray has noticed it died they are
    lost, and the decode worker recomputes the requests from their tokens. (Read in the
    second or so before Ray notices, they are still whole, and used as is.) Runs last:
    worker 0's link still names the dead process."""
    pool = pools[True]
    ids, prefilled, tokens = prefill(pool, "lost-")
    pool.kill(0)
    refs = [prefilled.handoffs[r].kv for r in ids]
    wait_for(lambda: not any(map(_readable, refs)), "Ray to free the dead owner's objects")
    decoded, outputs = decode(pool, ids, prefilled.handoffs, tokens)
    assert outputs == reference
    # Every request recomputed its prompt in a decode step (so no step was pure decode).
    assert not decoded.decode_timings, decoded.decode_timings


def wait_for(predicate, what: str) -> None:
    import time

    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def _readable(ref) -> bool:
    """Whether the object can be read (here, on the one node the cluster has)."""
    try:
        ray.get(ref, timeout=10)
        return True
    except ray.exceptions.RayError:
        return False
