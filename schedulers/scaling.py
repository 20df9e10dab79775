"""The elastic pool's scaling rule (DESIGN §9): when to grow the pool, and whom to let go.

Pure policy, like the schedulers: time comes in as `now`, the pool as a `ScalingView` the
controller core builds from what it already measures, and answers are frozen decisions. The
core turns them into `Grow` / `Retire` for the pool (controller/core.py); the simulator runs
the same rule on its virtual clock. docs/elastic.md states the rule with its formulas.

- Grow (`ScaleUp`) when, for `grow_after_s` with no worker still starting, every decode
  worker's round load stays above `grow_alpha` (role "decode"), or at least
  `grow_ttft_share` of the arrivals (and MIN_OVER of them) were predicted over their TTFT SLO
  or shed (role "prefill").
- Shrink (`ScaleDown`) when nothing presses: a worker that has held nothing for
  `idle_after_s`; else, once the decode work would fit one worker fewer at a load of
  `shrink_load` for `idle_after_s`, the least loaded decode worker; else, when the last
  `idle_after_s` of prefill work would have kept one prefill worker fewer at most
  `shrink_load` busy, the least busy prefill worker. A worker still starting goes first. It
  drains, and retires once it holds nothing.
- Never below `min_workers` (counting workers starting), never above `max_workers` (counting
  workers starting or down), never the last worker of a role, and one action per
  `cooldown_s`.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, replace

from tokenpool.errors import ConfigError

PREFILLS = ("prefill", "prefill+decode")
DECODES = ("decode", "prefill+decode")
# Arrivals predicted over their TTFT SLO a window needs before it counts as pressure: one
# long prompt queued behind a switch is no reason to start a device.
MIN_OVER = 3


# -- what the core tells the pool ------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Grow:
    """Start workers in these slots; each reports `WorkerJoined` once it is ready."""

    workers: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Retire:
    """Stop this worker: it holds nothing and the policy has forgotten it (or it was still
    starting, or it was lost while draining)."""

    worker: int


# -- what the rule tells the core ------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class ScaleUp:
    """Workers wanted per capacity short; a colocated worker serves one of each."""

    prefill: int
    decode: int


@dataclass(frozen=True, slots=True)
class ScaleDown:
    workers: tuple[int, ...]  # drain them (retire at once those still starting)


@dataclass(frozen=True, slots=True)
class WorkerLoad:
    worker: int
    role: str  # "prefill", "decode" or "prefill+decode"
    holds: int  # requests queued or decoding there
    idle_s: float  # how long it has run no job and held nothing (0: busy or holding work)
    load: float | None  # its decode round's alpha without the 0.5 floor; None: none kept
    draining: bool
    busy: float | None = None  # share of the last idle_after_s it ran jobs; None: up less


@dataclass(frozen=True, slots=True)
class ScalingView:
    workers: tuple[WorkerLoad, ...]  # every worker up, draining ones included
    pending: tuple[int, ...]  # grown, not joined yet
    # Workers a grow could add (free slots below max_workers, or draining ones taken back)
    # that prefill, and that decode.
    prefill_room: int
    decode_room: int
    # Workers up that the rule leaves alone (pinned models' own): not in `workers`, but they
    # count towards min_workers, which bounds the whole pool.
    unscaled: int = 0


@dataclass(frozen=True, slots=True)
class ScalingConfig:
    """The fleet's (or simulation's) `scaling:` block. Bounds: a fleet's come from
    `pool.min_workers` / `pool.max_workers`; None: the initial pool size."""

    min_workers: int | None = None
    max_workers: int | None = None
    check_s: float = 1.0  # the rule looks at the pool at most this often
    grow_after_s: float = 10.0  # how long pressure must hold before growing
    grow_alpha: float = 1.0  # every decode worker's round load above this: decode pressure
    grow_ttft_share: float = 0.1  # share of arrivals over the TTFT SLO: prefill pressure
    grow_step: int = 1  # workers per grow, at least
    # Decode pressure grows by enough workers to bring the decode load to this.
    target_load: float = 0.8
    cooldown_s: float = 10.0  # between two actions
    idle_after_s: float = 30.0  # calm (or a worker empty) this long before shrinking
    # Shrink when the rest would carry at most this: decode load, or prefill busy share.
    shrink_load: float = 0.6
    # How long a new worker takes to start: the simulator's delay from Grow to its
    # WorkerJoined (a real pool takes what it takes).
    start_s: float = 60.0

    def __post_init__(self):
        for key in ("check_s", "grow_after_s", "grow_alpha", "grow_ttft_share",
                    "idle_after_s", "shrink_load", "target_load"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"scaling.{key} must be > 0, got {getattr(self, key)}")
        if not (self.cooldown_s >= 0 and self.start_s >= 0) or self.grow_step < 1:
            raise ConfigError("scaling.cooldown_s and start_s must be >= 0, grow_step >= 1")
        low, high = self.min_workers, self.max_workers
        if (low is not None and low < 1) or (None not in (low, high) and low > high):
            raise ConfigError(f"scaling needs 1 <= min_workers <= max_workers, got "
                              f"{low}..{high}")

    def bounded(self, min_workers: int, max_workers: int) -> "ScalingConfig":
        """This tuning with the bounds of a pool (its own, where it has set them)."""
        low = min_workers if self.min_workers is None else self.min_workers
        high = max_workers if self.max_workers is None else self.max_workers
        return replace(self, min_workers=low, max_workers=high)


class ScalingRule:
    def __init__(self, config: ScalingConfig):
        if config.min_workers is None or config.max_workers is None:
            raise ValueError("ScalingRule needs bounds: use ScalingConfig.bounded()")
        self.config = config
        self._arrivals: deque[tuple[float, bool]] = deque()  # (time, predicted over SLO)
        self._over = 0  # of _arrivals, those over
        self._decode_since: float | None = None  # decode pressure held since
        self._calm_since: float | None = None  # the decode work fitted one worker fewer since
        self._last_action: float | None = None  # the first check counts as one

    def arrived(self, now: float, over_slo: bool) -> None:
        """A request arrived; `over_slo`: predicted over its TTFT SLO, or shed."""
        self._arrivals.append((now, over_slo))
        self._over += over_slo

    def decide(self, now: float, view: ScalingView) -> ScaleUp | ScaleDown | None:
        if self._last_action is None:
            self._last_action = now
        self._forget_before(now - self.config.grow_after_s)
        accepting = [w for w in view.workers if not w.draining]
        loads = [w.load for w in accepting if w.role in DECODES and w.load is not None]
        # Even the lightest decode worker's round misses the TBT SLO: placement has nowhere
        # left that meets it. Not the mean: one worker's backlog, which new workers cannot
        # take over, would keep growing the pool.
        hot = bool(loads) and min(loads) > self.config.grow_alpha
        decode_hot = self._decode_pressure(now, view, hot)
        ttft_hot = self._ttft_pressure(now, view)
        # No shrinking while any decode worker is overloaded, though it takes growing them all.
        overloaded = bool(loads) and max(loads) > self.config.grow_alpha
        pressed = overloaded or self._ttft_share() >= self.config.grow_ttft_share
        calm = self._calm(now, loads, pressed)
        if now - self._last_action < self.config.cooldown_s:
            return None
        decision = self._grow(view, loads if decode_hot else None, ttft_hot)
        if decision is None and not pressed:
            decision = self._shrink(now, view, accepting, calm)
        if decision is not None:
            self._acted(now)
        return decision

    # -- signals -------------------------------------------------------------------------------

    def _forget_before(self, start: float) -> None:
        arrivals = self._arrivals
        while arrivals and arrivals[0][0] <= start:
            self._over -= arrivals.popleft()[1]

    def _ttft_share(self) -> float:
        return self._over / len(self._arrivals) if self._over >= MIN_OVER else 0.0

    def _ttft_pressure(self, now: float, view: ScalingView) -> bool:
        """Prefill pressure over a whole window since the last action."""
        return not view.pending and now - self._last_action >= self.config.grow_after_s \
            and self._ttft_share() >= self.config.grow_ttft_share

    def _decode_pressure(self, now: float, view: ScalingView, hot: bool) -> bool:
        """`hot` (every decode load over `grow_alpha`) at every check for `grow_after_s`; the
        clock runs only while no worker is starting (what one adds is not measured yet)."""
        if not hot or view.pending:
            self._decode_since = None
            return False
        if self._decode_since is None:
            self._decode_since = now
        return now - self._decode_since >= self.config.grow_after_s

    def _calm(self, now: float, loads: list[float], pressed: bool) -> bool:
        """No pressure, and the decode work would fit one worker fewer at `shrink_load`,
        held for `idle_after_s`. Without decode loads (request-level policies): no
        pressure held that long."""
        fits = not loads or (len(loads) > 1 and
                             sum(loads) / (len(loads) - 1) <= self.config.shrink_load)
        if pressed or not fits:
            self._calm_since = None
            return False
        if self._calm_since is None:
            self._calm_since = now
        return now - self._calm_since >= self.config.idle_after_s

    # -- decisions -----------------------------------------------------------------------------

    def _grow(self, view: ScalingView, hot_loads: list[float] | None,
              ttft_hot: bool) -> ScaleUp | None:
        """`hot_loads`: the decode loads, when they press: enough decode workers to bring
        the lightest one's load to `target_load`, were they all as loaded (at least
        grow_step); prefill pressure: grow_step prefill ones."""
        if hot_loads is None and not ttft_hot:
            return None
        step, decode, prefill = self.config.grow_step, 0, 0
        if hot_loads is not None:
            n = len(hot_loads)
            wanted = math.ceil(n * min(hot_loads) / self.config.target_load) - n
            decode = min(max(step, wanted), view.decode_room)
        if ttft_hot:
            prefill = min(step, view.prefill_room)
        return ScaleUp(prefill, decode) if prefill or decode else None

    def _shrink(self, now: float, view: ScalingView, accepting,
                calm: bool) -> ScaleDown | None:
        spare = len(accepting) + len(view.pending) + view.unscaled - self.config.min_workers
        if spare <= 0:
            return None
        # Busy shares span idle_after_s: one taken before the last action measured another pool.
        prefill = self._spare_prefill(accepting) \
            if now - self._last_action >= self.config.idle_after_s else None
        if (calm or prefill is not None) and view.pending:
            return ScaleDown((max(view.pending),))
        idle = [w for w in accepting if w.holds == 0 and w.idle_s >= self.config.idle_after_s]
        chosen = _keeping_roles(sorted(idle, key=lambda w: -w.worker), accepting, spare)
        if chosen:
            return ScaleDown(chosen)
        loads = [w.load for w in accepting if w.load is not None]
        if calm and loads:
            # The fewest decode workers that carry today's load at shrink_load, at once.
            count = len(loads) - math.ceil(sum(loads) / self.config.shrink_load)
            decoders = sorted((w for w in accepting if w.load is not None),
                              key=lambda w: (w.load, w.holds, -w.worker))
            chosen = _keeping_roles(decoders, accepting, min(max(count, 1), spare))
            if chosen:
                return ScaleDown(chosen)
        return None if prefill is None else ScaleDown((prefill,))

    def _spare_prefill(self, accepting) -> int | None:
        """The least busy prefill-only worker, if the others would have carried the last
        `idle_after_s` of prefill work at a busy share of at most `shrink_load`."""
        prefill = [w for w in accepting if w.role == "prefill"]
        if len(prefill) < 2 or any(w.busy is None for w in prefill):
            return None
        if sum(w.busy for w in prefill) / (len(prefill) - 1) > self.config.shrink_load:
            return None
        return min(prefill, key=lambda w: (w.busy, w.holds, -w.worker)).worker

    def _acted(self, now: float) -> None:
        """Every signal starts over: the pool it measured has changed."""
        self._last_action = now
        self._arrivals.clear()
        self._over = 0
        self._decode_since = self._calm_since = None


def interleaved_role(worker: int, prefill: int, total: int) -> str:
    """A disaggregated pool's role for slot `worker`, keeping a prefill share of
    `prefill / total` in every prefix of ids (of the first k slots, ceil(k * share) prefill):
    a pool grown or shrunk by lowest free slot keeps its shape."""
    return "prefill" if -(-(worker + 1) * prefill // total) > -(-worker * prefill // total) \
        else "decode"


def _keeping_roles(candidates, accepting, count: int) -> tuple[int, ...]:
    """Up to `count` of `candidates`, in order, leaving each role some accepting worker."""
    left, chosen = list(accepting), []
    for w in candidates:
        if len(chosen) == count:
            break
        if all(sum(o.role in roles for o in left) > 1
               for roles in (PREFILLS, DECODES) if w.role in roles):
            left.remove(w)
            chosen.append(w.worker)
    return tuple(chosen)
