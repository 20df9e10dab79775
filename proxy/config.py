"""The `proxy:` block of a fleet file: the network edge."""

from __future__ import annotations

from dataclasses import dataclass

from tokenpool.errors import ConfigError


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    host: str = "127.0.0.1"  # loopback unless told otherwise (DESIGN §7)
    http_port: int = 8000
    grpc_port: int = 50051
    # Guards /v1/* and gRPC metadata when set; TOKENPOOL_API_KEY or --api-key also set it.
    api_key: str | None = None
    max_body_bytes: int = 1 << 20  # larger HTTP bodies / gRPC messages are refused
    max_prompt_chars: int = 256 << 10
    request_timeout_s: float = 600.0  # an accepted request ends by then, with an error if need be

    def __post_init__(self):
        for name in ("http_port", "grpc_port"):
            port = getattr(self, name)
            if not 0 <= port <= 65535:
                raise ConfigError(f"proxy.{name} must be a port in 0..65535, got {port}")
        if self.max_body_bytes < 1024 or self.max_prompt_chars < 1:
            raise ConfigError("proxy.max_body_bytes must be >= 1024 and max_prompt_chars >= 1")
        if self.request_timeout_s <= 0:
            raise ConfigError("proxy.request_timeout_s must be > 0")
