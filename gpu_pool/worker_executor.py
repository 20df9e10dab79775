"""Jobs on real workers: each WorkUnit becomes calls on a `Worker` and its engines.

This executor runs a job to completion when it starts (one job at a time in this process),
so on the wall clock the controller sees it finish at once. Ray actors will run workers in
parallel behind the same `start` / `collect` interface.

Mapping of units: Switch and Prefetch go to the worker; Prefill adds the requests to the
model's engine and steps until each has its first token; Decode steps for the quota of wall
time (or until a request finishes, when asked); SwapOut moves KV to host slabs, and the
engine swaps it back in by itself on its next step. An engine step serves every running
request of its model, so a unit may also advance, and even finish, that model's other
requests: outputs stay exact, and every such finish is reported (as a zero-step DecodeDone)
so the policy never waits for a request the engine no longer holds.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from tokenpool.gpu_pool.engine_config import RequestOutput
from tokenpool.gpu_pool.worker import Worker
from tokenpool.sampling import SamplingParams
from tokenpool.schedulers.types import (Decode, DecodeDone, Job, Prefetch, Prefill,
                                        PrefillDone, SwapOut, Switch)


class WorkerExecutor:
    def __init__(self, workers: list[Worker], on_output: Callable[[RequestOutput], None],
                 now: Callable[[], float]):
        self.workers = workers
        self.on_output = on_output
        self.now = now  # the controller clock's now(): completions are stamped with it
        self.requests: dict[str, tuple[list[int], SamplingParams]] = {}
        self._finished: list[tuple[float, int, list]] = []

    def register(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        """What a Prefill of `request_id` will feed the engine."""
        self.requests[request_id] = (prompt_ids, params)

    def start(self, job: Job, now: float) -> None:
        worker = self.workers[job.worker]
        results: list = []
        self._elsewhere: list[tuple[str, str]] = []  # (model, request) finished in another's unit
        for unit in job.units:
            kind = type(unit)
            if kind is Switch:
                worker.switch(unit.model)
            elif kind is Prefetch:
                worker.prefetch(unit.model)
            elif kind is Prefill:
                results.append(self._prefill(worker, job.worker, unit))
            elif kind is Decode:
                results.append(self._decode(worker, job.worker, unit))
            elif kind is SwapOut:
                worker.engine(unit.model).swap_out(list(unit.request_ids))
        for model, request_id in self._elsewhere:
            results.append(DecodeDone(job.worker, model, (request_id,), 0, (request_id,)))
        self._finished.append((self.now(), job.worker, results))

    def _emit(self, out: RequestOutput, model: str, mine: set[str], finished: list[str]) -> None:
        self.on_output(out)
        if out.finished:
            if out.request_id in mine:
                finished.append(out.request_id)
            else:
                self._elsewhere.append((model, out.request_id))

    def next_done(self) -> float | None:
        return self._finished[0][0] if self._finished else None

    def collect(self, now: float) -> list[tuple[int, list]]:
        done = [(worker, results) for _, worker, results in self._finished]
        self._finished.clear()
        return done

    def _prefill(self, worker: Worker, wid: int, unit: Prefill) -> PrefillDone:
        engine = worker.engine(unit.model)
        waiting = set(unit.request_ids)
        for request_id in unit.request_ids:
            prompt_ids, params = self.requests.pop(request_id)
            engine.add_request(prompt_ids, params, request_id)
        mine, finished = set(unit.request_ids), []
        while waiting and engine.has_unfinished():
            for out in engine.step():
                waiting.discard(out.request_id)
                self._emit(out, unit.model, mine, finished)
        return PrefillDone(wid, unit.model, unit.request_ids, tuple(finished))

    def _decode(self, worker: Worker, wid: int, unit: Decode) -> DecodeDone:
        engine = worker.engine(unit.model)
        wanted = set(unit.request_ids)
        if not engine.has_unfinished():
            raise RuntimeError(f"decode of {sorted(wanted)}: model {unit.model!r} holds no "
                               "requests (a finish went unreported)")
        end = time.monotonic() + unit.quota_s
        steps, finished = 0, []
        while engine.has_unfinished():
            for out in engine.step():
                self._emit(out, unit.model, wanted, finished)
            steps += 1
            if time.monotonic() >= end or (finished and unit.until_first_finish) or \
                    wanted.issubset(finished):
                break
        return DecodeDone(wid, unit.model, unit.request_ids, steps, tuple(finished))
