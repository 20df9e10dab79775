"""Multi-turn chat sessions: a workload whose prompts share prefixes, for prefix caching.

Every model has one system prompt that all of its sessions start with. A session's turn
sends the whole conversation so far: turn k's prompt is turn k-1's prompt, its answer, and a
new user message. So a turn's prompt extends the previous turn's (a cache hit on the worker
that prefilled it), and every prompt starts with its model's system prompt (a hit on any
worker that served the model lately).

Token ids are synthesized from the seed; each request carries its prompt's page names
(memory.prefix_cache), which is all that placement and the simulated caches look at. Sessions
start as a Poisson process over `duration_s`; each goes to a model by Zipf popularity; its
turn count is geometric with mean `turns`; turns are `think_s` apart on average
(exponential: the answer's time plus the user's); lengths are exponential with the given
means. Deterministic for a seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from tokenpool.memory.prefix_cache import extend_hashes, page_hashes
from tokenpool.sim.workload import WorkloadRequest, model_names, zipf_weights

VOCAB = 32_000  # token ids are drawn below this; any id a tokenizer could give would do

# One turn before its id: arrival, model, prompt length, output length, page names.
Turn = tuple[float, str, int, int, tuple[int, ...]]


@dataclass(frozen=True, slots=True)
class ChatWorkload:
    kind: Literal["chat"]
    num_models: int
    duration_s: float
    session_rate: float  # new sessions per second over all models
    turns: float = 4.0  # mean turns per session (geometric, at least one)
    system_prompt_tokens: int = 1000  # per model, shared by all of its sessions
    user_tokens: int = 100  # mean tokens of a user message
    output_tokens: int = 200  # mean tokens of an answer
    think_s: float = 30.0  # mean seconds from one turn's arrival to the next's
    max_prompt_tokens: int = 8192  # a session ends before a prompt would grow past this
    zipf_s: float = 1.0  # model popularity ~ rank^-s
    seed: int = 0

    def __post_init__(self):
        if min(self.duration_s, self.session_rate, self.think_s) <= 0 or self.turns < 1:
            raise ValueError("duration_s, session_rate and think_s must be > 0, turns >= 1")
        if min(self.user_tokens, self.output_tokens) < 1 or self.system_prompt_tokens < 0:
            raise ValueError("user_tokens and output_tokens must be >= 1, "
                             "system_prompt_tokens >= 0")
        if self.max_prompt_tokens <= self.system_prompt_tokens:
            raise ValueError("max_prompt_tokens must exceed system_prompt_tokens")
        zipf_weights(self.num_models, self.zipf_s)  # raises on a bad count or exponent

    def resolve(self, base: Path) -> "ChatWorkload":
        return self  # no files

    def requests(self) -> list[WorkloadRequest]:
        return chat_workload(self)


def chat_workload(spec: ChatWorkload) -> list[WorkloadRequest]:
    """Every session's turns, sorted by arrival (a tie: in session order)."""
    rng = np.random.default_rng(spec.seed)
    names = model_names(spec.num_models)
    systems = [_tokens(rng, spec.system_prompt_tokens) for _ in names]
    system_pages = [page_hashes(m, s) for m, s in zip(names, systems)]
    count = int(rng.poisson(spec.session_rate * spec.duration_s))
    starts = np.sort(rng.uniform(0.0, spec.duration_s, size=count))
    picks = rng.choice(spec.num_models, size=count, p=zipf_weights(spec.num_models,
                                                                   spec.zipf_s))
    turns: list[Turn] = []
    for start, k in zip(starts.tolist(), picks.tolist()):
        turns += _session(rng, spec, names[k], systems[k], system_pages[k], start)
    turns.sort(key=lambda turn: turn[0])  # stable: session order within a tie
    return [WorkloadRequest(str(i), model, arrival, prompt, output, pages)
            for i, (arrival, model, prompt, output, pages) in enumerate(turns)]


def _session(rng: np.random.Generator, spec: ChatWorkload, model: str, system: list[int],
             system_pages: tuple[int, ...], start: float) -> list[Turn]:
    """One conversation's turns: each prompt is the last one, its answer and a new message.
    Page names grow with it, so each page is hashed once per session."""
    ids, pages, t, out = list(system), list(system_pages), start, []
    for _ in range(int(rng.geometric(1.0 / spec.turns))):
        ids += _tokens(rng, _length(rng, spec.user_tokens))
        if len(ids) > spec.max_prompt_tokens or t > spec.duration_s:
            break
        extend_hashes(pages, model, ids)
        answer = _length(rng, spec.output_tokens)
        out.append((t, model, len(ids), answer, tuple(pages)))
        ids += _tokens(rng, answer)
        t += float(rng.exponential(spec.think_s))
    return out


def _length(rng: np.random.Generator, mean: int) -> int:
    return max(1, int(rng.exponential(mean)))


def _tokens(rng: np.random.Generator, n: int) -> list[int]:
    return rng.integers(0, VOCAB, size=n).tolist()  # Python ints: the hash takes their bytes
