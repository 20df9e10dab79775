"""Engine throughput: batches of random prompts through our LLMEngine, timed step by step.

For one batch of B prompts, every request is added at t0 and the engine steps until all are
done; each step's end time and the tokens it produced are recorded. From that timeline:

- ttft_s: mean over requests of (time of the step that produced its first token) - t0.
- prefill_tokens_per_s: total prompt tokens / (time the last request got its first token - t0).
- decode_tokens_per_s: the steady all-decode phase. Tokens produced by the steps that end
  after the last request got its first token, divided by the time from that moment to the
  end of the last step. With every prompt prefilled in the first step this is B*(N-1) tokens.
  Requests that started decoding earlier (when the prefills do not fit one step) contribute
  only their tokens from that phase on.

Times include everything `step()` does (scheduling, the forward pass, sampling and
incremental detokenization). Prompts are random token ids, so text never matters.
"""

from __future__ import annotations

import random
import sys
import time
from dataclasses import asdict, dataclass, field

_WARMUP_TOKENS = 4


@dataclass(frozen=True, slots=True)
class BatchResult:
    batch: int
    decode_tokens_per_s: float
    prefill_tokens_per_s: float
    ttft_s: float

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(slots=True)
class Timeline:
    """One timed batch: when it began, each request's first token, and every step."""

    t0: float
    first_token_at: dict[str, float] = field(default_factory=dict)
    steps: list[tuple[float, int]] = field(default_factory=list)  # (end time, tokens made)
    request_ids: list[str] = field(default_factory=list)  # in prompt order
    tokens: dict[str, list[int]] = field(default_factory=dict)  # request id -> new token ids


# -- workload ----------------------------------------------------------------------------------

def parse_batches(text: str) -> tuple[int, ...]:
    """'1,8,32' -> (1, 8, 32)."""
    try:
        sizes = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise ValueError(f"batch sizes must be comma-separated integers, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise ValueError(f"batch sizes must be >= 1, got {text!r}")
    return sizes


def parse_prompt_lens(text: str) -> tuple[int, int]:
    """'64-512' -> (64, 512); '256' -> (256, 256)."""
    parts = text.split("-")
    try:
        low, high = (int(parts[0]), int(parts[-1])) if len(parts) <= 2 else (0, -1)
    except ValueError:
        low, high = 0, -1
    if low < 1 or high < low:
        raise ValueError(
            f"prompt lengths must be N or LOW-HIGH with 1 <= LOW <= HIGH, got {text!r}")
    return low, high


def prompt_lengths(batch: int, low: int, high: int) -> list[int]:
    """B lengths spread evenly over [low, high]; a batch of one gets the midpoint, so every
    batch size has the same mean prompt length."""
    if batch == 1:
        return [(low + high) // 2]
    return [low + round((high - low) * i / (batch - 1)) for i in range(batch)]


def make_prompts(batch: int, low: int, high: int, vocab_size: int, seed: int) -> list[list[int]]:
    """Random token ids, the same for a given (batch, lengths, vocab, seed)."""
    rng = random.Random(seed * 1_000_003 + batch)
    return [[rng.randrange(vocab_size) for _ in range(n)]
            for n in prompt_lengths(batch, low, high)]


# -- our engine -------------------------------------------------------------------------------

def greedy_params(new_tokens: int):
    from tokenpool.sampling import SamplingParams

    return SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)


def run_timed(engine, prompts: list[list[int]], new_tokens: int) -> Timeline:
    params = greedy_params(new_tokens)
    timeline = Timeline(t0=time.perf_counter())
    for prompt in prompts:
        timeline.request_ids.append(engine.add_request(prompt, params))
    while engine.has_unfinished():
        outputs = engine.step()
        now = time.perf_counter()
        if not outputs:
            raise RuntimeError("the engine made no progress (is the KV cache too small?)")
        for out in outputs:
            timeline.first_token_at.setdefault(out.request_id, now)
            timeline.tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
        timeline.steps.append((now, sum(len(out.new_token_ids) for out in outputs)))
    return timeline


def summarize(timeline: Timeline, prompts: list[list[int]]) -> BatchResult:
    firsts = list(timeline.first_token_at.values())
    all_first = max(firsts)
    end = timeline.steps[-1][0]
    decode_tokens = sum(n for t, n in timeline.steps if t > all_first)
    return BatchResult(
        batch=len(prompts),
        decode_tokens_per_s=_rate(decode_tokens, end - all_first),
        prefill_tokens_per_s=_rate(sum(map(len, prompts)), all_first - timeline.t0),
        ttft_s=sum(t - timeline.t0 for t in firsts) / len(firsts),
    )


def check_fits(engine, longest_prompt: int, new_tokens: int) -> None:
    """Fail before timing anything if the longest request cannot fit the model's context."""
    from tokenpool.errors import InvalidRequestError

    if longest_prompt + new_tokens > engine.max_model_len:
        raise InvalidRequestError(
            f"prompts of up to {longest_prompt} tokens plus {new_tokens} new tokens exceed the "
            f"engine's context of {engine.max_model_len} tokens", param="prompt_lens")


def warm_up(engine, prompts: list[list[int]]) -> None:
    """Two short requests through prefill and decode, so first-call costs are not timed."""
    warm = [p[:16] for p in prompts[:2]]
    run_timed(engine, warm, _WARMUP_TOKENS)
    engine.memory.pages.flush()  # no timed prompt may find the warm-up's pages cached


def bench_engine(engine, workloads: dict[int, list[list[int]]], new_tokens: int,
                 tokens: dict[int, list[list[int]]] | None = None) -> list[BatchResult]:
    """workloads: batch size -> its prompts. One timed run per batch size, in order.
    `tokens`, when given, receives batch size -> each prompt's generated token ids."""
    warm_up(engine, max(workloads.values(), key=len))
    results = []
    for batch, prompts in workloads.items():
        print(f"tokenpool: bench ours, batch {batch}", file=sys.stderr, flush=True)
        timeline = run_timed(engine, prompts, new_tokens)
        results.append(summarize(timeline, prompts))
        if tokens is not None:
            tokens[batch] = [timeline.tokens.get(r, []) for r in timeline.request_ids]
    return results


def leading_agreement(a: list[int], b: list[int]) -> int:
    """How many tokens two greedy generations share before they first differ."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _rate(tokens: int, seconds: float) -> float:
    return tokens / seconds if seconds > 0 else 0.0
