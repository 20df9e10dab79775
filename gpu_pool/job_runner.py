"""Runs one job's WorkUnits on a Worker, streaming each engine step's outputs as it goes.

`run` is a generator: a `StepOutputs` per engine step, then one `JobDone`. The same runner
serves a worker thread (`LocalPool`) and a Ray actor.

Units: Switch and Prefetch go to the worker; Prefill adds the prompts and steps them (and
nothing else) until each has its first token; Decode steps exactly its requests for `quota_s`
of wall time (or until one of them finishes, when asked); SwapOut moves KV to host slabs, and
the next step naming a request swaps it back in; SwapIn imports the requests that arrive as
handoffs (the others are already swapped out here, so nothing is to do).

A request ends only in a unit that names it, so each unit reports its own: its result lists
as finished those of its requests that ended in it or earlier in the job. Cancelled requests
(`JobInput.cancelled`, sent with every job until the controller hears of the finish) are
aborted when the job starts, freeing their pages at once, and count as ended: the unit that
names one reports it, in this job or a later one. A request the engine refuses is reported
by the unit naming it: the Prefill for a prompt, the Decode after a SwapIn that failed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import numpy as np
import torch

from tokenpool.errors import InvalidRequestError
from tokenpool.gpu_pool.engine import LLMEngine
from tokenpool.gpu_pool.kv_handoff import HandoffError, SequenceHandoff
from tokenpool.gpu_pool.protocol import (DecodeTiming, JobDone, JobInput, RequestOutput,
                                         StepOutputs, SwitchEvent)
from tokenpool.gpu_pool.worker import Worker
from tokenpool.sampling import SamplingParams
from tokenpool.schedulers.types import (Decode, DecodeDone, Prefetch, Prefill, PrefillDone,
                                        SwapIn, SwapOut, Switch)


class _Job:
    """What one job has done so far, and which requests have ended."""

    def __init__(self, inp: JobInput, worker_id: int):
        self.input = inp
        self.worker_id = worker_id
        self.cancelled = set(inp.cancelled)
        self.ended = set(inp.cancelled)  # cancelled, failed or finished: reported when named
        self.results: list = []
        self.errors: dict[str, str] = {}
        self.exported: dict[str, SequenceHandoff] = {}
        self.switches: list[SwitchEvent] = []
        self.decode_timings: list[DecodeTiming] = []

    def fail(self, request_id: str, message: str) -> None:
        self.errors[request_id] = message
        self.ended.add(request_id)

    def note(self, outputs: list[RequestOutput]) -> set[str]:
        """Record a step's finishes; returns the ids that finished."""
        finished = {out.request_id for out in outputs if out.finished}
        self.ended |= finished
        return finished

    def finished(self, request_ids: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(r for r in request_ids if r in self.ended)


def recompute_handoff(engine: LLMEngine, request_id: str, prompt_ids, params: SamplingParams,
                      emitted: tuple[int, ...]) -> SequenceHandoff:
    """A request whose worker died, as a handoff without KV: the engine recomputes prompt
    plus `emitted` (the tokens its client has) in one prefill, as after a preemption, and
    replays its detokenizer over them, so text continues with nothing repeated or dropped.

    A seeded sampler is replayed too (one uniform per token, as the sampler draws), so its
    stream continues where it stood; the tokens equal an uninterrupted run's only as far
    as a prefill's logits equal the decode steps' (exactly, in practice, for greedy).
    """
    generator = engine._generator(params)  # None for greedy; an unseeded one starts afresh
    if generator is not None and params.seed is not None:
        for _ in emitted:
            torch.rand(1, generator=generator)
    state = None if generator is None else generator.get_state().numpy().tobytes()
    shape = engine.memory.kv.shape
    return SequenceHandoff(request_id, engine.model_id, tuple(prompt_ids), tuple(emitted),
                           params, state, shape, engine.dtype_name,
                           np.empty((0, shape.page_bytes), dtype=np.uint8))


class JobRunner:
    def __init__(self, worker: Worker, worker_id: int,
                 on_close: Callable[[], None] | None = None):
        self.worker = worker
        self.worker_id = worker_id
        self._on_close = on_close

    def run(self, inp: JobInput) -> Iterator[StepOutputs | JobDone]:
        job = _Job(inp, self.worker_id)
        swapped_before = self._swap_bytes()
        self._cancel(job)
        for unit in inp.job.units:
            yield from self._run_unit(unit, job)
        yield JobDone(self.worker_id, tuple(job.results), job.exported, tuple(job.switches),
                      self._swap_bytes() - swapped_before, self._pages_used(),
                      self.worker.active, job.errors, tuple(job.decode_timings),
                      self.worker.cached_pages())

    def close(self) -> None:
        self.worker.close()
        if self._on_close is not None:
            self._on_close()

    def _run_unit(self, unit, job: _Job) -> Iterator[StepOutputs]:
        kind = type(unit)
        if kind is Prefill:
            yield from self._prefill(unit, job)
        elif kind is Decode:
            yield from self._decode(unit, job)
        elif kind is Switch:
            if self._switch(unit.model, job) and unit.baseline_switch_overhead_s:
                # An emulated engine re-initialisation (request-level baselines).
                time.sleep(unit.baseline_switch_overhead_s)
        elif kind is Prefetch:
            self.worker.prefetch(unit.model)
        elif kind is SwapOut:
            self.worker.engine(unit.model).swap_out(list(unit.request_ids))
        elif kind is SwapIn:
            self._import(unit, job)
        else:
            raise TypeError(f"unknown work unit {unit!r}")

    # -- units ------------------------------------------------------------------------------

    def _cancel(self, job: _Job) -> None:
        """Abort cancelled requests before anything runs, so their pages are free at once.
        Ids this worker does not hold are ignored; all are reported by the units naming them."""
        for request_id in job.input.cancelled:
            for engine in self.worker.engines.values():
                if engine.abort(request_id):
                    break

    def _switch(self, model: str, job: _Job) -> bool:
        """Switch to `model`; False if it was in already (not a switch, for the metrics
        either)."""
        if self.worker.active == model:
            return False
        record = self.worker.switch(model)
        job.switches.append(SwitchEvent(record.model_id, record.seconds, record.bytes_copied,
                                        record.prefetched))
        return True

    def _ensure_active(self, model: str, job: _Job) -> None:
        """A policy that believes the model loaded sends no Switch; after a restart (a fresh
        worker holds no weights) that belief is stale, so the unit switches it in itself."""
        if self.worker.active != model:
            self._switch(model, job)

    def _prefill(self, unit: Prefill, job: _Job) -> Iterator[StepOutputs]:
        self._ensure_active(unit.model, job)
        engine = self.worker.engine(unit.model)
        started = [r for r in unit.request_ids if self._start(engine, r, job)]
        riding = [r for r in unit.decode_ids if r not in job.ended and engine.holds(r)]
        waiting, decoded, decode_steps, steps = started, set(), 0, 0
        # Unchunked, a prompt over the budget needs a step alone: the unit runs to the end.
        max_steps = unit.max_steps if engine.config.chunked_prefill else 0
        while waiting and not (max_steps and steps >= max_steps):
            # Prompts still without a first token, and the decodes named, which ride every
            # step while prompts are computed in chunks, so none stalls for a whole prompt.
            outputs = engine.step(waiting + riding)
            if not engine.last_step_size:
                break  # no room to start them now: the next unit naming them does
            steps += 1
            job.note(outputs)
            if outputs:
                yield self._stream(outputs)
            stepped = {out.request_id for out in outputs}
            decode_steps += bool(stepped.intersection(riding))
            decoded |= stepped.intersection(riding)
            waiting = [r for r in waiting if r not in stepped]
            # One that missed a step (no page) or ended rides no more: a decode the policy
            # counts as `decode_steps` tokens may have got fewer, never more.
            riding = [r for r in riding if r in stepped and r not in job.ended]
            if not engine.last_step_prompt_tokens:
                riding = []  # a prompt over the budget, unchunked, runs in a step alone
        decoded |= job.ended.intersection(unit.decode_ids)
        job.results.append(PrefillDone(
            self.worker_id, unit.model, unit.request_ids,
            job.finished(unit.request_ids + unit.decode_ids),
            tuple(r for r in unit.decode_ids if r in decoded), max(decode_steps, 1)))
        if job.input.export_after_prefill:
            for request_id in started:
                if request_id not in job.ended:
                    job.exported[request_id] = engine.export_sequence(request_id)

    def _start(self, engine: LLMEngine, request_id: str, job: _Job) -> bool:
        """Add one prompt to the engine; False (and the request ended) if it cannot run."""
        if request_id in job.cancelled:
            return False
        prompt = job.input.prompts.get(request_id)
        if prompt is None:
            job.fail(request_id, f"no prompt was sent for request {request_id!r}")
            return False
        prompt_ids, params = prompt
        emitted = job.input.resumed.get(request_id)
        try:
            if emitted:
                engine.import_sequence(recompute_handoff(engine, request_id, prompt_ids,
                                                         params, emitted))
            else:
                engine.add_request(list(prompt_ids), params, request_id)
        except (InvalidRequestError, HandoffError) as exc:  # this request is bad, not the job
            job.fail(request_id, str(exc))
            return False
        return True

    def _decode(self, unit: Decode, job: _Job) -> Iterator[StepOutputs]:
        self._ensure_active(unit.model, job)
        engine = self.worker.engine(unit.model)
        wanted = [r for r in unit.request_ids if r not in job.ended]
        lost = [r for r in wanted if not engine.holds(r)]
        if lost:
            raise RuntimeError(f"decode of {lost}: model {unit.model!r} does not hold them "
                               "(a finish went unreported)")
        start = time.monotonic()
        end = start + unit.quota_s
        steps, batch, context, pure = 0, 0, 0, True
        while wanted:
            outputs = engine.step(wanted)
            if not engine.last_step_size:
                break  # none of them could be scheduled (no free pages); the turn is over
            # A step that computes a prompt (a request preempted to recompute) is part prefill.
            pure = pure and not engine.last_step_prompt_tokens
            steps, batch = steps + 1, batch + len(outputs)
            context += sum(o.num_prompt_tokens + o.num_output_tokens - 1 for o in outputs)
            finished = job.note(outputs)
            if outputs:
                yield self._stream(outputs)
            wanted = [r for r in wanted if r not in finished]
            if time.monotonic() >= end or (finished and unit.until_first_finish):
                break
        seconds = time.monotonic() - start
        job.results.append(DecodeDone(self.worker_id, unit.model, unit.request_ids, steps,
                                      job.finished(unit.request_ids), seconds))
        if steps and pure:
            job.decode_timings.append(DecodeTiming(unit.model, steps, seconds, batch / steps,
                                                   context / steps))

    def _import(self, unit: SwapIn, job: _Job) -> None:
        """Take in the unit's requests that were prefilled on another worker; one that fails
        is reported by the Decode naming it, which follows in the same job."""
        engine = self.worker.engine(unit.model)
        for request_id in unit.request_ids:
            handoff = job.input.handoffs.get(request_id)
            if handoff is None or request_id in job.ended:
                continue  # swapped out on this worker: the step naming it swaps it in
            try:
                engine.import_sequence(handoff)
            except HandoffError as exc:
                job.fail(request_id, str(exc))

    # -- what the job reports ---------------------------------------------------------------

    def _stream(self, outputs: list[RequestOutput]) -> StepOutputs:
        return StepOutputs(self.worker_id, tuple(outputs), time.monotonic())

    def _swap_bytes(self) -> int:
        return sum(e.swapper.bytes_moved for e in self.worker.engines.values()
                   if e.swapper is not None)

    def _pages_used(self) -> int:
        return sum(e.num_used_pages for e in self.worker.engines.values())
