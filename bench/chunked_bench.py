"""`tokenpool bench chunked`: what a long prompt does to the streams decoding beside it.

One worker of the fleet, in this process, with two of its models, A and B, is driven through
`JobRunner` with hand-made work units, as the controller would send them; every token's time
is its `StepOutputs.emitted_at`. Per setting (chunked prefill on, then off, same weights):

- setup: B prefills a warm-up prompt (the chunk path, or the one-step prefill, runs once
  untimed), then A prefills `streams` short prompts and decodes them `decode_steps` steps
  (`baseline`: their inter-token gaps when only they run).
- same_model: a Prefill unit of A's long prompt with the streams as its `decode_ids`. The
  window runs from the unit's start to the long prompt's first token; every stream gap that
  ends in it counts (p50, p99, max), against A's TBT SLO. `prompt_steps`: what each of the
  unit's steps computed. Chunked, a step's tokens stay within `max_num_batched_tokens`;
  unchunked, the budget is raised to fit the prompt and its riders in one step (with a
  smaller one an unchunked prompt cannot join running decodes at all).
- other_model: `decode_steps` decode steps of A, then B's long prompt as the token-level
  policy runs it on a worker with streams to decode: a one-step Prefill (its first chunk),
  then turns of A and of B by turns, each one step here, until B's first token; unchunked,
  the Prefill computes the whole prompt at once. A's gaps across B's turns, with switches.
"""

from __future__ import annotations

import dataclasses
import os
import random
import sys
import time
from collections import defaultdict
from dataclasses import dataclass

from tokenpool.sim.timelines import percentile


@dataclass(frozen=True, slots=True)
class ChunkedPlan:
    model: str  # A: the streams, and the long prompt of same_model
    other: str  # B: the long prompt of other_model
    prompt_tokens: int = 4000
    streams: int = 16
    budget: int = 512  # max_num_batched_tokens with chunked prefill on
    stream_prompt_tokens: int = 32
    decode_steps: int = 16  # one-step Decode turns before each long prompt
    seed: int = 0

    def budget_for(self, chunked: bool) -> int:
        return self.budget if chunked else max(self.budget, self.prompt_tokens + self.streams)


class StepLog:
    """Wraps an engine's `step` to note what each step computed, and when."""

    def __init__(self, engine):
        self.engine, self._step = engine, engine.step
        self.steps: list[dict] = []
        engine.step = self

    def __call__(self, request_ids=None):
        start = time.monotonic()
        outputs = self._step(request_ids)
        e = self.engine
        prompt = e.last_step_prompt_tokens
        self.steps.append({"start": start, "end": time.monotonic(), "size": e.last_step_size,
                           "prompt_tokens": prompt})
        return outputs


class Driver:
    """A JobRunner and the times each request's tokens were emitted at."""

    def __init__(self, runner, plan: ChunkedPlan):
        from tokenpool.sampling import SamplingParams

        self.runner, self.plan = runner, plan
        self.emitted: dict[str, list[float]] = defaultdict(list)
        self.switch_s: list[float] = []
        self.logs = {m: StepLog(runner.worker.engine(m)) for m in (plan.model, plan.other)}
        vocab = min(e.model_config.vocab_size for e in runner.worker.engines.values())
        self._vocab = (min(256, vocab // 2), min(vocab, 16384))
        self._params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
        self.streams = tuple(f"stream-{i}" for i in range(plan.streams))

    def prompt(self, request_id: str, tokens: int, max_tokens: int = 1):
        rng = random.Random(f"{self.plan.seed}/{request_id}")
        ids = tuple(rng.randrange(*self._vocab) for _ in range(tokens))
        return request_id, (ids, dataclasses.replace(self._params, max_tokens=max_tokens))

    def run(self, *units, prompts=()) -> float:
        """Run one job of `units`; returns its start (time.monotonic)."""
        from tokenpool.gpu_pool.protocol import JobInput, StepOutputs
        from tokenpool.schedulers.types import Job

        start = time.monotonic()
        for item in self.runner.run(JobInput(Job(0, units), dict(prompts))):
            if isinstance(item, StepOutputs):
                for out in item.outputs:
                    self.emitted[out.request_id] += [item.emitted_at] * len(out.new_token_ids)
            elif item.errors:
                raise RuntimeError(f"the worker refused requests: {item.errors}")
            else:
                self.switch_s += [s.seconds for s in item.switches]
        return start

    def gaps(self, request_ids, since: float, until: float) -> list[float]:
        """Every gap between successive tokens of `request_ids` that ends in (since, until]."""
        return [b - a for r in request_ids for a, b in zip(self.emitted[r], self.emitted[r][1:])
                if since < b <= until]

    def abort(self, *request_ids) -> None:
        for engine in self.runner.worker.engines.values():
            for r in request_ids:
                engine.abort(r)


def stream_budget(plan: ChunkedPlan) -> int:
    """max_tokens of a stream: enough to outlast every phase (a token per chunk step)."""
    chunk = plan.budget - plan.streams
    return 2 * plan.decode_steps + 2 * -(-plan.prompt_tokens // chunk) + 8  # 2: both phases


def decode(d: Driver, steps: int) -> float:
    """`steps` one-step Decode turns of A's streams; returns when they began."""
    from tokenpool.schedulers.types import Decode

    start = time.monotonic()
    for _ in range(steps):
        d.run(Decode(0, d.plan.model, d.streams, 0.0))
    return start


def setup(d: Driver) -> dict:
    from tokenpool.schedulers.types import Prefill, Switch

    p = d.plan
    warm = min(p.prompt_tokens, 2 * p.budget)
    a, b = p.model, p.other
    d.run(Switch(0, b), Prefill(0, b, ("warm",)), prompts=[d.prompt("warm", warm)])
    d.abort("warm")
    prompts = [d.prompt(s, p.stream_prompt_tokens, stream_budget(p)) for s in d.streams]
    d.run(Switch(0, a), Prefill(0, a, d.streams), prompts=prompts)
    start = decode(d, p.decode_steps)
    return gap_stats(d.gaps(d.streams, start, time.monotonic()))


def same_model(d: Driver, slo_s: float) -> dict:
    from tokenpool.schedulers.types import Prefill

    p = d.plan
    start = d.run(Prefill(0, p.model, ("long-a",), decode_ids=d.streams),
                  prompts=[d.prompt("long-a", p.prompt_tokens)])
    first = d.emitted["long-a"][0]
    d.abort("long-a")
    gaps = d.gaps(d.streams, start, first)
    steps = [s for s in d.logs[p.model].steps if start <= s["start"] and s["end"] <= first]
    return {**gap_stats(gaps, slo_s), "long_ttft_s": first - start,
            "prompt_steps": [step_json(s) for s in steps if s["prompt_tokens"]],
            "steps_in_window": len(steps)}


def other_model(d: Driver, slo_s: float) -> dict:
    """B's long prompt on A's worker, cut as the token-level policy cuts it: a one-step
    Prefill of B, then one-step turns of A and of B by turns until B's first token (with
    chunking off the Prefill computes the whole prompt, and no turns follow)."""
    from tokenpool.schedulers.types import Decode, Prefill, Switch

    p = d.plan
    a, b = p.model, p.other
    decode(d, p.decode_steps)
    switches = len(d.switch_s)
    start = d.run(Switch(0, b), Prefill(0, b, ("long-b",), max_steps=1),
                  prompts=[d.prompt("long-b", p.prompt_tokens)])
    while not d.emitted["long-b"]:
        d.run(Switch(0, a), Decode(0, a, d.streams, 0.0))
        d.run(Switch(0, b), Decode(0, b, ("long-b",), 0.0))
    d.run(Switch(0, a), Decode(0, a, d.streams, 0.0))
    end = min(d.emitted[s][-1] for s in d.streams)
    d.abort("long-b", *d.streams)
    return {**gap_stats(d.gaps(d.streams, start, end), slo_s),
            "long_ttft_s": d.emitted["long-b"][0] - start,
            "switch_s": d.switch_s[switches:]}


def step_json(step: dict) -> dict:
    """A step's prompt tokens, its decodes (one token each; one prompt per step here), the
    tokens it computed and its seconds."""
    decodes = step["size"] - 1
    return {"prompt_tokens": step["prompt_tokens"], "decodes": decodes,
            "tokens": step["prompt_tokens"] + decodes, "seconds": step["end"] - step["start"]}


def gap_stats(gaps: list[float], slo_s: float | None = None) -> dict:
    def pct(q):
        value = percentile(gaps, q)
        return None if value is None else float(value)
    out = {"gaps": len(gaps), "itl_p50_s": pct(50), "itl_p99_s": pct(99),
           "itl_max_s": max(gaps, default=None)}
    if slo_s is not None:
        out["over_tbt_slo"] = sum(g > slo_s for g in gaps) / len(gaps) if gaps else None
    return out


def measure(fleet, models, weights, plan: ChunkedPlan, chunked: bool) -> dict:
    """One worker with chunked prefill on or off; its three phases."""
    from tokenpool.gpu_pool.job_runner import JobRunner
    from tokenpool.gpu_pool.worker import Worker

    engine = dataclasses.replace(fleet.engine, chunked_prefill=chunked, prefill_chunk_tokens=0,
                                 max_num_batched_tokens=plan.budget_for(chunked))
    worker = Worker(list(models.layouts.values()), weights.host_bytes, engine, fleet.memory,
                    models.tokenizers)
    runner = JobRunner(worker, 0)
    slo_s = fleet.slo_of(plan.model).tbt_s
    print(f"bench chunked: chunked prefill {'on' if chunked else 'off'}, budget "
          f"{engine.max_num_batched_tokens}", file=sys.stderr, flush=True)
    try:
        d = Driver(runner, plan)
        baseline = setup(d)
        return {"chunked_prefill": chunked,
                "max_num_batched_tokens": engine.max_num_batched_tokens,
                "baseline": baseline, "same_model": same_model(d, slo_s),
                "other_model": other_model(d, slo_s)}
    finally:
        runner.close()


def plan_fleet(fleet, plan: ChunkedPlan):
    """The fleet with only A and B; the plan with its prompt cut to what A's context takes."""
    from tokenpool.gpu_pool.fleet_weights import FleetModels

    fleet = dataclasses.replace(fleet, models=[fleet.model(plan.model), fleet.model(plan.other)])
    models = FleetModels(fleet)
    longest = min(models.max_model_lens().values()) - 1  # one token of room for its answer
    if plan.prompt_tokens > longest:
        print(f"bench chunked: warning: --prompt-tokens {plan.prompt_tokens} does not fit the "
              f"models' context; using {longest}", file=sys.stderr)
        plan = dataclasses.replace(plan, prompt_tokens=longest)
    return fleet, models, plan


def run(fleet, plan: ChunkedPlan) -> dict:
    import torch

    from tokenpool.bench.report import cpu_info
    from tokenpool.gpu_pool.fleet_weights import FleetWeights
    from tokenpool.gpu_pool.worker_factory import open_host_cache

    requested = plan.prompt_tokens
    fleet, models, plan = plan_fleet(fleet, plan)
    cache = open_host_cache(fleet, f"chunked{os.getpid()}")
    try:
        weights = FleetWeights(models, cache)
        weights.populate(progress=False)
        runs = {name: measure(fleet, models, weights, plan, flag)
                for name, flag in (("on", True), ("off", False))}
    finally:
        cache.close()
        cache.destroy()
    return {"bench": "chunked", **dataclasses.asdict(plan), "prompt_tokens_requested": requested,
            "tbt_slo_s": fleet.slo_of(plan.model).tbt_s, "runs": runs,
            "same_model_max_gap_ratio": _ratio(runs, "same_model"),
            "other_model_max_gap_ratio": _ratio(runs, "other_model"),
            "engine": {"device": fleet.engine.device, "dtype": fleet.engine.dtype,
                       "quantization": fleet.engine.quantization,
                       "prefix_caching": fleet.engine.prefix_caching},
            "threads": torch.get_num_threads(), "cpu": cpu_info()}


def _ratio(runs: dict, phase: str) -> float | None:
    """Max stream gap with chunked prefill off over on: how much chunking shortened it."""
    on, off = runs["on"][phase]["itl_max_s"], runs["off"][phase]["itl_max_s"]
    return off / on if on and off else None


def table(result: dict) -> str:
    """A's streams' gaps (ms) per phase and setting, against A's TBT SLO."""
    rows = [("chunked", "budget", "phase", "gaps", "p50", "p99", "max", "> SLO", "long TTFT")]
    for name, run_ in result["runs"].items():
        for phase in ("baseline", "same_model", "other_model"):
            g = run_[phase]
            over = g.get("over_tbt_slo")
            rows.append((name, str(run_["max_num_batched_tokens"]), phase, str(g["gaps"]),
                         _ms(g["itl_p50_s"]), _ms(g["itl_p99_s"]), _ms(g["itl_max_s"]),
                         "-" if over is None else f"{over:.0%}", _ms(g.get("long_ttft_s"))))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows]
    title = (f"{result['model']}: {result['streams']} streams, a {result['prompt_tokens']}-token "
             f"prompt (other_model: of {result['other']}); TBT SLO "
             f"{result['tbt_slo_s'] * 1e3:.0f} ms; times in ms")
    return "\n".join([title, *lines]) + "\n"


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.0f}"
