"""Runs one job's WorkUnits on a Worker, streaming each engine step's outputs as it goes.

`run` is a generator: a `StepOutputs` per engine step, then one `JobDone`. The same runner
serves a worker thread (`LocalPool`), a Ray actor, and the synchronous `WorkerExecutor`.

Units: Switch and Prefetch go to the worker; Prefill adds the prompts and steps until each has
its first token; Decode steps for `quota_s` of wall time (or until a request of the unit
finishes, when asked); SwapOut moves KV to host slabs, and the engine swaps it back in by
itself on a later step; SwapIn imports the requests that arrive as handoffs (the others are
already swapped out here, so nothing is to do).

Every request that ends during the job (finished, cancelled, or refused with an error) is
reported finished exactly once: in the result of the first unit from the one where it ended
on that names it, else in a zero-step DecodeDone at the end of the results. An engine step
serves all of a model's running requests, so a unit may finish another unit's requests; the
policy must still hear of them, or it would wait for a request the engine no longer holds.
Reporting them no earlier than that means no result after the finish names them again.
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
    """What one job has done so far, and which of its requests ended."""

    def __init__(self, inp: JobInput, worker_id: int):
        self.input = inp
        self.worker_id = worker_id
        self.cancelled = set(inp.cancelled)
        self.results: list = []
        self.unreported: dict[str, str] = {}  # ended, not yet in a result: id -> model
        self.ended: set[str] = set()  # every request that ended in this job
        self.errors: dict[str, str] = {}
        self.exported: dict[str, SequenceHandoff] = {}
        self.switches: list[SwitchEvent] = []
        self.decode_timings: list[DecodeTiming] = []

    def end(self, request_id: str, model: str) -> None:
        self.ended.add(request_id)
        self.unreported[request_id] = model

    def fail(self, request_id: str, model: str, message: str) -> None:
        self.errors[request_id] = message
        self.end(request_id, model)

    def note(self, outputs: list[RequestOutput], model: str) -> set[str]:
        """Record a step's finishes; returns the ids that finished."""
        finished = {out.request_id for out in outputs if out.finished}
        for request_id in finished:
            self.end(request_id, model)
        return finished

    def take_finished(self, request_ids: tuple[str, ...]) -> tuple[str, ...]:
        """Those of `request_ids` that ended and are not yet reported; now they are."""
        taken = tuple(r for r in request_ids if r in self.unreported)
        for request_id in taken:
            del self.unreported[request_id]
        return taken

    def report_the_rest(self) -> None:
        for request_id, model in self.unreported.items():
            self.results.append(DecodeDone(self.worker_id, model, (request_id,), 0,
                                           (request_id,)))
        self.unreported.clear()


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
        job.report_the_rest()
        yield JobDone(self.worker_id, tuple(job.results), job.exported, tuple(job.switches),
                      self._swap_bytes() - swapped_before, self._pages_used(),
                      self.worker.active, job.errors, tuple(job.decode_timings))

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
            if self._switch(unit.model, job) and unit.hold_s:
                time.sleep(unit.hold_s)  # an emulated engine re-initialisation (baselines)
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
        """Abort cancelled requests before anything runs, so their pages are free at once."""
        for request_id in job.input.cancelled:
            for model, engine in self.worker.engines.items():
                if engine.abort(request_id):
                    job.end(request_id, model)
                    break
            else:
                handoff = job.input.handoffs.get(request_id)
                if handoff is not None:  # never imported; the policy still counts it
                    job.end(request_id, handoff.model)
        # Cancelled requests of a Prefill unit are never started (see _start); unknown ids
        # are not this worker's, so nothing is reported for them.

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
        started = [r for r in unit.request_ids if self._start(engine, r, unit.model, job)]
        waiting = set(started)
        while waiting and engine.has_unfinished():
            outputs = engine.step()
            if not outputs:
                break  # no pages to start them now: they start on a later step of the engine
            job.note(outputs, unit.model)
            waiting.difference_update(out.request_id for out in outputs)
            yield self._stream(outputs)
        job.results.append(PrefillDone(self.worker_id, unit.model, unit.request_ids,
                                       job.take_finished(unit.request_ids)))
        if job.input.export_after_prefill:
            for request_id in started:
                if request_id not in job.ended:
                    job.exported[request_id] = engine.export_sequence(request_id)

    def _start(self, engine: LLMEngine, request_id: str, model: str, job: _Job) -> bool:
        """Add one prompt to the engine; False (and the request ended) if it cannot run."""
        if request_id in job.cancelled:
            job.end(request_id, model)
            return False
        prompt = job.input.prompts.get(request_id)
        if prompt is None:
            job.fail(request_id, model, f"no prompt was sent for request {request_id!r}")
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
            job.fail(request_id, model, str(exc))
            return False
        return True

    def _decode(self, unit: Decode, job: _Job) -> Iterator[StepOutputs]:
        self._ensure_active(unit.model, job)
        engine = self.worker.engine(unit.model)
        wanted = {r for r in unit.request_ids if r not in job.ended}
        if wanted and not engine.has_unfinished():
            raise RuntimeError(f"decode of {sorted(wanted)}: model {unit.model!r} holds no "
                               "requests (a finish went unreported)")
        start = time.monotonic()
        end = start + unit.quota_s
        steps, batch, context, pure = 0, 0, 0, True
        while wanted and engine.has_unfinished():
            pure = pure and not engine.waiting  # a step that admits a prompt is part prefill
            running = engine.running
            size, tokens = len(running), sum(seq.num_tokens for seq in running)
            outputs = engine.step()
            if not outputs:
                break  # nothing could be scheduled (no free pages); the turn is over
            steps, batch, context = steps + 1, batch + size, context + tokens
            finished = job.note(outputs, unit.model)
            yield self._stream(outputs)
            mine = finished & wanted
            wanted -= finished
            if time.monotonic() >= end or (mine and unit.until_first_finish):
                break
        seconds = time.monotonic() - start
        job.results.append(DecodeDone(self.worker_id, unit.model, unit.request_ids, steps,
                                      job.take_finished(unit.request_ids), seconds))
        if steps and pure:
            job.decode_timings.append(DecodeTiming(unit.model, steps, seconds, batch / steps,
                                                   context / steps))

    def _import(self, unit: SwapIn, job: _Job) -> None:
        """Take in the unit's requests that were prefilled on another worker."""
        engine = self.worker.engine(unit.model)
        for request_id in unit.request_ids:
            handoff = job.input.handoffs.get(request_id)
            if handoff is None or request_id in job.ended:
                continue  # swapped out on this worker: the engine swaps it in by itself
            try:
                engine.import_sequence(handoff)
            except HandoffError as exc:
                job.fail(request_id, unit.model, str(exc))

    # -- what the job reports ---------------------------------------------------------------

    def _stream(self, outputs: list[RequestOutput]) -> StepOutputs:
        return StepOutputs(self.worker_id, tuple(outputs), time.monotonic())

    def _swap_bytes(self) -> int:
        return sum(e.swapper.bytes_moved for e in self.worker.engines.values()
                   if e.swapper is not None)

    def _pages_used(self) -> int:
        return sum(e.num_used_pages for e in self.worker.engines.values())
