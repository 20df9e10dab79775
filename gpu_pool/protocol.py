"""What the controller and a worker exchange: a job in, step outputs and a job's end out.

A worker produces `StepOutputs` (one per engine step, every request of that step together)
while a job runs and a `JobDone` when it ends. All are frozen and picklable, so they cross
Ray actors as is. They belong to the worker layer: the controller imports them, never the
other way round.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tokenpool.sampling import SamplingParams
from tokenpool.schedulers.types import Job


@dataclass(frozen=True, slots=True)
class RequestOutput:
    """What one step produced for one request."""

    request_id: str
    new_token_ids: tuple[int, ...]
    new_text: str
    finished: bool
    finish_reason: str | None  # "stop" | "length" | None while running
    logprobs: tuple = ()  # TokenLogprobs per new token when asked for
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    # Prompt tokens whose KV came from the prefix cache when the request was admitted.
    num_cached_tokens: int = 0


@dataclass(frozen=True, slots=True)
class JobInput:
    """Everything a worker needs to run one job; it holds no reference to controller state."""

    job: Job
    # Prompts of the requests this job's Prefill units start: id -> (prompt ids, params).
    prompts: dict[str, tuple[tuple[int, ...], SamplingParams]] = field(default_factory=dict)
    # KV of requests prefilled on another worker (disaggregated roles), for this job's
    # SwapIn units: id -> gpu_pool.kv_handoff.SequenceHandoff.
    handoffs: dict = field(default_factory=dict)
    # Requests the client gave up on: the worker aborts them if it holds them, and reports
    # them finished so the policy forgets them.
    cancelled: tuple[str, ...] = ()
    # A prefill-only worker (disaggregated roles) exports each prefilled request's KV
    # (a SequenceHandoff) instead of keeping it.
    export_after_prefill: bool = False
    # Requests whose worker died mid-stream: id -> the tokens their client already has. The
    # prefill recomputes prompt plus these, and generation continues right after them.
    resumed: dict[str, tuple[int, ...]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class StepOutputs:
    """What one engine step on `worker` produced, streamed while the job runs."""

    worker: int
    outputs: tuple[RequestOutput, ...]
    emitted_at: float  # time.monotonic() on the worker


@dataclass(frozen=True, slots=True)
class SwitchEvent:
    model: str
    seconds: float
    bytes_copied: int
    prefetched: bool


@dataclass(frozen=True, slots=True)
class DecodeTiming:
    """One decode turn as it ran: its steps' wall time (streaming included) and their mean
    batch size and context, for setting against the cost model's prediction."""

    model: str
    steps: int
    seconds: float
    batch: float
    context: float


@dataclass(frozen=True, slots=True)
class JobDone:
    """The end of a job: the policy's results and what the worker did along the way."""

    worker: int
    results: tuple  # schedulers.types.UnitResult, in unit order
    handoffs: dict = field(default_factory=dict)  # id -> SequenceHandoff (export_after_prefill)
    switches: tuple[SwitchEvent, ...] = ()
    kv_swap_bytes: int = 0  # swapped out + in during the job
    kv_pages_used: int = 0  # device KV pages held on the worker after the job
    model: str | None = None  # the model switched in after the job
    # id -> message: requests this job ended with an error (refused by the engine as invalid,
    # or a handoff it could not take). Each is also reported finished in `results`.
    errors: dict = field(default_factory=dict)
    decode_timings: tuple[DecodeTiming, ...] = ()
    cached_pages: dict = field(default_factory=dict)  # model -> prefix-cache pages after the job
