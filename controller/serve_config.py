"""The `slo:` block of a fleet file (its `scheduler:` block is schedulers.config's)."""

from __future__ import annotations

from dataclasses import dataclass

from tokenpool.errors import ConfigError
from tokenpool.schedulers.types import SLO


@dataclass(frozen=True, slots=True)
class SLOConfig:
    ttft_s: float = 10.0
    tbt_s: float = 1.0

    def __post_init__(self):
        if not (self.ttft_s > 0 and self.tbt_s > 0):
            raise ConfigError(f"slo: ttft_s and tbt_s must be > 0, got {self.ttft_s}, "
                              f"{self.tbt_s}")

    @property
    def slo(self) -> SLO:
        return SLO(self.ttft_s, self.tbt_s)
