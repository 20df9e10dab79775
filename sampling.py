"""Sampling parameters of one request, validated at construction, and the defaults that fill
what a request leaves out: the request's own value, else its model's, else OpenAI's."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from tokenpool.errors import InvalidSamplingError

MAX_LOGPROBS = 20
# Temperatures below this decode greedily, as vLLM's do. Their limit is the argmax anyway, and
# below ~1e-37 dividing float32 logits by them overflows to inf (or divides by a float32 0),
# which would sample a junk token.
GREEDY_BELOW = 1e-5


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """What to generate. temperature 0 (or below GREEDY_BELOW) means greedy; top_k == -1 (or
    0) disables top-k."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # top-N logprobs per generated token, None = off
    skip_special_tokens: bool = True

    def __post_init__(self):
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        _check(isinstance(self.max_tokens, int) and self.max_tokens >= 1,
               "max_tokens", f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        _check(self.temperature >= 0, "temperature",
               f"temperature must be >= 0, got {self.temperature!r}")
        _check(0 < self.top_p <= 1, "top_p", f"top_p must be in (0, 1], got {self.top_p!r}")
        _check(isinstance(self.top_k, int) and self.top_k >= -1, "top_k",
               f"top_k must be -1 (off) or a positive integer, got {self.top_k!r}")
        _check(all(isinstance(s, str) and s for s in self.stop), "stop",
               "stop strings must be non-empty strings")
        _check(self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS, "logprobs",
               f"logprobs must be between 0 and {MAX_LOGPROBS}, got {self.logprobs!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


def _check(ok: bool, param: str, message: str) -> None:
    if not ok:
        raise InvalidSamplingError(message, param=param)


_DEFAULTABLE = ("temperature", "top_p", "top_k", "max_tokens")


@dataclass(frozen=True, slots=True)
class SamplingDefaults:
    """Values for what a request leaves out, range-checked as a request's values are.

    A model's come from its fleet entry's `defaults:` over its checkpoint's generation config
    (models.generation_defaults); a request's explicit values are one of these too. None: no
    value here, the next source decides (in the end SamplingParams' own, OpenAI's defaults).
    """

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    max_tokens: int | None = None

    def __post_init__(self):
        if self.temperature is not None and not math.isfinite(self.temperature):
            raise InvalidSamplingError(f"temperature must be a finite number, got "
                                       f"{self.temperature!r}", param="temperature")
        SamplingParams(**self.given())  # the same checks and messages as a request's

    def given(self) -> dict:
        return {name: getattr(self, name) for name in _DEFAULTABLE
                if getattr(self, name) is not None}

    def over(self, fallback: "SamplingDefaults") -> "SamplingDefaults":
        """These values, with `fallback`'s where these have none."""
        return SamplingDefaults(**{**fallback.given(), **self.given()})


@dataclass(frozen=True, slots=True)
class SamplingRequest:
    """A request's sampling as it asked for it, before its model's defaults fill the gaps.

    `asked` holds only what the request set. `max_tokens_fallback` is the edge's own default
    for max_tokens when neither the request nor the model sets one: OpenAI's 16 for
    completions, None for the rest of the context (chat, as vLLM does). `options` are the
    parameters no model has a default for (seed, stop, logprobs, ...).
    """

    asked: SamplingDefaults = SamplingDefaults()
    max_tokens_fallback: int | None = 16
    options: dict = field(default_factory=dict)

    def __post_init__(self):
        # Bad options fail here, before the prompt is tokenized (`asked` checked itself).
        SamplingParams(**self.options)

    def resolve(self, defaults: SamplingDefaults, room: int) -> SamplingParams:
        """The request's own values, else the model's `defaults`, else OpenAI's. `room`: the
        tokens the context has left after the prompt."""
        chosen = {**defaults.given(), **self.asked.given()}
        if self.asked.max_tokens is None:
            # A length the client did not ask for must not get its request refused: a model
            # default or fallback is capped at the room left, as vLLM caps it. (No room at
            # all is a prompt too long, which the caller refuses.)
            wanted = chosen.get("max_tokens") or self.max_tokens_fallback or room
            chosen["max_tokens"] = max(1, min(wanted, room))
        return SamplingParams(**chosen, **self.options)
