"""Schedulers by name: the same objects drive simulated and real workers."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from tokenpool.schedulers.config import SCHEDULERS, SchedulerConfig
from tokenpool.schedulers.cost import CostModel
from tokenpool.schedulers.partitioned import PartitionedScheduler, split_workers
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
                   baseline_switch_overhead_s: float = 0.0,
                   pins: dict[str, int] | None = None) -> Scheduler:
    """`model_load`: each model's expected share of requests; `static` places by it.
    `baseline_switch_overhead_s`: what the request-level baselines hold a worker for after
    each switch (an emulated engine re-initialisation). `pins`: model -> workers of its own
    (schedulers/partitioned.py); the other models pool on the rest."""
    settings = dict(max_group_size=max_group_size, q_max_s=q_max_s, batch_prefill=batch_prefill,
                    baseline_switch_overhead_s=baseline_switch_overhead_s)
    if pins and any(pins.values()):
        return _partitioned(name, roles, cost, slo_of, model_load, pins, settings)
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


def _partitioned(name: str, roles: Roles, cost: CostModel, slo_of: Callable[[str], SLO],
                 model_load: dict[str, float] | None, pins: dict[str, int],
                 settings: dict) -> Scheduler:
    """One `name` policy per pinned model over its workers (colocated), one over the rest.
    Without `model_load` the fleet's models are unknown: the pool must keep workers."""
    unpinned = None if model_load is None else {m: x for m, x in model_load.items()
                                                if not pins.get(m)}
    split = split_workers(pins, roles.prefill, roles.decode, unpinned is None or bool(unpinned))
    pinned = {m: (make_scheduler(name, Roles(ws, ws), cost, slo_of,
                                 model_load={m: (model_load or {}).get(m, 1.0)}, **settings), ws)
              for m, ws in split.pinned.items()}
    pooled = None
    if split.prefill and split.decode:
        pooled = (make_scheduler(name, Roles(split.prefill, split.decode), cost, slo_of,
                                 model_load=unpinned, **settings), split.pooled)
    return PartitionedScheduler(pinned, pooled)


def scheduler_from_config(config: SchedulerConfig, roles: Roles, cost: CostModel,
                          slo_of: Callable[[str], SLO], *, name: str | None = None,
                          model_load: dict[str, float] | None = None,
                          pins: dict[str, int] | None = None) -> Scheduler:
    """The policy a `scheduler:` block describes, serving's and the simulator's alike;
    `name` (a command line's choice) beats `config.name`. `pins`: see make_scheduler."""
    if config.switch_overhead_s:
        cost = dataclasses.replace(cost, switch_overhead_s=config.switch_overhead_s)
    return make_scheduler(name or config.name, roles, cost, slo_of, model_load=model_load,
                          max_group_size=config.max_group_size, q_max_s=config.q_max_s,
                          batch_prefill=config.batch_prefill,
                          baseline_switch_overhead_s=config.baseline_switch_overhead_s,
                          pins=pins)
