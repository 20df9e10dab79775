"""The body of every worker actor: one class, from the same image on every node."""

from __future__ import annotations

import os

from tokenpool.gpu_pool.protocol import JobDone, JobInput
from tokenpool.gpu_pool.ray_handoff import kv_by_reference, kv_resolved
from tokenpool.gpu_pool.ray_link import WorkerRestarted, ray_module


class WorkerActor:
    """The body of every worker actor. Building the worker in the constructor means a
    restart by Ray rebuilds it too."""

    def __init__(self, fleet, worker_id: int, namespace: str, torch_threads: int):
        import torch

        from tokenpool.gpu_pool.worker_factory import make_runner

        torch.set_num_threads(torch_threads)
        # The actor may be on a node the serving process never touched: fill its cache.
        self.runner = make_runner(fleet, worker_id, namespace, fill_cache=True)

    def describe(self) -> tuple[int, str, str]:
        """(pid, device, Ray node id); a GPU is named by its index on the node, not the
        actor's cuda:0."""
        ray = ray_module()
        node = ray.get_runtime_context().get_node_id()
        device = self.runner.worker.device
        if device.type == "cuda":
            return os.getpid(), f"cuda:{ray.get_gpu_ids()[0]}", node
        return os.getpid(), str(device), node

    def profile(self, plan):
        from tokenpool.gpu_pool.profiling import profile_worker

        return profile_worker(self.runner.worker, plan)

    def run(self, job_input: JobInput, expected_pid: int, kv_by_ref: bool = True):
        """The job's steps, then its JobDone. `kv_by_ref`: exported KV leaves as object
        store references (ray_handoff.py), not inside the JobDone."""
        if os.getpid() != expected_pid:
            raise WorkerRestarted(f"worker actor restarted (pid {expected_pid} -> "
                                  f"{os.getpid()}): everything it held is gone")
        ray = ray_module()
        for item in self.runner.run(kv_resolved(ray, job_input)):
            yield kv_by_reference(ray, item) if kv_by_ref and type(item) is JobDone else item

    def close(self) -> None:
        self.runner.close()
