"""From a request's TokenEvents to OpenAI responses: whole, or as SSE chunks.

Disconnects: while a request runs, a watcher waits on the ASGI `receive` channel for
`http.disconnect`. When the client goes first, the work is cancelled, and the cancellation
unwinds `Frontend.stream`, whose `finally` cancels the request in the controller (which
frees its KV pages). Streams close their event generator explicitly (`aclose`), so that
happens at once, not when the garbage collector gets to it.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from tokenpool.controller.serving_types import TokenEvent
from tokenpool.proxy.http_errors import HTTPError, failed_request, http_error

log = logging.getLogger("tokenpool.proxy.http")

DONE = b"data: [DONE]\n\n"


class ClientGone(Exception):
    """The client closed the connection before its answer was ready."""


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def until_disconnected(receive: Receive, awaitable: Awaitable):
    """Await `awaitable` unless the client disconnects first (then cancel it and raise
    ClientGone)."""
    work = asyncio.ensure_future(awaitable)
    watch = asyncio.ensure_future(_disconnected(receive))
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not work.done():
            work.cancel()
            await asyncio.gather(work, return_exceptions=True)  # its `finally`s run now
    if work.cancelled():
        raise ClientGone()
    return work.result()


@dataclass(slots=True)
class Outcome:
    """What a request's events added up to."""

    prompt_tokens: int
    text: list[str] = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens the prefix cache served, as of the first token
    finish_reason: str | None = None
    error: HTTPError | None = None
    _counted: int = 0

    def add(self, event: TokenEvent) -> None:
        self.text.append(event.text)
        self.logprobs.extend(lp for lp in event.logprobs if lp is not None)
        if not self._counted and event.token_ids:
            self.cached_tokens = event.num_cached_tokens
        self._counted += len(event.token_ids)
        self.completion_tokens = max(self._counted, event.num_output_tokens)
        if not event.finished:
            return
        self.finish_reason = event.finish_reason
        if event.finish_reason not in ("stop", "length"):
            # "cancelled" reaches a live client only when the server itself gave up.
            self.error = failed_request(event.finish_reason,
                                        event.error or f"request {event.finish_reason}")


async def first_event(receive: Receive, events: AsyncIterator[TokenEvent]) -> TokenEvent:
    """The request's first event, before any header goes out: admission errors (429, 503)
    and a request refused by its worker still get their own HTTP status."""
    try:
        first = await until_disconnected(receive, anext(events))
    except BaseException:
        await events.aclose()
        raise
    if first.finished and first.finish_reason not in ("stop", "length"):
        probe = Outcome(0)
        probe.add(first)
        raise probe.error
    return first


async def collect(receive: Receive, first: TokenEvent, events: AsyncIterator[TokenEvent],
                  prompt_tokens: int) -> Outcome:
    """Every event of a non-streamed request; raises its error, or ClientGone."""
    outcome = Outcome(prompt_tokens)

    async def drain() -> None:
        event = first
        outcome.add(event)
        while not event.finished:
            event = await anext(events)
            outcome.add(event)

    try:
        await until_disconnected(receive, drain())
    finally:
        await events.aclose()
    if outcome.error is not None:
        raise outcome.error
    return outcome


def sse(payload: str) -> bytes:
    return b"data: " + payload.encode() + b"\n\n"


async def sse_chunks(fmt, first: TokenEvent, events: AsyncIterator[TokenEvent],
                     prompt_tokens: int, include_usage: bool,
                     continuous_usage: bool = False) -> AsyncIterator[bytes]:
    """The SSE body of a streamed request. `fmt` makes the endpoint's chunk objects.

    An error after the 200 went out cannot change the status: it becomes an error chunk,
    then `[DONE]`, as vLLM and OpenAI do.
    """
    outcome = Outcome(prompt_tokens)
    try:
        for chunk in fmt.opening():
            yield sse(fmt.dump(chunk))
        event = first
        while True:
            outcome.add(event)
            if outcome.error is not None:
                yield sse(json.dumps(outcome.error.body()))
                break
            chunk = fmt.chunk(event)
            if chunk is not None:
                if continuous_usage:
                    chunk.usage = fmt.usage_of(outcome)
                yield sse(fmt.dump(chunk, usage=continuous_usage))
            if event.finished:
                if include_usage:
                    yield sse(fmt.dump(fmt.usage_chunk(outcome), usage=True))
                break
            event = await anext(events)
    except Exception as exc:  # a failure mid-stream: tell the client, then end cleanly
        yield sse(json.dumps(http_error(exc).body()))
    finally:
        await events.aclose()
    yield DONE


class EventStreamResponse(Response):
    """`text/event-stream` over an async generator of SSE chunks, stopped (and the
    generator closed) as soon as the client disconnects."""

    media_type = "text/event-stream"

    def __init__(self, chunks):
        # Not Response.__init__: it would declare the (empty) body's Content-Length.
        self.chunks = chunks
        self.status_code = 200
        self.background = None
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code,
                    "headers": self.raw_headers})
        writer = asyncio.ensure_future(self._write(send))
        watch = asyncio.ensure_future(_disconnected(receive))
        try:
            await asyncio.wait({writer, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (writer, watch):
                task.cancel()
            await asyncio.gather(writer, watch, return_exceptions=True)
            await self.chunks.aclose()  # its `finally` cancels the request if it still runs
        if writer.done() and not writer.cancelled() and writer.exception() is not None:
            log.debug("stream ended early: %r", writer.exception())

    async def _write(self, send: Send) -> None:
        async for chunk in self.chunks:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
