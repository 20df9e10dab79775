"""Messages between the proxy and the serving controller.

The proxy builds a `ServeRequest` (validated, tokenized) and receives `TokenEvent`s for it.
What the controller and the workers exchange lives with the workers, in gpu_pool/protocol.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenpool.gpu_pool.protocol import RequestOutput
from tokenpool.sampling import SamplingParams
from tokenpool.schedulers.types import SLO


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
    # "stop" | "length" from the engine; "cancelled" after a cancel; "error" with `error` set;
    # "rejected" when admission shed the request (its first and only event).
    finish_reason: str | None = None
    logprobs: tuple = ()
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    error: str | None = None
    emitted_at: float = 0.0  # time.monotonic() when the worker produced the tokens
    retry_after_s: float = 0.0  # with "rejected": when trying again may succeed
    # Prompt tokens served from the prefix cache when the request was admitted (what the
    # client is billed as cached: the edge keeps the first value a token event carried).
    num_cached_tokens: int = 0

    @classmethod
    def of(cls, out: RequestOutput, emitted_at: float) -> "TokenEvent":
        return cls(out.request_id, out.new_token_ids, out.new_text, out.finished,
                   out.finish_reason, out.logprobs, out.num_prompt_tokens,
                   out.num_output_tokens, None, emitted_at,
                   num_cached_tokens=out.num_cached_tokens)

    @classmethod
    def rejected(cls, request_id: str, reason: str, retry_after_s: float) -> "TokenEvent":
        return cls(request_id, finished=True, finish_reason="rejected", error=reason,
                   retry_after_s=retry_after_s)

    def followed_by(self, later: "TokenEvent") -> "TokenEvent":
        """This event and the next of the same request as one: what a client reading late
        gets in one chunk. `emitted_at` stays the earlier, the oldest token's."""
        return TokenEvent(self.request_id, self.token_ids + later.token_ids,
                          self.text + later.text, later.finished, later.finish_reason,
                          self.logprobs + later.logprobs,
                          later.num_prompt_tokens or self.num_prompt_tokens,
                          later.num_output_tokens, later.error, self.emitted_at,
                          num_cached_tokens=self._cached_tokens_before(later))

    def _cached_tokens_before(self, later: "TokenEvent") -> int:
        # The first event with tokens carries the admission's count; a later one may come
        # from a re-admission (preemption, a retry elsewhere) with another.
        return self.num_cached_tokens if self.token_ids else later.num_cached_tokens
