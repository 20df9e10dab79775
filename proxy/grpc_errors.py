"""How tokenpool's typed errors and final events become gRPC statuses (DESIGN §6).

An "error" event (an accepted request that could not finish: its worker died, the server is
shutting down, the engine refused it) maps to UNAVAILABLE, not INTERNAL: it is the status
gRPC defines for "transient, the client may retry", which is what such a failure is, and it
is one of the statuses DESIGN §6 lists. INTERNAL is kept for bugs in the edge itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from tokenpool.controller.serving_types import TokenEvent
from tokenpool.errors import (InvalidRequestError, OverloadedError, RequestFailedError,
                              UnavailableError, UnknownModelError)

# First match wins; subclasses come before their bases.
_STATUS_OF_ERROR: tuple[tuple[type[Exception], grpc.StatusCode], ...] = (
    (InvalidRequestError, grpc.StatusCode.INVALID_ARGUMENT),
    (UnknownModelError, grpc.StatusCode.NOT_FOUND),
    (OverloadedError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (UnavailableError, grpc.StatusCode.UNAVAILABLE),
    (RequestFailedError, grpc.StatusCode.UNAVAILABLE),
)

_STATUS_OF_FINISH = {
    "timeout": grpc.StatusCode.DEADLINE_EXCEEDED,
    "error": grpc.StatusCode.UNAVAILABLE,
    "cancelled": grpc.StatusCode.CANCELLED,
}


@dataclass(frozen=True, slots=True)
class GrpcFailure:
    """A status to end an RPC with, and the trailing metadata that goes with it."""

    code: grpc.StatusCode
    details: str
    trailers: tuple[tuple[str, str], ...] = ()

    async def abort(self, context: grpc.aio.ServicerContext):
        """Ends the RPC; raises, like `context.abort`."""
        await context.abort(self.code, self.details, self.trailers)


def failure_of_error(exc: Exception) -> GrpcFailure | None:
    """The status for a typed tokenpool error, or None if `exc` is not one we expect."""
    for kind, code in _STATUS_OF_ERROR:
        if isinstance(exc, kind):
            return GrpcFailure(code, str(exc), _trailers_of(exc))
    return None


def _trailers_of(exc: Exception) -> tuple[tuple[str, str], ...]:
    # Metadata values must be printable ASCII; ours are identifiers and numbers.
    if isinstance(exc, OverloadedError):
        return (("retry-after", f"{max(exc.retry_after_s, 0.0):.3f}"),)
    if isinstance(exc, InvalidRequestError) and exc.param:
        return (("error-param", exc.param),)
    return ()


def failure_of_event(event: TokenEvent) -> GrpcFailure | None:
    """The status a final event ends the stream with; None for a normal finish."""
    code = _STATUS_OF_FINISH.get(event.finish_reason or "")
    if code is None:
        return None
    return GrpcFailure(code, event.error or f"request {event.finish_reason}")


def invalid_argument(message: str, param: str | None = None) -> GrpcFailure:
    return failure_of_error(InvalidRequestError(message, param))
