"""What policies see and what they decide. Frozen, typed, and free of any runtime.

Time is a float of seconds passed in as `now`; nothing here reads a clock.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class SLO:
    ttft_s: float
    tbt_s: float


@dataclass(frozen=True, slots=True)
class RequestInfo:
    """A request as schedulers know it: never its true output length."""

    request_id: str
    model: str
    prompt_len: int
    arrival: float
    max_tokens: int
    # Names of the prompt's full KV pages (memory.prefix_cache.page_hashes), for cache-aware
    # placement; empty when prefix caching is off.
    page_hashes: tuple[int, ...] = ()


# -- work units: what a worker is told to do, in order ----------------------------------------

@dataclass(frozen=True, slots=True)
class Switch:
    """Load `model`'s weights (a pointer swap if `Prefetch` already brought them).

    `baseline_switch_overhead_s`: seconds the worker then stays held (after a copy), standing
    for the engine re-initialisation that a request-level system pays on every switch and
    tokenpool's component reuse removes. 0 for tokenpool's own policies."""

    worker: int
    model: str
    baseline_switch_overhead_s: float = 0.0


@dataclass(frozen=True, slots=True)
class Prefetch:
    """Copy `model`'s weights into the spare slot in the background."""

    worker: int
    model: str


@dataclass(frozen=True, slots=True)
class Prefill:
    """Compute the prompts' KV and each request's first token.

    `decode_ids`: requests already decoding this model on this worker that the first step
    also gives one token, as a mixed batch (vLLM's scheduler mixes the same way): a decode
    token rides on the prefill's pass over the weights for a fraction of a step's cost."""

    worker: int
    model: str
    request_ids: tuple[str, ...]
    decode_ids: tuple[str, ...] = ()
    # Engine steps the unit may take (0: until every prompt has its first token). A prompt
    # still unfinished then (one longer than a step's token budget) is left where it is, and
    # its model's decode turns compute the rest, chunk by chunk, between other models' turns.
    max_steps: int = 0


@dataclass(frozen=True, slots=True)
class Decode:
    """Decode steps for the batch back to back for `quota_s` seconds (at least one step).

    With `until_first_finish` the turn also ends as soon as a request finishes, so a
    request-level worker can admit new work promptly.
    """

    worker: int
    model: str
    request_ids: tuple[str, ...]
    quota_s: float
    until_first_finish: bool = False


@dataclass(frozen=True, slots=True)
class SwapOut:
    worker: int
    model: str
    request_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class SwapIn:
    worker: int
    model: str
    request_ids: tuple[str, ...]


WorkUnit = Switch | Prefetch | Prefill | Decode | SwapOut | SwapIn


# -- results: what came back -------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class PrefillDone:
    worker: int
    model: str
    request_ids: tuple[str, ...]
    # Requests whose first token was also their last, and decode_ids that ended in the unit.
    finished: tuple[str, ...]
    # The unit's decode_ids that got their tokens, or ended; the others did not run (no pages).
    decoded: tuple[str, ...] = ()
    # Tokens each of `decoded` got: decodes ride every step of a chunked prefill.
    decode_steps: int = 1


@dataclass(frozen=True, slots=True)
class DecodeDone:
    worker: int
    model: str
    request_ids: tuple[str, ...]
    steps: int
    finished: tuple[str, ...]
    # Wall seconds the steps took on a real worker, for the policy to learn how far its cost
    # model is off under the load of the moment; 0 when not measured (the simulator, whose
    # truth is the cost model). A timing, not an outcome: results compare without it.
    seconds: float = field(default=0.0, compare=False)


UnitResult = PrefillDone | DecodeDone


@dataclass(frozen=True, slots=True)
class Job:
    """Units one worker runs back to back; the worker is idle again when they are done."""

    worker: int
    units: tuple[WorkUnit, ...]
