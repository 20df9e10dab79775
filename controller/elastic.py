"""Which worker slots are up, starting, down or draining; the scaling rule's hands in the core.

Slots are worker ids below `max_workers`. A slot is up (the policy places work there),
pending (the core asked the pool to grow into it; it counts from `Grow` until its
`WorkerJoined`), down (lost; it rejoins with `WorkerJoined` whenever its pool brings it back)
or free. An up slot may be draining: it runs what it holds and takes nothing new, and is
retired once it holds nothing and runs no job. The rule (schedulers/scaling.py) sees all of
it as a `ScalingView` and answers `ScaleUp` / `ScaleDown`; this turns those into policy
calls and `Grow` / `Retire` decisions for the pool.
"""

from __future__ import annotations

import math
from collections import deque

from tokenpool.schedulers.scaling import (Grow, Retire, ScaleDown, ScaleUp, ScalingView,
                                          WorkerLoad)


class PoolMembers:
    def __init__(self, scheduler, num_workers: int, max_workers: int, role_of, rule=None,
                 unscaled: frozenset[int] = frozenset()):
        """`unscaled`: workers the rule neither weighs nor drains (pinned models' own)."""
        self.scheduler = scheduler
        self.unscaled = unscaled
        self.role_of = role_of  # worker id -> "prefill" | "decode" | "prefill+decode"
        self.rule = rule  # a ScalingRule, or None: the pool changes only by losses
        self.max_workers = max_workers
        self.up = set(range(num_workers))
        self.down: set[int] = set()
        self.pending: dict[int, float] = {}  # slot -> when it was asked for
        self.draining: set[int] = set()
        self.active_at: dict[int, float] = {}  # slot -> its last job's start or end
        self.joined_at: dict[int, float] = {}  # slot -> when it last came up (start: absent)
        self.busy_s: dict[int, float] = {}  # slot -> seconds of jobs ended, summed
        self.running: dict[int, float] = {}  # slot -> its job's start
        # (time, slot -> busy seconds then), one per check over the last idle_after_s
        self._busy_marks: deque[tuple[float, dict[int, float]]] = deque()
        self._next_check = -math.inf

    # -- what the pool reports -----------------------------------------------------------------

    def joined(self, worker: int, now: float, idle: set[int]) -> bool:
        """A worker asked for, or lost, is up. A join of a slot up already, or free (retired
        while it was starting), changes nothing: False."""
        if worker not in self.pending and worker not in self.down:
            return False
        self.pending.pop(worker, None)
        self.down.discard(worker)
        self.up.add(worker)
        idle.add(worker)
        self.active_at[worker] = self.joined_at[worker] = now
        self.scheduler.add_worker(worker, self.role_of(worker))
        return True

    def lost(self, worker: int, idle: set[int], scale: list) -> None:
        """The worker is down until it joins again; the core has reported what it held
        finished. One lost while draining, or while starting, was on its way out: retired."""
        idle.discard(worker)
        self.running.pop(worker, None)
        leaving = worker in self.draining or worker in self.pending
        if worker in self.up:
            self.up.discard(worker)
            self.scheduler.remove_worker(worker)
        self.draining.discard(worker)
        self.pending.pop(worker, None)
        if leaving:
            scale.append(Retire(worker))
        else:
            self.down.add(worker)

    def state_of(self, worker: int) -> str | None:
        """How the core holds `worker`, where that is more than up: "down", "starting" or
        "draining" (None: up)."""
        if worker in self.down:
            return "down"
        if worker in self.pending:
            return "starting"
        return "draining" if worker in self.draining else None

    def started(self, worker: int, now: float) -> None:
        self.active_at[worker] = self.running[worker] = now

    def finished(self, worker: int, now: float) -> None:
        self.active_at[worker] = now
        start = self.running.pop(worker, None)
        if start is not None:
            self.busy_s[worker] = self.busy_s.get(worker, 0.0) + now - start

    # -- the rule ------------------------------------------------------------------------------

    def scale(self, now: float, idle: set[int], scale: list) -> None:
        """Retire drained workers; at most every `check_s`, ask the rule and act on it."""
        for worker in sorted(self.draining):
            if worker in idle and self.scheduler.holds(worker) == 0:
                self._retire(worker, idle, scale)
        if now < self._next_check:
            return
        self._next_check = now + self.rule.config.check_s
        decision = self.rule.decide(now, self.view(now, idle))
        if type(decision) is ScaleUp:
            self._grow(decision, now, scale)
        elif type(decision) is ScaleDown:
            for worker in decision.workers:
                self._shrink(worker, idle, scale)

    def view(self, now: float, idle: set[int]) -> ScalingView:
        loads = []
        state, holds = self.scheduler.worker_state, self.scheduler.holds
        busy = self._busy_shares(now)
        for w in sorted(self.up - self.unscaled):
            held = holds(w)
            since = self.active_at.setdefault(w, now)  # an initial worker: from the first look
            idle_s = now - since if w in idle and not held else 0.0
            policy = state(w)
            loads.append(WorkerLoad(w, self.role_of(w), held, idle_s,
                                    None if policy is None else policy.decode_load,
                                    w in self.draining, busy.get(w)))
        roles = [self.role_of(w) for w in self._free_slots() + sorted(self.draining)]
        return ScalingView(tuple(loads), tuple(sorted(self.pending)),
                           sum("prefill" in r for r in roles), sum("decode" in r for r in roles),
                           len(self.up & self.unscaled))

    def _free_slots(self) -> list[int]:
        taken = self.up | self.down | self.pending.keys()
        return [w for w in range(self.max_workers) if w not in taken]

    def _busy_shares(self, now: float) -> dict[int, float]:
        """Each worker's share of the last idle_after_s spent running jobs, for those up
        (and marked) that whole window."""
        totals = {w: self.busy_s.get(w, 0.0) + (now - self.running[w] if w in self.running
                                                 else 0.0) for w in self.up}
        marks, window = self._busy_marks, self.rule.config.idle_after_s
        marks.append((now, totals))
        while len(marks) > 1 and marks[1][0] <= now - window:
            marks.popleft()
        then, old = marks[0]
        if now - then < window:
            return {}
        return {w: (total - old[w]) / (now - then) for w, total in totals.items()
                if w in old and self.joined_at.get(w, -math.inf) <= then}

    def _grow(self, up: ScaleUp, now: float, scale: list) -> None:
        """Draining workers take work again first; then free slots are asked for, lowest
        first, each as it serves a capacity still wanted (a colocated one serves both)."""
        need = {"prefill": up.prefill, "decode": up.decode}
        slots = []
        for w in sorted(self.draining) + self._free_slots():
            serves = [c for c, n in need.items() if n and c in self.role_of(w)]
            if not serves:
                continue
            for c in serves:
                need[c] -= 1
            if w in self.draining:
                self.draining.discard(w)
                self.scheduler.add_worker(w, self.role_of(w))
            else:
                slots.append(w)
        if slots:
            self.pending.update((w, now) for w in slots)
            scale.append(Grow(tuple(slots)))

    def _shrink(self, worker: int, idle: set[int], scale: list) -> None:
        floor = self.rule.config.min_workers
        if len(self.up) - len(self.draining) + len(self.pending) <= floor:
            return
        if worker in self.pending:
            del self.pending[worker]
            scale.append(Retire(worker))
        elif worker in self.up and worker not in self.draining:
            self.draining.add(worker)
            self.scheduler.drain_worker(worker)
            if worker in idle and self.scheduler.holds(worker) == 0:
                self._retire(worker, idle, scale)

    def _retire(self, worker: int, idle: set[int], scale: list) -> None:
        self.scheduler.remove_worker(worker)
        self.up.discard(worker)
        self.draining.discard(worker)
        idle.discard(worker)
        self.active_at.pop(worker, None)
        scale.append(Retire(worker))
