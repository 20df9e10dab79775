"""Jobs on real workers for `controller/loop.py`: a synchronous adapter over `JobRunner`.

This executor runs a job to completion when it starts (one job at a time in this process),
so on the wall clock the controller sees it finish at once. Serving runs the same JobRunner
in worker threads or Ray actors (`gpu_pool/pool.py`); the unit semantics are the runner's.
"""

from __future__ import annotations

from collections.abc import Callable

from tokenpool.gpu_pool.protocol import JobDone, JobInput, StepOutputs
from tokenpool.gpu_pool.protocol import RequestOutput
from tokenpool.gpu_pool.job_runner import JobRunner
from tokenpool.gpu_pool.worker import Worker
from tokenpool.sampling import SamplingParams
from tokenpool.schedulers.types import Job, Prefill


class WorkerExecutor:
    def __init__(self, workers: list[Worker], on_output: Callable[[RequestOutput], None],
                 now: Callable[[], float]):
        self.workers = workers
        self.runners = [JobRunner(worker, i) for i, worker in enumerate(workers)]
        self.on_output = on_output
        self.now = now  # the controller clock's now(): completions are stamped with it
        self.requests: dict[str, tuple[tuple[int, ...], SamplingParams]] = {}
        self.errors: dict[str, str] = {}  # requests that ended with an error: id -> message
        self._finished: list[tuple[float, int, list]] = []

    def register(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        """What a Prefill of `request_id` will feed the engine."""
        self.requests[request_id] = (tuple(prompt_ids), params)

    def start(self, job: Job, now: float) -> None:
        prompts = {request_id: self.requests.pop(request_id)
                   for unit in job.units if isinstance(unit, Prefill)
                   for request_id in unit.request_ids if request_id in self.requests}
        done = self._run(JobInput(job, prompts))
        self.errors.update(done.errors)
        self._finished.append((self.now(), job.worker, list(done.results)))

    def _run(self, inp: JobInput) -> JobDone:
        done = None
        for item in self.runners[inp.job.worker].run(inp):
            if isinstance(item, StepOutputs):
                for out in item.outputs:
                    self.on_output(out)
            else:
                done = item
        return done

    def next_done(self) -> float | None:
        return self._finished[0][0] if self._finished else None

    def collect(self, now: float) -> list[tuple[int, list]]:
        done = [(worker, results) for _, worker, results in self._finished]
        self._finished.clear()
        return done
