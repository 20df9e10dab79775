"""Typed errors shared by every layer. The proxy maps them onto HTTP and gRPC statuses."""


class TokenpoolError(Exception):
    """Base of every error tokenpool raises on purpose."""


class InvalidRequestError(TokenpoolError, ValueError):
    """The request itself is wrong; retrying it unchanged will fail again (HTTP 400)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class EmptyPromptError(InvalidRequestError):
    def __init__(self):
        super().__init__("prompt is empty: at least one token is required", param="prompt")


class PromptTooLongError(InvalidRequestError):
    def __init__(self, num_tokens: int, max_tokens: int):
        super().__init__(
            f"prompt has {num_tokens} tokens, more than the model's context of {max_tokens} "
            "(leaving room for at least one generated token)",
            param="prompt",
        )
        self.num_tokens = num_tokens
        self.max_tokens = max_tokens


class InvalidSamplingError(InvalidRequestError):
    """A sampling parameter is out of range."""


class UnknownModelError(TokenpoolError, LookupError):
    def __init__(self, model: str, known: list[str] | tuple[str, ...] = ()):
        hint = f"; known models: {', '.join(sorted(known))}" if known else ""
        super().__init__(f"unknown model {model!r}{hint}")
        self.model = model


class ConfigError(TokenpoolError, ValueError):
    """A configuration file or value is invalid. The message names the key path."""


class CheckpointError(TokenpoolError):
    """A checkpoint is missing, unreadable or of an unsupported layout."""


class OverloadedError(TokenpoolError):
    """Admission control shed the request: its SLO cannot be met now (HTTP 429)."""

    def __init__(self, message: str, retry_after_s: float = 1.0):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class UnavailableError(TokenpoolError):
    """The server cannot take requests: starting, shutting down, or no live worker (503)."""


class RequestFailedError(TokenpoolError):
    """An accepted request could not be completed (e.g. its worker died); explicit, never silent."""
