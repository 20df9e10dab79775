"""The `scheduler:` block, one class for a fleet file and a simulation set-up alike.

Defaults are serving's; the simulator states the two it sets otherwise (`sim/config.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenpool.errors import ConfigError

SCHEDULERS = ("token-level", "request-level", "request-level-plus", "static")


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    name: str = "token-level"  # one of SCHEDULERS
    q_max_s: float = 1.0  # the longest decode turn (DESIGN §3.2's Q_max)
    max_group_size: int = 8  # prefill: requests per same-model group (DESIGN §3.1)
    batch_prefill: bool = True  # a group's prompts in one forward pass
    # What a switch costs beyond the weight copy the profile measures: sending the next job
    # to the worker, streaming its first step back, swapping KV. The policy plans every turn
    # with it (DESIGN §3.2's c0), so turns stay long enough to be worth their switch.
    switch_overhead_s: float = 0.0
    # Seconds a request-level baseline holds its worker after every switch: the engine
    # re-initialisation of the paper's ServerlessLLM baseline, which tokenpool's component
    # reuse removes (docs/sim.md, docs/bench/serving.md). 0: the baselines switch as cheaply
    # as tokenpool does.
    baseline_switch_overhead_s: float = 0.0
    # Admission, serving only (the simulator admits every request): shed (429 /
    # RESOURCE_EXHAUSTED) when the predicted TTFT exceeds this multiple of the TTFT SLO, or
    # the decode rounds' alpha exceeds max_alpha (both at the step times the workers' turns
    # have lately run, not the start-up profile's).
    shed_ttft_factor: float = 1.0
    max_alpha: float = 1.0
    max_waiting: int = 512  # requests queued for prefill across the pool

    def __post_init__(self):
        if self.name not in SCHEDULERS:
            raise ConfigError(f"scheduler.name: expected one of {', '.join(SCHEDULERS)}, "
                              f"got {self.name!r}")
        for key in ("max_group_size", "max_waiting"):
            if getattr(self, key) < 1:
                raise ConfigError(f"scheduler.{key} must be >= 1, got {getattr(self, key)}")
        for key in ("q_max_s", "shed_ttft_factor", "max_alpha"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"scheduler.{key} must be > 0, got {getattr(self, key)}")
        for key in ("switch_overhead_s", "baseline_switch_overhead_s"):
            if not getattr(self, key) >= 0:
                raise ConfigError(f"scheduler.{key} must be >= 0, got {getattr(self, key)}")
