"""The OpenAI-compatible HTTP edge (DESIGN §6): FastAPI routes over `Frontend`.

Bodies are read by `EdgeGuard` (API key, then the size limit, before any parsing, chunked
bodies included) and parsed here, not by FastAPI: every bad body (not UTF-8, not JSON,
wrong fields) then gets OpenAI's 400 with a message that says which. Value ranges are
checked by `SamplingParams` and `Frontend`, shared with the gRPC edge.

A request's first event is awaited before the response starts, so a request shed by
admission (429 + Retry-After) or refused (503) gets its own status even when streamed.
"""

from __future__ import annotations

import hmac
import json
import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError
from pydantic.json_schema import models_json_schema
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Receive, Scope, Send

from tokenpool import __version__
from tokenpool.errors import InvalidRequestError, TokenpoolError
from tokenpool.proxy.config import ProxyConfig
from tokenpool.proxy.frontend import Frontend
from tokenpool.proxy.http_errors import HTTPError, http_error, install_handlers
from tokenpool.proxy.http_stream import (ClientGone, EventStreamResponse, collect,
                                         first_event, sse_chunks)
from tokenpool.proxy.metrics import ServingMetrics
from tokenpool.proxy.openai_format import ChatFormat, CompletionFormat, TokenStrings
from tokenpool.proxy.openai_protocol import (ChatCompletionRequest, CompletionRequest,
                                             ModelList, ModelObject)

log = logging.getLogger("tokenpool.proxy.http")

# Nginx's code for "client closed the request": logged, never seen by the gone client.
CLIENT_CLOSED = 499


class EdgeGuard:
    """ASGI middleware: the API key on /v1/*, then the body size limit, before parsing.

    The body is read here, at most `max_body_bytes` of it (a chunked body is counted as it
    arrives), and handed on to the app in one piece.
    """

    def __init__(self, app: ASGIApp, api_key: str | None, max_body_bytes: int):
        self.app = app
        self.expected = f"Bearer {api_key}".encode() if api_key else None
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.expected is not None and scope["path"].startswith("/v1/") and \
                not hmac.compare_digest(headers.get(b"authorization", b""), self.expected):
            error = HTTPError(401, "missing or invalid API key: send 'Authorization: Bearer "
                              "KEY'", "invalid_request_error", None, "invalid_api_key")
            return await error.response()(scope, receive, send)
        try:
            body = await self._read_body(headers, receive)
        except ClientGone:
            return  # gone while sending its body: nobody to answer
        if body is None:
            error = HTTPError(413, f"request body exceeds {self.max_body_bytes} bytes",
                              "invalid_request_error", None, "body_too_large")
            return await error.response()(scope, receive, send)
        await self.app(scope, _replay(body, receive), send)

    async def _read_body(self, headers: dict, receive: Receive) -> bytes | None:
        """The whole body, or None once it is over the limit."""
        declared = headers.get(b"content-length", b"0")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            return None
        parts, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientGone()
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return None
            parts.append(chunk)
            if not message.get("more_body", False):
                return b"".join(parts)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive channel that yields the body read already, then the real channel (which
    only has the disconnect left to say)."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replay():
        return pending.pop() if pending else await receive()

    return replay


def parse_body(raw: bytes, model: type[BaseModel]) -> BaseModel:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequestError(f"request body is not valid UTF-8 (byte {exc.start})") from exc
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:
        # Not only JSONDecodeError: an integer of more than 4,300 digits is a plain
        # ValueError, and arrays nested too deep a RecursionError; both are the client's.
        raise InvalidRequestError(f"request body is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise InvalidRequestError("request body must be a JSON object")
    return model.model_validate(data)  # ValidationError -> 400 naming the field


class _Routes:
    """The generation endpoints, over one Frontend."""

    def __init__(self, frontend: Frontend, metrics: ServingMetrics, expose_timing: bool):
        self.frontend = frontend
        self.metrics = metrics
        self.expose_timing = expose_timing
        self._tokens: dict[str, TokenStrings] = {}

    def _prepare(self, body):
        """The body's validated ServeRequest (run in a thread: it tokenizes)."""
        self.frontend.card(body.model)  # unknown model: 404, before anything else
        try:
            body.refuse_unsupported()
            sampling = body.sampling()
            prompt = body.prompt_kwargs()
        except InvalidRequestError:
            self.metrics.on_rejected(body.model, "invalid")
            raise
        req = self.frontend.request(body.model, sampling, **prompt)  # counts its own refusals
        log.debug("accepted %s for %s: %d prompt tokens", req.request_id, body.model,
                  len(req.prompt_ids))
        return req

    def _format(self, cls, prefix: str, req, body):
        tokens = self._tokens.get(req.model)
        if tokens is None:
            tokens = TokenStrings(self.frontend.card(req.model).tokenizer)
            self._tokens[req.model] = tokens
        return cls(f"{prefix}-{req.request_id}", req.model, tokens,
                   body.num_logprobs is not None, body.include_usage, self.expose_timing)

    async def completions(self, request: Request):
        body = parse_body(await request.body(), CompletionRequest)
        req = await run_in_threadpool(self._prepare, body)
        return await self._answer(request, req, body, self._format(CompletionFormat, "cmpl",
                                                                   req, body))

    async def chat(self, request: Request):
        body = parse_body(await request.body(), ChatCompletionRequest)
        req = await run_in_threadpool(self._prepare, body)
        return await self._answer(request, req, body, self._format(ChatFormat, "chatcmpl",
                                                                   req, body))

    async def _answer(self, request: Request, req, body, fmt):
        events = self.frontend.stream(req)
        try:
            first = await first_event(request.receive, events)
            if body.stream:
                chunks = sse_chunks(fmt, first, events, len(req.prompt_ids),
                                    body.include_usage, body.continuous_usage)
                return EventStreamResponse(chunks)
            outcome = await collect(request.receive, first, events, len(req.prompt_ids))
        except ClientGone:
            log.info("client left before %s finished; cancelled", req.request_id)
            return Response(status_code=CLIENT_CLOSED)
        return JSONResponse(fmt.whole(outcome))


def create_app(frontend: Frontend, controller, config: ProxyConfig,
               metrics: ServingMetrics, *, expose_timing: bool = False) -> FastAPI:
    """The HTTP app. `metrics` becomes the frontend's observer if it has none.

    `expose_timing` (off by default; the proxy benchmark turns it on) adds
    `tokenpool_emitted_at`, the worker's time.monotonic() of each chunk's tokens, to
    stream chunks.
    """
    if frontend.observer is None:
        frontend.observer = metrics
    app = FastAPI(title="tokenpool", version=__version__,
                  description="OpenAI-compatible serving of a pooled fleet of models")
    app.add_middleware(EdgeGuard, api_key=config.api_key,
                       max_body_bytes=config.max_body_bytes)
    install_handlers(app)

    @app.exception_handler(TokenpoolError)
    async def _typed(request: Request, exc: TokenpoolError):
        return http_error(exc).response()

    @app.exception_handler(ValidationError)
    async def _invalid(request: Request, exc: ValidationError):
        return http_error(exc).response()

    routes = _Routes(frontend, metrics, expose_timing)
    app.post("/v1/completions")(routes.completions)
    app.post("/v1/chat/completions")(routes.chat)
    _add_info_routes(app, frontend, controller, metrics)
    _document_bodies(app)
    return app


_BODIES = {"/v1/completions": CompletionRequest, "/v1/chat/completions": ChatCompletionRequest}


def _document_bodies(app: FastAPI) -> None:
    """Put the request bodies into /openapi.json. The routes parse their bodies themselves
    (see `parse_body`), so FastAPI cannot see them; without this the schema would say the
    POSTs take nothing, and clients and fuzzers built from it would send nothing."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = build()  # caches itself in app.openapi_schema
            _, defs = models_json_schema([(m, "validation") for m in _BODIES.values()],
                                         ref_template="#/components/schemas/{model}")
            schema.setdefault("components", {}).setdefault("schemas", {}).update(
                defs["$defs"])
            for path, model in _BODIES.items():
                schema["paths"][path]["post"]["requestBody"] = {"required": True, "content": {
                    "application/json": {"schema": {
                        "$ref": f"#/components/schemas/{model.__name__}"}}}}
        return app.openapi_schema

    app.openapi = openapi


def _add_info_routes(app: FastAPI, frontend: Frontend, controller,
                     metrics: ServingMetrics) -> None:
    @app.get("/health")
    def health():
        alive = [w for w in controller.snapshot().workers if w.state not in ("dead", "starting")]
        if not alive:
            return HTTPError(503, "no live worker", "server_error", None,
                             "unavailable").response()
        return {"status": "ok", "workers": len(alive)}

    @app.get("/version")
    def version():
        return {"version": __version__}

    @app.get("/v1/models")
    def models():
        return ModelList(data=[ModelObject(id=c.id, created=c.created,
                                           max_model_len=c.max_model_len)
                               for c in frontend.catalog.values()]).model_dump()

    @app.get("/pool")
    def pool():
        return controller.snapshot().as_json()

    @app.get("/metrics")
    def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)
