"""`tokenpool bench chat`'s client: closed-loop multi-turn chat sessions over real HTTP.

Every model gets one system prompt of about `system_tokens` tokens (English-like text from
the seed) that all of its sessions start with. Session `s` talks to model `s mod M`; its turn
`t` sends the system prompt, the session's earlier user messages with the answers the server
gave them, and a new user message, through the official `openai` client (chat completions,
streamed, `stream_options.include_usage` and vLLM's `continuous_usage_stats`, greedy), noting
when each token came. A session sends its next turn when the previous answer has ended;
`concurrency` sessions run at once, the rest wait their turn in session order. A turn's TTFT
runs from the call to its first SSE chunk (the server sends none, not even the role chunk,
before the first token). bench/chat_sweep.py starts sessions open loop instead.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import asdict, dataclass, field

# Common words: about 1.1 SmolLM2 tokens each, so text of N tokens is about N / 1.1 words.
WORDS = (
    "the a of to and in for on with by at from about into over under after before ship "
    "harbour river city market garden library station bridge tower road field engineer "
    "teacher farmer doctor pilot sailor writer baker painter driver clerk builds carries "
    "finds keeps moves opens reads sends takes watches writes counts morning evening winter "
    "summer weather water stone paper light music letter quiet bright early late small large "
    "old new green blue careful patient busy every some many each other first last next "
    "second third always never often").split()
TOKENS_PER_WORD = 1.1


@dataclass(frozen=True, slots=True)
class ChatPlan:
    models: tuple[str, ...]
    sessions: int
    turns: int
    system_tokens: int = 1000
    user_tokens: int = 40
    max_tokens: int = 32
    concurrency: int = 4
    seed: int = 0

    def model_of(self, session: int) -> str:
        return self.models[session % len(self.models)]


@dataclass(slots=True)
class TurnRecord:
    session: int
    turn: int
    model: str
    ttft_s: float | None = None
    e2e_s: float | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    sent_at: float = 0.0  # perf_counter seconds when the call was made
    chunks: list[tuple[float, int]] = field(default_factory=list)  # (perf_counter, new tokens)

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in ("sent_at", "chunks")}


def text(rng: random.Random, tokens: int) -> str:
    """Sentences of 8-14 common words, about `tokens` tokens in all."""
    words, sentences = round(tokens / TOKENS_PER_WORD), []
    while words > 0:
        n = min(words, rng.randrange(8, 15))
        sentences.append(" ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + ".")
        words -= n
    return " ".join(sentences)


def system_prompt(plan: ChatPlan, model: str) -> str:
    index = plan.models.index(model)
    return (f"You are assistant number {index} of this service. Here are your notes. "
            + text(random.Random(plan.seed * 7919 + index), plan.system_tokens))


def user_message(plan: ChatPlan, session: int, turn: int) -> str:
    rng = random.Random((plan.seed * 1_000_003 + session) * 1009 + turn)
    return f"Question {turn + 1} of visitor {session}: " + text(rng, plan.user_tokens)


async def run_plan(url: str, plan: ChatPlan, timeout_s: float = 600.0) -> list[TurnRecord]:
    """Every session's turns, closed loop; the records in session, turn order."""
    import openai

    client = openai.AsyncOpenAI(base_url=url.rstrip("/") + "/v1", api_key="unused",
                                max_retries=0, timeout=timeout_s)
    gate = asyncio.Semaphore(plan.concurrency)

    async def session(s: int) -> list[TurnRecord]:
        async with gate:
            return await run_session(client, plan, s)
    try:
        per_session = await asyncio.gather(*(session(s) for s in range(plan.sessions)))
    finally:
        await client.close()
    return [r for records in per_session for r in records]


async def run_session(client, plan: ChatPlan, s: int,
                      records: list[TurnRecord] | None = None) -> list[TurnRecord]:
    """Session `s`'s turns, each appended to `records` (a new list by default) when sent."""
    model = plan.model_of(s)
    messages = [{"role": "system", "content": system_prompt(plan, model)}]
    records = [] if records is None else records
    for t in range(plan.turns):
        messages.append({"role": "user", "content": user_message(plan, s, t)})
        record = TurnRecord(s, t, model)
        records.append(record)
        try:
            answer = await one_turn(client, plan, messages, record)
        except Exception as exc:  # a shed or failed turn ends its session: history is gone
            record.error = f"{type(exc).__name__}: {exc}"[:300]
            break
        messages.append({"role": "assistant", "content": answer})
    return records


async def one_turn(client, plan: ChatPlan, messages: list[dict], record: TurnRecord) -> str:
    """Stream one answer into `record`, with when each token came (continuous usage: every
    chunk says how many tokens so far); returns its text."""
    start = record.sent_at = time.perf_counter()
    stream = await client.chat.completions.create(
        model=record.model, messages=messages, max_tokens=plan.max_tokens, temperature=0.0,
        stream=True, stream_options={"include_usage": True, "continuous_usage_stats": True})
    parts = []
    async for chunk in stream:
        now = time.perf_counter()
        if record.ttft_s is None:
            record.ttft_s = now - start
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            usage = chunk.usage
            if usage.completion_tokens > record.completion_tokens:
                record.chunks.append((now, usage.completion_tokens - record.completion_tokens))
            record.prompt_tokens, record.completion_tokens = (usage.prompt_tokens,
                                                              usage.completion_tokens)
            details = usage.prompt_tokens_details
            record.cached_tokens = (details.cached_tokens or 0) if details else 0
    record.e2e_s = time.perf_counter() - start
    return "".join(parts)


async def warm_up(url: str, models: tuple[str, ...]) -> None:
    """One short request per model (not reported): first switches and first-use costs."""
    import openai

    async with openai.AsyncOpenAI(base_url=url.rstrip("/") + "/v1", api_key="unused",
                                  max_retries=0, timeout=600.0) as client:
        for model in models:
            await client.chat.completions.create(
                model=model, max_tokens=2, temperature=0.0,
                messages=[{"role": "user", "content": "Warm up. Say hello."}])
