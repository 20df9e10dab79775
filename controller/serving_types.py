"""Messages between the proxy, the serving controller and the worker pool.

The proxy builds a `ServeRequest` (validated, tokenized) and receives `TokenEvent`s for it.
Workers produce `StepOutputs` (one per engine step, every request of that step together) and,
when a job ends, a `JobDone`. All are frozen and picklable, so they cross Ray actors as is.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tokenpool.gpu_pool.engine_config import RequestOutput
from tokenpool.sampling import SamplingParams
from tokenpool.schedulers.types import SLO, Job


@dataclass(frozen=True, slots=True)
class ServeRequest:
    request_id: str
    model: str
    prompt_ids: tuple[int, ...]
    params: SamplingParams
    slo: SLO
    arrival: float  # time.monotonic() when the proxy accepted it


@dataclass(frozen=True, slots=True)
class TokenEvent:
    """New tokens of one request, or its end. Exactly one event per request has `finished`."""

    request_id: str
    token_ids: tuple[int, ...] = ()
    text: str = ""
    finished: bool = False
    # "stop" | "length" from the engine; "cancelled" after a cancel; "error" with `error` set.
    finish_reason: str | None = None
    logprobs: tuple = ()
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    error: str | None = None
    emitted_at: float = 0.0  # time.monotonic() when the worker produced the tokens

    @classmethod
    def of(cls, out: RequestOutput, emitted_at: float) -> "TokenEvent":
        return cls(out.request_id, out.new_token_ids, out.new_text, out.finished,
                   out.finish_reason, out.logprobs, out.num_prompt_tokens,
                   out.num_output_tokens, None, emitted_at)

    def followed_by(self, later: "TokenEvent") -> "TokenEvent":
        """This event and the next of the same request as one: what a client reading late
        gets in one chunk. `emitted_at` stays the earlier, the oldest token's."""
        return TokenEvent(self.request_id, self.token_ids + later.token_ids,
                          self.text + later.text, later.finished, later.finish_reason,
                          self.logprobs + later.logprobs,
                          later.num_prompt_tokens or self.num_prompt_tokens,
                          later.num_output_tokens, later.error, self.emitted_at)


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
