"""A worker on a node the serving process never touched fills that node's host cache itself
(`make_runner(..., fill_cache=True)`, what every Ray worker actor does), so its first
switches read no checkpoint; a second worker there finds the models packed."""

from __future__ import annotations

from helpers import TINY_FLEET
from tokenpool.fleet import load_fleet
from tokenpool.gpu_pool.worker_factory import make_runner, open_host_cache


def test_a_worker_fills_an_empty_node_cache_and_the_next_finds_it(tmp_path):
    cache_dir = tmp_path / "node-cache"
    cache_dir.mkdir()
    (tmp_path / "fleet.yaml").write_text(TINY_FLEET.replace("CACHE", str(cache_dir)))
    fleet = load_fleet(tmp_path / "fleet.yaml")
    ids = [m.id for m in fleet.models]
    cache = open_host_cache(fleet, "node_fill")
    try:
        assert not any(cache.contains(m) for m in ids)
        first = make_runner(fleet, 0, "node_fill", fill_cache=True)
        assert all(cache.contains(m) for m in ids)
        packed = {f.name: f.stat().st_mtime_ns for f in cache_dir.iterdir()}
        second = make_runner(fleet, 1, "node_fill", fill_cache=True)
        assert {f.name: f.stat().st_mtime_ns for f in cache_dir.iterdir()} == packed
        first.close()
        second.close()
    finally:
        cache.destroy()
