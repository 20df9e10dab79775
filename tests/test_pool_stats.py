"""The switch-duration histogram: counted per bucket in PoolStats, exported by PoolCollector.

The record must stay the same size however many switches happen, and the exported
histogram must be cumulative, end in +Inf = all switches, and sum the seconds.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from tokenpool.controller.pool_stats import SWITCH_BUCKETS, PoolStats
from tokenpool.gpu_pool.protocol import JobDone, SwitchEvent
from tokenpool.proxy.metrics import PoolCollector
from tokenpool.schedulers.types import SLO


def switched(stats: PoolStats, *seconds: float, model: str = "a") -> None:
    events = tuple(SwitchEvent(model, s, bytes_copied=1, prefetched=False) for s in seconds)
    stats.job_done(JobDone(worker=0, results=(), switches=events, model=model))


def make_stats() -> PoolStats:
    return PoolStats(num_workers=1, slos={"a": SLO(1.0, 0.1), "b": SLO(1.0, 0.1)})


def test_switches_land_in_their_bucket_bounds_inclusive():
    stats = make_stats()
    switched(stats, 0.0005, 0.001, 0.03, 0.03, 7.0)  # 7 s is past the last bound
    counts = stats.models["a"].switch_counts
    assert counts[SWITCH_BUCKETS.index(0.001)] == 2  # le="0.001" includes 0.001 itself
    assert counts[SWITCH_BUCKETS.index(0.05)] == 2
    assert sum(counts) == 4
    assert stats.models["a"].switches == 5
    assert stats.models["b"].switch_counts == [0] * len(SWITCH_BUCKETS)


def test_record_size_does_not_grow_with_switches():
    stats = make_stats()
    for _ in range(1000):
        switched(stats, 0.02)
    assert len(stats.models["a"].switch_counts) == len(SWITCH_BUCKETS)
    assert stats.models["a"].switch_counts[SWITCH_BUCKETS.index(0.025)] == 1000


class SnapshotController:
    def __init__(self, stats: PoolStats):
        self.stats = stats

    def snapshot(self):
        return self.stats.snapshot(infos=[], jobs={}, requests=(), worker_state=no_state)


def no_state(worker: int) -> None:
    return None


def exported(stats: PoolStats) -> dict[str, float]:
    registry = CollectorRegistry()
    registry.register(PoolCollector(SnapshotController(stats), kv_pages={}))
    lines = generate_latest(registry).decode().splitlines()
    return {k: float(v) for k, v in (ln.rsplit(" ", 1) for ln in lines
                                     if ln.startswith("tokenpool:model_switch_seconds"))}


def test_exported_histogram_is_cumulative_and_scrapes_repeat():
    stats = make_stats()
    switched(stats, 0.0005, 0.03, 7.0)
    for _ in range(2):  # a second scrape sees the same totals: nothing is drained
        series = exported(stats)
        bucket = 'tokenpool:model_switch_seconds_bucket{le="%s",model_name="a"}'
        assert series[bucket % "0.001"] == 1
        assert series[bucket % "0.05"] == 2
        assert series[bucket % "5.0"] == 2
        assert series[bucket % "+Inf"] == 3
        assert series['tokenpool:model_switch_seconds_count{model_name="a"}'] == 3
        assert abs(series['tokenpool:model_switch_seconds_sum{model_name="a"}'] - 7.0305) < 1e-9
        assert series['tokenpool:model_switch_seconds_count{model_name="b"}'] == 0


def test_decode_step_ratio_is_measured_over_predicted_time_since_start():
    stats = make_stats()
    assert stats.decode_step_ratio is None
    assert stats.snapshot([], {}, (), no_state).decode_step_ratio is None
    stats.decode_timed(0.30, 0.20)
    stats.decode_timed(0.10, 0.20)
    assert stats.decode_step_ratio == 1.0
    stats.decode_timed(0.60, 0.0)  # a turn the model predicts as free still counts its time
    assert stats.snapshot([], {}, (), no_state).as_json()["decode_step_ratio"] == 2.5
