"""`tokenpool bench handoff`: KV handed from a prefill actor to a decode actor, through the
serving process or by object reference (the measures: cli/bench_handoff.py's help).

Two RayPools of one local Ray cluster, one per mode, each a prefill worker and a decode
worker. The modes take turns round by round on the same prompts, so both see the same load.
"""

from __future__ import annotations

import dataclasses
import math
import queue
import random
import statistics
import time

from tokenpool.gpu_pool.fleet_weights import FleetModels, FleetWeights
from tokenpool.gpu_pool.pool_config import PoolConfig
from tokenpool.gpu_pool.protocol import JobDone, JobInput, StepOutputs
from tokenpool.gpu_pool.worker_factory import open_host_cache
from tokenpool.sampling import SamplingParams
from tokenpool.schedulers.types import Decode, Job, Prefill, SwapIn, Switch

MODES = {"driver": False, "by_ref": True}  # mode -> RayPool's kv_by_ref
# One token from the prefill, one from the decode step: every request ends with the round.
PARAMS = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
JOB_TIMEOUT_S = 600.0  # only a guard against a hang
# Untimed rounds first: model switches, first touch of KV pages, and (driver mode) of the
# object store's fresh pages, which took two rounds to settle on a 2-core CPU host.
WARMUP_ROUNDS = 2


@dataclasses.dataclass(frozen=True, slots=True)
class Round:
    handoff_s: float  # prefill JobDone received -> decode JobDone received
    cpu_s: float  # this process's CPU from the prefill's last step received to the same end
    kv_bytes: int
    decode_s: float  # the decode turn on the worker (DecodeDone.seconds), inside handoff_s
    tokens: dict  # request index -> its two tokens


class _Listener:
    """Hands each event to the bench thread with when it arrived: wall and process CPU."""

    def __init__(self):
        self.events: queue.SimpleQueue = queue.SimpleQueue()

    def _put(self, kind: str, item) -> None:
        self.events.put((kind, item, time.perf_counter(), time.process_time()))

    def on_step(self, out: StepOutputs) -> None:
        self._put("step", out)

    def on_done(self, done: JobDone) -> None:
        self._put("done", done)

    def on_failure(self, worker: int, error: BaseException) -> None:
        self._put("failure", error)

    def on_joined(self, worker: int) -> None:
        pass

    def until_done(self, tokens: dict) -> tuple[JobDone, float, float, float]:
        """The job's JobDone, when it arrived (wall, CPU), and the CPU time at its last step;
        streamed tokens go into `tokens`."""
        last_step_cpu = None
        while True:
            kind, item, at, cpu = self.events.get(timeout=JOB_TIMEOUT_S)
            if kind == "failure":
                raise RuntimeError(f"a handoff job failed: {item!r}") from item
            if kind == "done":
                if item.errors:
                    raise RuntimeError(f"requests failed: {item.errors}")
                return item, at, cpu, last_step_cpu if last_step_cpu is not None else cpu
            last_step_cpu = cpu
            for out in item.outputs:
                tokens.setdefault(out.request_id, []).extend(out.new_token_ids)


def handoff_round(pool, listener: _Listener, model: str, prompts: list[list[int]],
                  tag: str) -> Round:
    """Prefill `prompts` on worker 0, exporting their KV; import them on worker 1 and decode
    one step. Timed from the driver's side."""
    ids = tuple(f"{tag}-{i}" for i in range(len(prompts)))
    tokens: dict = {}
    pool.run(0, JobInput(Job(0, (Switch(0, model), Prefill(0, model, ids))),
                         prompts={r: (tuple(p), PARAMS) for r, p in zip(ids, prompts)},
                         export_after_prefill=True))
    prefilled, prefilled_at, _, cpu_start = listener.until_done(tokens)
    pool.run(1, JobInput(Job(1, (SwapIn(1, model, ids), Switch(1, model),
                                 Decode(1, model, ids, quota_s=JOB_TIMEOUT_S))),
                         handoffs=prefilled.handoffs))
    decoded, decoded_at, cpu_end, _ = listener.until_done(tokens)
    decode_s = sum(getattr(r, "seconds", 0.0) for r in decoded.results)
    return Round(decoded_at - prefilled_at, cpu_end - cpu_start,
                 kv_bytes(prefilled.handoffs), decode_s,
                 {i: tokens.get(r, []) for i, r in enumerate(ids)})


def kv_bytes(handoffs: dict) -> int:
    """KV bytes of the handoffs; references are read here, after the round was timed
    (from this node's store, without a copy)."""
    import ray

    total = 0
    for handoff in handoffs.values():
        kv = handoff.kv
        total += (ray.get(kv) if isinstance(kv, ray.ObjectRef) else kv).nbytes
    return total


def make_prompts(count: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(length)] for _ in range(count)]


def pool_config(fleet, batch_bytes: int) -> PoolConfig:
    """The fleet's pool, as one prefill and one decode worker, with a store that holds a
    round's KV several times over (the driver mode has it there twice at once)."""
    base = fleet.pool
    return dataclasses.replace(
        base, backend="ray", num_workers=2, prefill_workers=1, min_workers=None,
        max_workers=None, num_cpus=base.num_cpus or 2 * len(MODES),
        object_store_bytes=max(base.object_store_bytes, 4 * batch_bytes))


def run(fleet, model: str, requests: int, prompt_tokens: int, repeats: int,
        namespace: str, seed: int = 0) -> dict:
    from tokenpool.gpu_pool.ray_pool import RayPool

    fleet = dataclasses.replace(fleet, models=[fleet.model(model)])
    models = FleetModels(fleet)
    layout = models.layouts[model]
    shape = layout.page_shape
    batch_bytes = requests * math.ceil((prompt_tokens + 1) / shape.block_size) * shape.page_bytes
    config = pool_config(fleet, batch_bytes)
    cache = open_host_cache(fleet, namespace)
    pools: dict = {}
    try:
        FleetWeights(models, cache).populate(progress=False)
        listeners = {mode: _Listener() for mode in MODES}
        for mode, by_ref in MODES.items():  # the first pool starts Ray, the second joins it
            pools[mode] = RayPool(config, fleet, namespace, kv_by_ref=by_ref)
            pools[mode].start(listeners[mode])
        rounds: dict = {mode: [] for mode in MODES}
        # The same prompts every round: after the first the prefill worker finds them in
        # its prefix cache, so a round's prefill is one short step; its export still copies
        # every page.
        prompts = make_prompts(requests, prompt_tokens, layout.config.vocab_size, seed)
        for r in range(WARMUP_ROUNDS + repeats):
            for mode in MODES:
                done = handoff_round(pools[mode], listeners[mode], model, prompts, f"{mode}{r}")
                if r >= WARMUP_ROUNDS:
                    rounds[mode].append(done)
    finally:
        for pool in reversed(pools.values()):  # the pool that started Ray stops it last
            pool.close()
        cache.close()
        cache.destroy()
    return summary(rounds, model, requests, prompt_tokens, repeats, shape, layout)


def summary(rounds: dict, model: str, requests: int, prompt_tokens: int, repeats: int,
            shape, layout) -> dict:
    results = [mode_result(mode, rounds[mode]) for mode in MODES]
    by = {r["mode"]: r for r in results}
    driver, by_ref = by["driver"], by["by_ref"]
    tokens = [[rnd.tokens for rnd in rounds[mode]] for mode in MODES]
    return {
        "model": model, "requests": requests, "prompt_tokens": prompt_tokens,
        "repeats": repeats, "dtype": str(layout.dtype).removeprefix("torch."),
        "page_bytes": shape.page_bytes, "results": results,
        "ratio": {
            "handoff_s": driver["handoff_s_p50"] / by_ref["handoff_s_p50"],
            "bytes_per_s": by_ref["bytes_per_s"] / driver["bytes_per_s"],
            "driver_cpu_s_per_handoff": _ratio(driver["driver_cpu_s_per_handoff"],
                                               by_ref["driver_cpu_s_per_handoff"]),
        },
        "tokens_agree": all(t == tokens[0] for t in tokens),
    }


def mode_result(mode: str, rounds: list[Round]) -> dict:
    seconds = [r.handoff_s for r in rounds]
    nbytes = statistics.median(r.kv_bytes for r in rounds)
    p50 = statistics.median(seconds)
    return {
        "mode": mode, "handoffs": len(rounds), "handoff_bytes": int(nbytes),
        "handoff_s_p50": p50, "handoff_s_all": seconds, "bytes_per_s": nbytes / p50,
        "decode_s_p50": statistics.median(r.decode_s for r in rounds),
        "transfer_bytes_per_s": nbytes / statistics.median(r.handoff_s - r.decode_s
                                                           for r in rounds),
        "driver_cpu_s_per_handoff": statistics.median(r.cpu_s for r in rounds),
        "driver_cpu_s_all": [r.cpu_s for r in rounds],
    }


def _ratio(a: float, b: float) -> float | None:
    return a / b if b > 0 else None  # where the CPU clock is coarse, a round can read 0


def table(result: dict) -> str:
    lines = [f"{result['model']}: {result['requests']} requests x {result['prompt_tokens']} "
             f"prompt tokens per handoff, {result['repeats']} handoffs per mode",
             f"{'mode':<8} {'MiB':>8} {'handoff p50 ms':>15} {'MB/s':>9} "
             f"{'decode ms':>10} {'MB/s w/o decode':>16} {'driver CPU ms':>14}"]
    for r in result["results"]:
        lines.append(f"{r['mode']:<8} {r['handoff_bytes'] / 2**20:>8.1f} "
                     f"{r['handoff_s_p50'] * 1e3:>15.1f} {r['bytes_per_s'] / 1e6:>9.0f} "
                     f"{r['decode_s_p50'] * 1e3:>10.1f} {r['transfer_bytes_per_s'] / 1e6:>16.0f} "
                     f"{r['driver_cpu_s_per_handoff'] * 1e3:>14.2f}")
    ratio = result["ratio"]
    cpu = ratio["driver_cpu_s_per_handoff"]
    lines.append(f"driver / by_ref: handoff time {ratio['handoff_s']:.2f}x, driver CPU "
                 f"{'n/a' if cpu is None else f'{cpu:.1f}x'}; tokens agree: "
                 f"{result['tokens_agree']}")
    return "\n".join(lines) + "\n"
