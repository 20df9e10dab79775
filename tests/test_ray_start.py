"""Starting the pool's own Ray node: a raylet that misses Ray's fixed registration window is
started again; any other failure, or one timeout too many, reaches the caller."""

from __future__ import annotations

import pytest

from tokenpool.gpu_pool import ray_pool
from tokenpool.gpu_pool.pool_config import PoolConfig

TIMEOUT = Exception("The current node timed out during startup. This could happen ...")


class RayStandIn:
    """Only what `_connect` calls; `failures` are raised by the first init calls, in order."""

    def __init__(self, failures):
        self.failures = list(failures)
        self.inits, self.shutdowns = [], 0

    def is_initialized(self):
        return False

    def init(self, **kwargs):
        self.inits.append(kwargs)
        if self.failures:
            raise self.failures.pop(0)

    def shutdown(self):
        self.shutdowns += 1


def test_a_node_start_that_times_out_is_retried_after_a_shutdown():
    ray = RayStandIn([TIMEOUT, TIMEOUT])
    assert ray_pool._connect(ray, PoolConfig(backend="ray", num_workers=2), cpus_needed=2)
    assert len(ray.inits) == ray_pool.LOCAL_START_ATTEMPTS == 3 and ray.shutdowns == 2
    assert all(kw["address"] == "local" and kw["num_cpus"] == 2 for kw in ray.inits)


def test_timeouts_past_the_last_attempt_are_raised():
    ray = RayStandIn([TIMEOUT] * ray_pool.LOCAL_START_ATTEMPTS)
    with pytest.raises(Exception, match="timed out during startup"):
        ray_pool._connect(ray, PoolConfig(backend="ray"), cpus_needed=1)
    assert len(ray.inits) == ray_pool.LOCAL_START_ATTEMPTS


def test_other_start_failures_are_not_retried():
    ray = RayStandIn([ValueError("object_store_memory is too small")])
    with pytest.raises(ValueError, match="too small"):
        ray_pool._connect(ray, PoolConfig(backend="ray"), cpus_needed=1)
    assert len(ray.inits) == 1 and ray.shutdowns == 0


def test_joining_a_cluster_is_not_retried():
    ray = RayStandIn([TIMEOUT])
    with pytest.raises(Exception, match="timed out"):
        ray_pool._connect(ray, PoolConfig(backend="ray", ray_address="auto"), cpus_needed=1)
    assert ray.inits == [dict(address="auto", logging_level=ray.inits[0]["logging_level"],
                              log_to_driver=True)]
