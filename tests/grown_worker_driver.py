"""A driver process for tests/test_ray_cluster.py: a RayPool of one worker on a running
cluster grows by one while no node has room, says what the autoscaler sees, waits for the
new worker to be placed (the test adds a node), runs the same job on both workers and prints
what happened. A process of its own because Ray reads RAY_AUTH_MODE when it is imported.

Usage: python grown_worker_driver.py FLEET_YAML; prints one JSON line per phase.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import threading


def main(fleet_path: str) -> None:
    from ray.autoscaler.v2.sdk import get_cluster_status

    from tokenpool.controller.stack import cache_namespace
    from tokenpool.fleet import load_fleet
    from tokenpool.gpu_pool.fleet_weights import FleetModels
    from tokenpool.gpu_pool.ray_pool import RayPool

    fleet = load_fleet(fleet_path)
    fleet = dataclasses.replace(fleet, pool=dataclasses.replace(
        fleet.pool, num_workers=1, min_workers=1, max_workers=2))
    listener = Listener()
    pool = RayPool(fleet.pool, fleet, cache_namespace(fleet, FleetModels(fleet)))
    pool.start(listener)
    try:
        pool.add_workers([1])
        address = pool_address()
        while not (demands := pending_bundles(get_cluster_status(address))):
            listener.joined.wait(0.2)
        say(phase="pending", demands=demands, starting=[w.starting for w in pool.workers()])
        listener.joined.wait()
        say(phase="joined", workers=[[w.node, w.alive] for w in pool.workers()],
            tokens=[run_job(pool, listener, w) for w in (0, 1)])
    finally:
        pool.close()


def pool_address() -> str:
    import ray

    return ray.get_runtime_context().gcs_address


def pending_bundles(status) -> list[dict]:
    """The resource bundles that pending tasks and actors wait for."""
    return [dict(request.bundle) for demand in status.resource_demands.ray_task_actor_demand
            for request in demand.bundles_by_count]


def run_job(pool, listener, worker: int) -> list[int]:
    from tokenpool.gpu_pool.protocol import JobInput
    from tokenpool.sampling import SamplingParams
    from tokenpool.schedulers.types import Decode, Job, Prefill, Switch

    rid = f"grown-{worker}"
    units = (Switch(worker, "t0"), Prefill(worker, "t0", (rid,)),
             Decode(worker, "t0", (rid,), quota_s=300.0))
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    listener.done.clear()
    pool.run(worker, JobInput(Job(worker, units), prompts={rid: ((1, 504, 3458, 282), params)}))
    listener.done.wait()
    return listener.tokens.pop(rid)


class Listener:
    def __init__(self):
        self.joined, self.done = threading.Event(), threading.Event()
        self.tokens: dict[str, list[int]] = {}

    def on_step(self, out) -> None:
        for output in out.outputs:
            self.tokens.setdefault(output.request_id, []).extend(output.new_token_ids)

    def on_done(self, done) -> None:
        self.done.set()

    def on_failure(self, worker, error) -> None:
        say(phase="failure", worker=worker, error=str(error))
        self.done.set()

    def on_joined(self, worker) -> None:
        self.joined.set()


def say(**fields) -> None:
    print(json.dumps(fields), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
