"""The node-wide host model cache: real files, real mappings, real second processes."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import uuid

import pytest

from tokenpool.memory.host_cache import HostModelCache, ModelTooLargeError, safe_name
from tokenpool.memory.packing import PackIndex

MIB = 1 << 20


def pattern(seed: int, nbytes: int) -> bytes:
    return bytes((i * 7 + seed) % 251 for i in range(nbytes))


def packed(nbytes: int) -> PackIndex:
    return PackIndex.layout([("w", "float32", (nbytes // 8,)), ("b", "float16", (nbytes // 4,))])


def filler(data: bytes):
    def fill(buf: memoryview) -> None:
        buf[:len(data)] = data
    return fill


@pytest.fixture
def make_cache(tmp_path):
    """Caches over one fresh namespace; every file is unlinked afterwards."""
    namespace = f"test_{uuid.uuid4().hex[:12]}"
    made = []

    def make(budget: int, root: str = str(tmp_path), loader=None) -> HostModelCache:
        cache = HostModelCache(budget, namespace, root=root, loader=loader)
        made.append(cache)
        return cache

    yield make
    for cache in made:
        cache.destroy()


def test_put_then_get_returns_the_same_bytes_and_index(make_cache):
    cache = make_cache(budget=1 * MIB)
    index = packed(4096)
    data = pattern(1, index.nbytes)
    cache.put("org/model-a", index, filler(data))

    got_index, view = cache.get("org/model-a")
    assert got_index == index
    assert view.readonly and bytes(view) == data
    assert cache.contains("org/model-a") and not cache.contains("org/model-b")
    assert cache.model_ids() == ["org/model-a"]
    assert cache.used_bytes == index.nbytes
    with pytest.raises(TypeError):
        view[0] = 0


def test_a_miss_without_loader_names_the_model(make_cache):
    with pytest.raises(KeyError, match="org/absent"):
        make_cache(budget=MIB).get("org/absent")


def test_lru_eviction_and_reread_through_the_loader(make_cache):
    index = packed(64 * 1024)
    calls = []

    def loader(model_id: str):
        calls.append(model_id)
        return index, filler(pattern(ord(model_id[-1]), index.nbytes))

    cache = make_cache(budget=2 * index.nbytes, loader=loader)
    cache.get("m-a")
    cache.get("m-b")
    cache.get("m-a")  # m-b is now least recently used
    cache.get("m-c")
    assert cache.model_ids() == ["m-a", "m-c"]
    assert cache.used_bytes <= cache.budget_bytes

    _, view = cache.get("m-b")  # re-read from "disk", evicting m-a
    assert bytes(view) == pattern(ord("b"), index.nbytes)
    assert cache.model_ids() == ["m-c", "m-b"]
    cache.get("m-b")
    cache.get("m-c")
    assert calls == ["m-a", "m-b", "m-c", "m-b"]


def test_a_model_larger_than_the_budget_is_refused(make_cache):
    cache = make_cache(budget=1000)
    index = packed(4096)
    with pytest.raises(ModelTooLargeError, match=rf"org/huge.*{index.nbytes} B.*1000 B"):
        cache.put("org/huge", index, filler(b""))
    assert cache.model_ids() == [] and cache.used_bytes == 0


def test_an_evicted_or_replaced_model_is_mapped_again(make_cache):
    index = packed(4096)
    reader, writer = make_cache(budget=MIB), make_cache(budget=MIB)  # two processes' worth
    writer.put("m", index, filler(pattern(1, index.nbytes)))
    _, old_view = reader.get("m")

    writer.evict("m")
    writer.put("m", index, filler(pattern(2, index.nbytes)))
    _, new_view = reader.get("m")
    assert bytes(new_view) == pattern(2, index.nbytes)
    assert bytes(old_view) == pattern(1, index.nbytes)  # still valid while held
    assert reader.close() == ["m"]  # held views keep their mapping until released
    del old_view, new_view


def test_a_fill_that_keeps_its_buffer_is_refused(make_cache):
    cache, kept = make_cache(budget=MIB), []
    with pytest.raises(RuntimeError, match="kept a reference"):
        cache.put("m", packed(4096), lambda buf: kept.append(buf[:16]))
    assert not cache.contains("m")


_ATTACH_SCRIPT = """
import hashlib, json, sys
from tokenpool.memory.host_cache import HostModelCache
cache = HostModelCache(int(sys.argv[3]), sys.argv[2], root=sys.argv[1])
index, view = cache.get(sys.argv[4])
print(json.dumps({"sha256": hashlib.sha256(view).hexdigest(), "index": index.to_dict()}))
"""


def test_a_second_process_reads_what_the_first_put(make_cache, tmp_path):
    cache = make_cache(budget=MIB)
    index = packed(8192)
    data = pattern(5, index.nbytes)
    cache.put("org/shared", index, filler(data))

    out = subprocess.run([sys.executable, "-c", _ATTACH_SCRIPT, str(tmp_path), cache.namespace,
                          str(MIB), "org/shared"], capture_output=True, text=True, check=True)
    seen = json.loads(out.stdout)
    assert seen["sha256"] == hashlib.sha256(data).hexdigest()
    assert PackIndex.from_dict(seen["index"]) == index


_RACE_SCRIPT = """
import sys, time
from tokenpool.memory.host_cache import HostModelCache
from tokenpool.memory.packing import PackIndex

def loader(model_id):
    with open(sys.argv[3], "a") as log:
        log.write(model_id + "\\n")
    time.sleep(0.3)  # a slow disk: the other process asks meanwhile
    return PackIndex.layout([("w", "float32", (1024,))]), lambda buf: buf.__setitem__(0, 42)

cache = HostModelCache(1 << 20, sys.argv[2], root=sys.argv[1], loader=loader)
print(cache.get("org/racy")[1][0])
"""


def test_a_model_missing_everywhere_is_loaded_once_per_node(make_cache, tmp_path):
    cache = make_cache(budget=MIB)
    log = tmp_path / "loads.log"
    argv = [sys.executable, "-c", _RACE_SCRIPT, str(tmp_path), cache.namespace, str(log)]
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=30)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert outputs == ["42\n", "42\n"]
    assert log.read_text().splitlines() == ["org/racy"]


# A worker: attach, touch every page, report memory once every worker is attached (before
# that, a page mapped by one process alone counts as private to it), then hold on.
_WORKER_SCRIPT = """
import json, sys
from tokenpool.memory.host_cache import HostModelCache

def rollup():
    fields = {}
    for line in open("/proc/self/smaps_rollup"):
        parts = line.split()
        if len(parts) == 3 and parts[2] == "kB":
            fields[parts[0].rstrip(":")] = int(parts[1]) * 1024
    return fields

cache = HostModelCache(int(sys.argv[3]), sys.argv[2], root=sys.argv[1])
print("started", flush=True); sys.stdin.readline()
before = rollup()
index, view = cache.get(sys.argv[4])
checksum = sum(view[::4096])
print("attached", flush=True); sys.stdin.readline()
print(json.dumps({"before": before, "after": rollup(), "checksum": checksum}), flush=True)
sys.stdin.readline()
"""


def repeat_fill(chunk: bytes):
    def fill(buf: memoryview) -> None:
        for offset in range(0, len(buf), len(chunk)):
            buf[offset:offset + len(chunk)] = chunk
    return fill


def uss(rollup: dict) -> int:
    return rollup["Private_Clean"] + rollup["Private_Dirty"]


def meminfo() -> dict:
    with open("/proc/meminfo") as f:
        return {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}


def tell_all(workers, line: str | None, expect: str | None = None) -> list[str]:
    replies = []
    for worker in workers:
        if line is not None:
            worker.stdin.write(line + "\n")
            worker.stdin.flush()
        if expect is not None:
            replies.append(worker.stdout.readline().strip())
            if not replies[-1].startswith(expect):
                worker.kill()  # so that reading its stderr to the end cannot hang
                pytest.fail(f"worker said {replies[-1]!r}: {worker.stderr.read()}")
    return replies


def shm_free_bytes() -> int:
    if not os.path.isdir("/dev/shm"):
        return 0
    st = os.statvfs("/dev/shm")
    return st.f_bavail * st.f_frsize


@pytest.mark.skipif(shm_free_bytes() < 256 * MIB, reason="needs 256 MiB free in /dev/shm")
def test_two_workers_share_one_copy_of_the_packed_fleet(make_cache):
    size = 128 * MIB
    chunk = pattern(3, MIB)
    cache = make_cache(budget=size, root="/dev/shm")
    argv = [sys.executable, "-c", _WORKER_SCRIPT, "/dev/shm", cache.namespace, str(size), "fleet"]
    workers = [subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        tell_all(workers, None, expect="started")
        node_before = meminfo()
        index = PackIndex.layout([("fleet", "float32", (size // 4,))])
        cache.put("fleet", index, repeat_fill(chunk))
        tell_all(workers, "attach", expect="attached")
        reports = [json.loads(r) for r in tell_all(workers, "measure", expect="{")]
        node_after = meminfo()
        tell_all(workers, "exit")
    finally:
        for worker in workers:
            worker.kill()  # a no-op once it has exited
            worker.wait()

    assert all(r["checksum"] == size // MIB * sum(chunk[::4096]) for r in reports)
    shm_file = os.stat(f"/dev/shm/tokenpool-{cache.namespace}-{safe_name('fleet')}.bin")
    private_growth = [uss(r["after"]) - uss(r["before"]) for r in reports]
    for r in reports:  # each worker really maps the whole fleet...
        assert r["after"]["Rss"] - r["before"]["Rss"] >= 0.95 * size
    assert max(private_growth) < 0.02 * size  # ...but owns none of it
    assert shm_file.st_blocks * 512 + sum(private_growth) <= 1.2 * size
    pss_growth = sum(r["after"]["Pss"] - r["before"]["Pss"] for r in reports)
    print(f"packed {size / MIB:.0f} MiB; shm file {shm_file.st_blocks * 512 / MIB:.1f} MiB; "
          f"worker private growth {[round(g / MIB, 2) for g in private_growth]} MiB; "
          f"Pss growth {pss_growth / MIB:.1f} MiB; node Shmem "
          f"+{(node_after['Shmem'] - node_before['Shmem']) / MIB:.1f} MiB, MemAvailable "
          f"-{(node_before['MemAvailable'] - node_after['MemAvailable']) / MIB:.1f} MiB")
    assert 0.95 * size <= pss_growth <= 1.2 * size
    # The node's own account agrees: the bytes are in shared memory once, not twice.
    # (MemAvailable is printed only: anything else running on the node moves it.)
    assert 0.95 * size <= node_after["Shmem"] - node_before["Shmem"] <= 1.2 * size
