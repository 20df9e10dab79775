"""Schedulers by name: the same objects drive simulated and real workers."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from tokenpool.schedulers.config import SCHEDULERS, SchedulerConfig
from tokenpool.schedulers.cost import CostModel
from tokenpool.schedulers.protocol import Scheduler
from tokenpool.schedulers.quota import Q_MAX_S
from tokenpool.schedulers.request_level import RequestLevelScheduler, static_placement
from tokenpool.schedulers.token_level import TokenLevelScheduler
from tokenpool.schedulers.types import SLO

__all__ = ["SCHEDULERS", "Roles", "UnknownSchedulerError", "make_scheduler",
           "scheduler_from_config"]


class UnknownSchedulerError(ValueError):
    def __init__(self, name: str):
        super().__init__(f"unknown scheduler {name!r}; expected one of {', '.join(SCHEDULERS)}")


@dataclass(frozen=True, slots=True)
class Roles:
    """Which workers prefill and which decode (the same ids in both: colocated)."""

    prefill: tuple[int, ...]
    decode: tuple[int, ...]

    @property
    def all(self) -> list[int]:
        return sorted(set(self.prefill) | set(self.decode))


def make_scheduler(name: str, roles: Roles, cost: CostModel, slo_of: Callable[[str], SLO], *,
                   model_load: dict[str, float] | None = None, max_group_size: int = 8,
                   q_max_s: float = Q_MAX_S, batch_prefill: bool = False,
                   baseline_switch_overhead_s: float = 0.0) -> Scheduler:
    """`model_load`: each model's expected share of requests; `static` places by it.
    `baseline_switch_overhead_s`: what the request-level baselines hold a worker for after
    each switch (an emulated engine re-initialisation)."""
    if name == "token-level":
        return TokenLevelScheduler(list(roles.prefill), list(roles.decode), cost, slo_of,
                                   max_group_size, q_max_s, batch_prefill)
    if name in ("request-level", "request-level-plus"):
        return RequestLevelScheduler(roles.all, cost, slo_of,
                                     shortest_first=name == "request-level-plus",
                                     baseline_switch_overhead_s=baseline_switch_overhead_s,
                                     name=name)
    if name == "static":
        placement = static_placement(model_load or {}, roles.all)
        return RequestLevelScheduler(roles.all, cost, slo_of, pinned=placement, name=name)
    raise UnknownSchedulerError(name)


def scheduler_from_config(config: SchedulerConfig, roles: Roles, cost: CostModel,
                          slo_of: Callable[[str], SLO], *, name: str | None = None,
                          model_load: dict[str, float] | None = None) -> Scheduler:
    """The policy a `scheduler:` block describes, serving's and the simulator's alike;
    `name` (a command line's choice) beats `config.name`."""
    if config.switch_overhead_s:
        cost = dataclasses.replace(cost, switch_overhead_s=config.switch_overhead_s)
    return make_scheduler(name or config.name, roles, cost, slo_of, model_load=model_load,
                          max_group_size=config.max_group_size, q_max_s=config.q_max_s,
                          batch_prefill=config.batch_prefill,
                          baseline_switch_overhead_s=config.baseline_switch_overhead_s)
