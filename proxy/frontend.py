"""What the HTTP and gRPC edges share: model lookup, tokenizing, validation, streaming.

Both edges turn their wire request into `Frontend.request(...)` (which raises the typed
errors of `tokenpool.errors`, mapped onto HTTP and gRPC statuses by each edge) and then
iterate `Frontend.stream(request)`. Leaving that iteration early, for whatever reason (client
disconnect, cancellation, an exception), cancels the request in the controller, which frees
its pages.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections.abc import AsyncIterator
from dataclasses import replace

from tokenpool.controller.catalog import ModelCard
from tokenpool.controller.serving_types import ServeRequest, TokenEvent
from tokenpool.errors import (EmptyPromptError, InvalidRequestError, OverloadedError,
                             PromptTooLongError)
from tokenpool.errors import InvalidSamplingError, UnknownModelError
from tokenpool.models.prompts import encode_chat, encode_text
from tokenpool.proxy.config import ProxyConfig
from tokenpool.proxy.loop_mailbox import LoopMailbox
from tokenpool.sampling import SamplingParams, SamplingRequest

_IDS = itertools.count()


class Frontend:
    def __init__(self, controller, catalog: dict[str, ModelCard], config: ProxyConfig,
                 observer=None):
        """`observer`: gets `on_event(request, event, now)` for every event, and
        `on_rejected(model, reason)` when a request is refused (the Prometheus metrics)."""
        self.controller = controller
        self.catalog = catalog
        self.config = config
        self.observer = observer
        self._prefix = f"{os.getpid():x}"
        self._mailboxes: dict[asyncio.AbstractEventLoop, LoopMailbox] = {}

    def card(self, model: str) -> ModelCard:
        card = self.catalog.get(model)
        if card is None:
            raise UnknownModelError(model, list(self.catalog))
        return card

    # -- building a request --------------------------------------------------------------------

    def request(self, model: str, sampling: SamplingRequest, *, prompt: str | None = None,
                prompt_ids: list[int] | None = None, messages: list[dict] | None = None
                ) -> ServeRequest:
        """A validated request from exactly one of `prompt`, `prompt_ids` or `messages`;
        its model's defaults fill the sampling values it left out."""
        card = self.card(model)
        try:
            ids = self._encode(card, prompt, prompt_ids, messages)
            self._check_prompt(card, ids)
            params = sampling.resolve(card.defaults, card.max_model_len - len(ids))
            self._check_room(card, ids, params)
        except InvalidRequestError as exc:
            self._rejected(model, "invalid")
            raise exc
        request_id = f"req-{self._prefix}-{next(_IDS)}"
        return ServeRequest(request_id, model, tuple(ids), params, card.slo, time.monotonic())

    def _encode(self, card: ModelCard, prompt, prompt_ids, messages) -> list[int]:
        given = [x is not None for x in (prompt, prompt_ids, messages)]
        if sum(given) != 1:
            raise InvalidRequestError("give exactly one of prompt, prompt token ids or messages",
                                      "prompt")
        if prompt is not None:
            self._check_text_size(len(prompt))
            return encode_text(card.tokenizer, prompt) if prompt else []
        if messages is not None:
            if not messages:
                raise InvalidRequestError("messages is empty", "messages")
            self._check_text_size(sum(len(str(m.get("content") or "")) for m in messages))
            return encode_chat(card.tokenizer, messages)
        if any(not isinstance(t, int) or not 0 <= t < card.vocab_size for t in prompt_ids):
            raise InvalidRequestError(f"prompt token ids must be integers in "
                                      f"[0, {card.vocab_size})", "prompt")
        return list(prompt_ids)

    def _check_text_size(self, num_chars: int) -> None:
        if num_chars > self.config.max_prompt_chars:
            raise InvalidRequestError(f"prompt has {num_chars} characters, more than the "
                                      f"limit of {self.config.max_prompt_chars}", "prompt")

    @staticmethod
    def _check_prompt(card: ModelCard, ids: list[int]) -> None:
        if not ids:
            raise EmptyPromptError()
        if len(ids) >= card.max_model_len:
            raise PromptTooLongError(len(ids), card.max_model_len - 1)

    @staticmethod
    def _check_room(card: ModelCard, ids: list[int], params: SamplingParams) -> None:
        if len(ids) + params.max_tokens > card.max_model_len:
            raise InvalidSamplingError(
                f"max_tokens={params.max_tokens} plus the prompt's {len(ids)} tokens exceeds "
                f"the model's context of {card.max_model_len}", "max_tokens")

    def _rejected(self, model: str, reason: str) -> None:
        if self.observer is not None:
            self.observer.on_rejected(model, reason)

    # -- streaming -----------------------------------------------------------------------------

    async def stream(self, req: ServeRequest) -> AsyncIterator[TokenEvent]:
        """Submit `req` and yield its events until the finished one (events that queued
        while the caller was busy are merged into one).

        Raises OverloadedError / UnavailableError before the first event if the controller
        refuses it (admission answers with the request's first event, a "rejected" one). A
        request that runs past `request_timeout_s` ends with a "timeout" event.
        """
        mailbox = self._mailbox()
        events: asyncio.Queue[TokenEvent] = asyncio.Queue()
        try:
            self.controller.submit(req, lambda ev: mailbox.post(events, ev))
        except Exception as exc:
            self._rejected(req.model, type(exc).__name__)
            raise
        deadline = req.arrival + self.config.request_timeout_s
        finished, billed_cached = False, None
        try:
            while not finished:
                event = await self._next(events, deadline, req)
                if event.finish_reason == "rejected":
                    finished = True
                    self._rejected(req.model, "OverloadedError")
                    raise OverloadedError(event.error, event.retry_after_s)
                # Events that queued up while the edge was busy go out as one, as vLLM's
                # output collector merges them: one chunk to build, log and write, not n.
                while not event.finished and not events.empty():
                    event = event.followed_by(events.get_nowait())
                finished = event.finished
                if billed_cached is None and event.token_ids:
                    billed_cached = event.num_cached_tokens
                event = _with_cached_tokens(event, billed_cached)
                if self.observer is not None:
                    self.observer.on_event(req, event, time.monotonic())
                yield event
        finally:
            if not finished:
                self.controller.cancel(req.request_id)
                if self.observer is not None:  # it ended here: observers must not hold it
                    self.observer.on_event(req, TokenEvent(req.request_id, finished=True,
                                                           finish_reason="cancelled"),
                                           time.monotonic())

    def _mailbox(self) -> LoopMailbox:
        loop = asyncio.get_running_loop()
        box = self._mailboxes.get(loop)
        if box is None:
            self._mailboxes = {l: b for l, b in self._mailboxes.items() if not l.is_closed()}
            box = self._mailboxes[loop] = LoopMailbox(loop)
        return box

    async def _next(self, events: asyncio.Queue, deadline: float, req: ServeRequest
                    ) -> TokenEvent:
        if not events.empty() and time.monotonic() < deadline:  # most tokens: no timer, no task
            return events.get_nowait()
        try:
            return await asyncio.wait_for(events.get(), max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            self.controller.cancel(req.request_id)
            return TokenEvent(req.request_id, finished=True, finish_reason="timeout",
                              error=f"request timed out after {self.config.request_timeout_s} s")


def _with_cached_tokens(event: TokenEvent, billed: int | None) -> TokenEvent:
    """`event` saying the request's billed cached tokens: those of its first token event. A
    preemption or a retry on another worker admits it again, and the engine then reports
    that admission's hits, which the client is not billed for."""
    if billed is None or event.num_cached_tokens == billed:
        return event
    return replace(event, num_cached_tokens=billed)
