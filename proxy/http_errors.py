"""OpenAI-style error bodies for the HTTP edge, and the typed errors' HTTP statuses.

Every error the edge answers with has the body `{"error": {"message", "type", "param",
"code"}}` (DESIGN §6), whether it comes from tokenpool's typed errors, from FastAPI's request
validation (its default 422 becomes OpenAI's 400), from Starlette's routing (404 / 405), or
from the edge guard (401 / 413). A stream that already sent its 200 carries the same body
in an SSE chunk instead.
"""

from __future__ import annotations

import logging
import math
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from tokenpool.errors import (InvalidRequestError, OverloadedError, PromptTooLongError,
                              RequestFailedError, UnavailableError, UnknownModelError)

log = logging.getLogger("tokenpool.proxy.http")

INVALID = "invalid_request_error"
SERVER = "server_error"


class HTTPError(Exception):
    """An error answer: its status, body fields and extra headers."""

    def __init__(self, status: int, message: str, type: str = INVALID,
                 param: str | None = None, code: str | None = None,
                 retry_after_s: float | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.retry_after_s = retry_after_s

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {}
        if self.retry_after_s is not None:
            # Retry-After takes whole seconds; never 0, or clients would hammer at once.
            headers["Retry-After"] = str(max(1, math.ceil(self.retry_after_s)))
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def http_error(exc: BaseException) -> HTTPError:
    """The HTTP answer for any exception a request may raise."""
    if isinstance(exc, HTTPError):
        return exc
    if isinstance(exc, UnknownModelError):
        return HTTPError(404, str(exc), INVALID, "model", "model_not_found")
    if isinstance(exc, PromptTooLongError):
        return HTTPError(400, str(exc), INVALID, exc.param, "context_length_exceeded")
    if isinstance(exc, InvalidRequestError):
        return HTTPError(400, str(exc), INVALID, exc.param, "invalid_value")
    if isinstance(exc, ValidationError):
        return from_validation(exc.errors())
    if isinstance(exc, OverloadedError):
        return HTTPError(429, str(exc), "rate_limit_error", None, "overloaded",
                         retry_after_s=exc.retry_after_s)
    if isinstance(exc, UnavailableError):
        return HTTPError(503, str(exc), SERVER, None, "unavailable")
    if isinstance(exc, RequestFailedError):
        return HTTPError(500, str(exc), SERVER, None, "request_failed")
    log.exception("unexpected error serving a request", exc_info=exc)
    return HTTPError(500, "internal server error", SERVER, None, "internal_error")


def failed_request(reason: str | None, message: str | None) -> HTTPError:
    """An accepted request that ended without its tokens: timed out or failed."""
    if reason == "timeout":
        return HTTPError(504, message or "request timed out", SERVER, None, "timeout")
    return HTTPError(500, message or "the request failed", SERVER, None, "request_failed")


def from_validation(errors: list) -> HTTPError:
    """Pydantic's (or FastAPI's) validation errors as one OpenAI 400 that names the bad
    field the way OpenAI does (`messages.0.content`).

    A value that fits no member of a union (`prompt` is text or token ids) fails once per
    member; the error we raised ourselves (a value error) says most, else the first.
    """
    if not errors:
        return HTTPError(400, "invalid request", INVALID)
    chosen = next((e for e in errors if e.get("type") == "value_error"), errors[0])
    param = _param(chosen.get("loc", ()))
    others = {_param(e.get("loc", ())) for e in errors} - {param}
    where = f"{param}: " if param else ""
    extra = f" (and errors in {', '.join(sorted(p or 'body' for p in others))})" \
        if others else ""
    message = str(chosen.get("msg", "invalid value")).removeprefix("Value error, ")
    return HTTPError(400, f"{where}{message}{extra}", INVALID, param, "invalid_value")


def _param(loc) -> str | None:
    """A location without pydantic's union member tags (`function-after[...]`, `list[int]`)
    and FastAPI's leading `body`."""
    parts = [str(p) for p in loc if isinstance(p, int) or _FIELD.fullmatch(str(p))]
    if parts and parts[0] == "body":
        parts = parts[1:]
    return ".".join(parts) or None


_FIELD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def install_handlers(app: FastAPI) -> None:
    """Route every framework error through the OpenAI body."""

    @app.exception_handler(HTTPError)
    async def _ours(request: Request, exc: HTTPError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        return from_validation(list(exc.errors())).response()

    @app.exception_handler(StarletteHTTPException)
    async def _starlette(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        kind = SERVER if exc.status_code >= 500 else INVALID
        return HTTPError(exc.status_code, str(exc.detail), kind, None, code).response()
