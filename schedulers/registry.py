"""Schedulers by name: the same objects drive simulated and real workers."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from tokenpool.schedulers.cost import CostModel
from tokenpool.schedulers.quota import Q_MAX_S
from tokenpool.schedulers.request_level import RequestLevelScheduler, static_placement
from tokenpool.schedulers.token_level import TokenLevelScheduler
from tokenpool.schedulers.types import SLO

SCHEDULERS = ("token-level", "request-level", "request-level-plus", "static")


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
                   baseline_reinit_s: float = 0.0):
    """`model_load`: each model's expected share of requests; `static` places by it.
    `baseline_reinit_s`: what the request-level baselines hold a worker for after each
    switch (an emulated engine re-initialisation; `Switch.hold_s`)."""
    if name == "token-level":
        return TokenLevelScheduler(list(roles.prefill), list(roles.decode), cost, slo_of,
                                   max_group_size, q_max_s, batch_prefill)
    if name in ("request-level", "request-level-plus"):
        scheduler = RequestLevelScheduler(roles.all, cost, slo_of,
                                          shortest_first=name == "request-level-plus",
                                          reinit_s=baseline_reinit_s)
        scheduler.name = name
        return scheduler
    if name == "static":
        placement = static_placement(model_load or {}, roles.all)
        scheduler = RequestLevelScheduler(roles.all, cost, slo_of, pinned=placement)
        scheduler.name = name
        return scheduler
    raise UnknownSchedulerError(name)
