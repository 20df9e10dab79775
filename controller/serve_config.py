"""The `scheduler:` and `slo:` blocks of a fleet file: which policy serves, against what SLOs."""

from __future__ import annotations

from dataclasses import dataclass

from tokenpool.errors import ConfigError
from tokenpool.schedulers.registry import SCHEDULERS
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


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    name: str = "token-level"
    q_max_s: float = 1.0  # the longest decode turn (DESIGN §3.2's Q_max)
    max_group_size: int = 8  # prefill groups (DESIGN §3.1)
    batch_prefill: bool = True  # a group's prompts in one forward pass
    # Admission: shed (429 / RESOURCE_EXHAUSTED) when the predicted TTFT exceeds this
    # multiple of the TTFT SLO, or the decode rounds' alpha exceeds max_alpha (both at the
    # step times the workers' turns have lately run, not the start-up profile's).
    shed_ttft_factor: float = 1.0
    max_alpha: float = 1.0
    max_waiting: int = 512  # requests queued for prefill across the pool
    # What a switch costs beyond the weight copy the profile measures: sending the next job
    # to the worker, streaming its first step back, swapping KV. The policy plans every turn
    # with it (DESIGN §3.2's c0), so turns stay long enough to be worth their switch.
    switch_overhead_s: float = 0.0
    # Seconds a request-level baseline holds its worker after every switch: the engine
    # re-initialisation of the paper's ServerlessLLM baseline, which tokenpool's component
    # reuse removes (the simulator's setting of the same name; docs/bench/serving.md). 0: the
    # baselines switch as cheaply as tokenpool does.
    baseline_switch_overhead_s: float = 0.0

    def __post_init__(self):
        if self.name not in SCHEDULERS:
            raise ConfigError(f"scheduler.name: expected one of {', '.join(SCHEDULERS)}, "
                              f"got {self.name!r}")
        if self.q_max_s <= 0 or self.max_group_size < 1 or self.max_waiting < 1:
            raise ConfigError("scheduler: q_max_s must be > 0, max_group_size and max_waiting "
                              ">= 1")
        if self.switch_overhead_s < 0 or self.baseline_switch_overhead_s < 0:
            raise ConfigError("scheduler: switch_overhead_s and baseline_switch_overhead_s "
                              "must be >= 0")
        if self.shed_ttft_factor <= 0 or self.max_alpha <= 0:
            raise ConfigError("scheduler: shed_ttft_factor and max_alpha must be > 0")
