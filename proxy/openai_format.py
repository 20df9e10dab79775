"""Builds each endpoint's OpenAI objects (whole responses and stream chunks) from events.

One formatter per request. `chunk(event)` returns the stream chunk for one TokenEvent (or
None when it carries nothing to send: text held back at a stop-string prefix or inside a
multi-byte character); `response(outcome)` the whole non-streamed answer. Both endpoints'
streams share `http_stream.sse_chunks`.
"""

from __future__ import annotations

import time
from functools import lru_cache

from tokenpool.controller.serving_types import TokenEvent
from tokenpool.proxy.openai_protocol import (AssistantMessage, ChatChoice, ChatChunkChoice,
                                             ChatCompletionChunk, ChatCompletionResponse,
                                             ChatLogprobs, CompletionChoice,
                                             CompletionLogprobs, CompletionResponse, Delta,
                                             TokenLogprob, TopLogprob, UsageInfo)


class TokenStrings:
    """Token ids as the strings logprobs report (each token decoded on its own)."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self.text = lru_cache(maxsize=65536)(self._decode)

    def _decode(self, token_id: int) -> str:
        return self._tokenizer.decode([token_id], skip_special_tokens=False)

    def utf8(self, token_id: int) -> list[int] | None:
        text = self.text(token_id)
        # A token holding part of a multi-byte character decodes to U+FFFD; its own bytes
        # are not recoverable from the text, and OpenAI allows null here.
        return None if "\ufffd" in text else list(text.encode())


class _Format:
    def __init__(self, response_id: str, model: str, tokens: TokenStrings,
                 want_logprobs: bool, include_usage: bool, expose_timing: bool):
        self.id = response_id
        self.model = model
        self.created = int(time.time())
        self.tokens = tokens
        self.want_logprobs = want_logprobs
        self._exclude = {"usage"} if not include_usage else set()
        if not expose_timing:
            self._exclude.add("tokenpool_emitted_at")
        self._timing = expose_timing

    def dump(self, chunk, usage: bool = False) -> str:
        """A chunk's JSON. `usage` only on the final usage chunk (and null on the others
        when the client asked for usage, as OpenAI sends it)."""
        return chunk.model_dump_json(exclude=self._exclude - {"usage"} if usage
                                     else self._exclude)

    def opening(self) -> list:
        return []

    def whole(self, outcome) -> dict:
        """The non-streamed answer, as JSON-ready data."""
        return self.response(outcome).model_dump(exclude={"tokenpool_emitted_at"})

    def _emitted_at(self, event: TokenEvent) -> float | None:
        return event.emitted_at if self._timing else None

    @staticmethod
    def usage_of(outcome) -> UsageInfo:
        return UsageInfo.of(outcome.prompt_tokens, outcome.completion_tokens,
                            outcome.cached_tokens)


class CompletionFormat(_Format):
    """`/v1/completions`: `text_completion` objects, whole and chunked."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._offset = 0  # text_offset of the next token, across chunks

    def _logprobs(self, logprobs) -> CompletionLogprobs | None:
        if not self.want_logprobs:
            return None
        out = CompletionLogprobs()
        for lp in logprobs:
            text = self.tokens.text(lp.token_id)
            out.tokens.append(text)
            out.token_logprobs.append(lp.logprob)
            out.top_logprobs.append({self.tokens.text(t): v for t, v in lp.top})
            out.text_offset.append(self._offset)
            self._offset += len(text)
        return out

    def _object(self, choice: CompletionChoice, usage=None, emitted_at=None):
        return CompletionResponse(id=self.id, created=self.created, model=self.model,
                                  choices=[choice] if choice else [], usage=usage,
                                  tokenpool_emitted_at=emitted_at)

    def chunk(self, event: TokenEvent) -> CompletionResponse | None:
        if not (event.text or event.finished or (self.want_logprobs and event.logprobs)):
            return None
        choice = CompletionChoice(text=event.text, logprobs=self._logprobs(event.logprobs),
                                  finish_reason=event.finish_reason if event.finished else None)
        return self._object(choice, emitted_at=self._emitted_at(event))

    def usage_chunk(self, outcome) -> CompletionResponse:
        return self._object(None, usage=self.usage_of(outcome))

    def response(self, outcome) -> CompletionResponse:
        choice = CompletionChoice(text="".join(outcome.text),
                                  logprobs=self._logprobs(outcome.logprobs),
                                  finish_reason=outcome.finish_reason)
        return self._object(choice, usage=self.usage_of(outcome))


class ChatFormat(_Format):
    """`/v1/chat/completions`: `chat.completion` and `chat.completion.chunk` objects."""

    def _logprobs(self, logprobs) -> ChatLogprobs | None:
        if not self.want_logprobs:
            return None
        text, utf8 = self.tokens.text, self.tokens.utf8
        return ChatLogprobs(content=[
            TokenLogprob(token=text(lp.token_id), logprob=lp.logprob, bytes=utf8(lp.token_id),
                         top_logprobs=[TopLogprob(token=text(t), logprob=v, bytes=utf8(t))
                                       for t, v in lp.top])
            for lp in logprobs])

    def _chunk(self, choices: list, usage=None, emitted_at=None) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=self.id, created=self.created, model=self.model,
                                   choices=choices, usage=usage, tokenpool_emitted_at=emitted_at)

    def opening(self) -> list:
        # OpenAI's first chunk names the role and has empty content.
        return [self._chunk([ChatChunkChoice(delta=Delta(role="assistant", content=""))])]

    def chunk(self, event: TokenEvent) -> ChatCompletionChunk | None:
        if not (event.text or event.finished or (self.want_logprobs and event.logprobs)):
            return None
        choice = ChatChunkChoice(delta=Delta(content=event.text or None),
                                 logprobs=self._logprobs(event.logprobs),
                                 finish_reason=event.finish_reason if event.finished else None)
        return self._chunk([choice], emitted_at=self._emitted_at(event))

    def usage_chunk(self, outcome) -> ChatCompletionChunk:
        return self._chunk([], usage=self.usage_of(outcome))

    def response(self, outcome) -> ChatCompletionResponse:
        choice = ChatChoice(message=AssistantMessage(content="".join(outcome.text)),
                            logprobs=self._logprobs(outcome.logprobs),
                            finish_reason=outcome.finish_reason)
        return ChatCompletionResponse(id=self.id, created=self.created, model=self.model,
                                      choices=[choice], usage=self.usage_of(outcome))
