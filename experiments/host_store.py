"""An experiment, not part of tokenpool: candidates for the node-wide host model store,
/dev/shm files or Ray's object store (the results and the choice: docs/host-cache.md).

    python experiments/host_store.py --size-mib 512 --json out/host_store.json

One packed "fleet" of --size-mib bytes is published once, then read by two other worker
processes, as a model switch would. For each candidate:

- publish_s: copying the bytes from a private buffer into the store (HostModelCache.put, or
  ray.put of a numpy array). Reading from disk is the same for both and is left out.
- attach_s: a worker's get of a zero-copy read-only view (HostModelCache.get maps the file
  with MAP_POPULATE; ray.get returns a numpy array over the plasma mapping).
- copy: the whole view copied into a private, already touched buffer, the host side of a
  switch; first_s also pays any page faults left on the view, best_s is the best of
  --repeats. "numpy" (np.copyto) and "torch" (Tensor.copy_) copy into a buffer at the same
  address mod 4096 as the view, as a page-aligned arena slot would be; "numpy_skew64" puts
  the buffer 64 B further on. glibc's memcpy runs at a third of its speed there (4 KiB
  aliasing between its loads and stores); torch's copy_, which a switch uses, is not
  affected (docs/host-cache.md).
- node growth with both workers attached: the store's shared memory (the /proc/meminfo Shmem
  delta; both stores live in /dev/shm) plus each worker's private growth (USS from
  /proc/self/smaps_rollup), next to the MemAvailable drop, which other activity also moves.

Workers are separate processes that report over stdin/stdout (shm) or Ray actors (ray).
Ray is imported lazily; without it the ray row says "ray not installed".
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np

from tokenpool.memory.host_cache import HostModelCache
from tokenpool.memory.packing import PackIndex

MIB = 1 << 20
PAGE = 4096
MODEL = "fleet"


# -- memory accounts ------------------------------------------------------------------------

def smaps_rollup() -> dict[str, int]:
    fields = {}
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines()[1:]:
        parts = line.split()
        if len(parts) == 3 and parts[2] == "kB":
            fields[parts[0].rstrip(":")] = int(parts[1]) * 1024
    return fields


def meminfo() -> dict[str, int]:
    return {line.split(":")[0]: int(line.split()[1]) * 1024
            for line in Path("/proc/meminfo").read_text().splitlines()}


def memory_summary(before: dict, after: dict) -> dict:
    return {"uss_growth": _uss(after) - _uss(before), "pss_growth": after["Pss"] - before["Pss"],
            "rss_growth": after["Rss"] - before["Rss"]}


def _uss(rollup: dict) -> int:
    return rollup["Private_Clean"] + rollup["Private_Dirty"]


# -- what a worker does, in either store ----------------------------------------------------

def private_buffer(nbytes: int, like: np.ndarray, skew: int = 0) -> np.ndarray:
    """A touched private buffer at `like`'s address + skew, mod 4096."""
    raw = np.empty(nbytes + 2 * PAGE, dtype=np.uint8)
    start = (like.ctypes.data + skew - raw.ctypes.data) % PAGE
    buf = raw[start:start + nbytes]
    buf.fill(1)  # np.zeros would leave the pages unmapped, and the copy would fault them in
    return buf


def copy_times(view: np.ndarray, repeats: int) -> dict[str, list[float]]:
    """Seconds per copy of the whole view into a private buffer, per way of copying."""
    ways = {"numpy": (0, np.copyto), "numpy_skew64": (64, np.copyto)}
    torch = _try_import_torch()
    if torch is not None:
        ways["torch"] = (0, lambda dst, src: torch.from_numpy(dst).copy_(torch.from_numpy(src)))
    times = {}
    for name, (skew, copy) in ways.items():
        private = private_buffer(view.nbytes, view, skew)
        times[name] = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            copy(private, view)
            times[name].append(time.perf_counter() - t0)
        del private
    return times


def _try_import_torch():
    try:
        import warnings

        import torch
    except ImportError:
        return None
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    return torch


class AttachedWorker:
    """One worker's state: a baseline, then an attached view it keeps until told to go."""

    def __init__(self):
        self.baseline = smaps_rollup()
        self.view = None

    def attach(self, get_view) -> float:
        t0 = time.perf_counter()
        self.view = get_view()
        return time.perf_counter() - t0

    def memory(self) -> dict:
        return memory_summary(self.baseline, smaps_rollup())

    def bandwidth(self, repeats: int) -> dict[str, list[float]]:
        return copy_times(self.view, repeats)


def shm_worker(root: str, namespace: str, budget: int, repeats: int) -> None:
    """Runs in a child process; one command a line on stdin, one JSON reply a line."""
    cache = HostModelCache(budget, namespace, root=root)
    worker = AttachedWorker()
    commands = {
        "attach": lambda: worker.attach(
            lambda: np.frombuffer(cache.get(MODEL)[1], dtype=np.uint8)),
        "memory": worker.memory,
        "bandwidth": lambda: worker.bandwidth(repeats),
    }
    print(json.dumps("started"), flush=True)
    for line in sys.stdin:
        if line.strip() == "exit":
            return
        print(json.dumps(commands[line.strip()]()), flush=True)


# -- the two candidates ---------------------------------------------------------------------

def bench_shm(source: np.ndarray, repeats: int, root: str = "/dev/shm") -> dict:
    namespace = f"bench_{uuid.uuid4().hex[:12]}"
    cache = HostModelCache(source.nbytes, namespace, root=root)
    argv = [sys.executable, str(Path(__file__).resolve()), "--shm-worker", root,
            namespace, str(source.nbytes), str(repeats)]
    procs = [subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    try:
        workers = [_PipeWorker(p) for p in procs]
        for w in workers:
            w.reply()  # "started": imports done, baselines taken
        node_before = meminfo()
        index = PackIndex.layout([(MODEL, "float32", (source.nbytes // 4,))])
        t0 = time.perf_counter()
        cache.put(MODEL, index, lambda buf: np.copyto(np.frombuffer(buf, np.uint8), source))
        publish_s = time.perf_counter() - t0
        return _measure(publish_s, workers, node_before)
    finally:
        for p in procs:
            p.kill()
            p.wait()
        cache.destroy()


class _PipeWorker:
    def __init__(self, proc: subprocess.Popen):
        self.proc = proc

    def call(self, command: str):
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.reply()

    def reply(self):
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.proc.pid} exited (rc {self.proc.wait()})")
        return json.loads(line)


def bench_ray(source: np.ndarray, repeats: int) -> dict:
    try:
        import ray
    except ImportError:
        return {"error": "ray not installed"}
    ray.init(num_cpus=2, object_store_memory=max(2 * source.nbytes, 256 * MIB),
             include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        actor_class = ray.remote(num_cpus=0)(_RayWorker)
        actors = [actor_class.remote() for _ in range(2)]
        ray.get([a.ping.remote() for a in actors])  # started: imports done, baselines taken
        node_before = meminfo()
        t0 = time.perf_counter()
        ref = ray.put(source)
        publish_s = time.perf_counter() - t0
        workers = [_ActorWorker(ray, a, ref, repeats) for a in actors]
        return _measure(publish_s, workers, node_before)
    finally:
        ray.shutdown()


class _RayWorker(AttachedWorker):
    """A Ray actor; the reference arrives in a list so Ray does not resolve it for us."""

    def ping(self) -> None:
        pass

    def attach_ref(self, refs: list) -> float:
        import ray

        return self.attach(lambda: ray.get(refs[0]))


class _ActorWorker:
    """The same call interface as _PipeWorker, over a Ray actor."""

    def __init__(self, ray, actor, ref, repeats: int):
        self.ray, self.actor, self.ref, self.repeats = ray, actor, ref, repeats

    def call(self, command: str):
        if command == "attach":
            return self.ray.get(self.actor.attach_ref.remote([self.ref]))
        if command == "bandwidth":
            return self.ray.get(self.actor.bandwidth.remote(self.repeats))
        return self.ray.get(self.actor.memory.remote())


def _measure(publish_s: float, workers: list, node_before: dict) -> dict:
    attach_s = [w.call("attach") for w in workers]
    node_after = meminfo()  # both attached; nothing private allocated yet
    memory = [w.call("memory") for w in workers]
    copies = [w.call("bandwidth") for w in workers]  # one at a time: they share the cores
    shmem_growth = node_after["Shmem"] - node_before["Shmem"]
    return {
        "publish_s": publish_s,
        "attach_s": attach_s,
        "copy": {way: {"first_s": [c[way][0] for c in copies],
                       "best_s": [min(c[way]) for c in copies]} for way in copies[0]},
        "workers": memory,
        "node_shmem_growth": shmem_growth,
        "node_growth": shmem_growth + sum(m["uss_growth"] for m in memory),
        "mem_available_drop": node_before["MemAvailable"] - node_after["MemAvailable"],
    }


# -- entry point ----------------------------------------------------------------------------

def run(size_mib: int, repeats: int, root: str, with_ray: bool) -> dict:
    source = (np.arange(size_mib * MIB, dtype=np.uint32) % 251).astype(np.uint8)
    results = {"shm": bench_shm(source, repeats, root)}
    if with_ray:
        results["ray"] = bench_ray(source, repeats)
    for row in results.values():
        for way in row.get("copy", {}).values():
            way["gb_per_s"] = source.nbytes / min(way["best_s"]) / 1e9
        if "node_growth" in row:
            row["node_growth_ratio"] = row["node_growth"] / source.nbytes
    return {"size_bytes": source.nbytes, "repeats": repeats, "shm_root": root,
            "results": results}


def print_table(report: dict) -> None:
    print(f"{report['size_bytes'] / MIB:.0f} MiB, two workers attached")
    for name, row in report["results"].items():
        if "error" in row:
            print(f"  {name:4}: {row['error']}")
            continue
        print(f"  {name:4}: publish {row['publish_s'] * 1e3:6.0f} ms | attach "
              f"{max(row['attach_s']) * 1e3:5.1f} ms | node growth "
              f"{row['node_growth_ratio']:.3f}x packed")
        for way, t in row["copy"].items():
            print(f"        copy {way:12}: first {max(t['first_s']) * 1e3:6.1f} ms, best "
                  f"{min(t['best_s']) * 1e3:6.1f} ms ({t['gb_per_s']:.1f} GB/s)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="write the report here")
    parser.add_argument("--root", default="/dev/shm", help="where the shm candidate's files go")
    parser.add_argument("--no-ray", action="store_true", help="measure the shm candidate only")
    parser.add_argument("--shm-worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.shm_worker:
        root, namespace, budget, repeats = args.shm_worker
        return shm_worker(root, namespace, int(budget), int(repeats))
    report = run(args.size_mib, args.repeats, args.root, not args.no_ray)
    report["command"] = shlex.join(["python", "experiments/host_store.py",
                                    *(sys.argv[1:] if argv is None else argv)])
    print_table(report)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
