"""The interface every policy offers the controller core, admission and the operator's view.

The core drives it the same way on a wall clock and on a virtual one: `add_request` as
requests arrive, `schedule` for idle workers, `update` with what their jobs returned.

Membership (the elastic pool, and workers lost and back): a policy is built over the initial
worker ids; `add_worker` brings one in (new, back from a loss, or no longer draining),
`drain_worker` stops new work going there while what it holds runs to its end, and
`remove_worker` forgets it once `holds` is 0 or the core reported what it held finished.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from tokenpool.schedulers.types import SLO, Job, RequestInfo, UnitResult


@dataclass(frozen=True, slots=True)
class Estimate:
    """What a policy predicts for a request were it admitted now, for SLO admission.

    Both at the step times the workers have lately run, not only the profile's."""

    predicted_ttft_s: float  # until its first token, on the worker placement would pick
    round_alpha: float  # of the decode round it would join; > 1: that round misses its TBT


@dataclass(frozen=True, slots=True)
class WorkerPolicyState:
    """A decode worker as a token-level policy sees it (`GET /pool`)."""

    decode_slowdown: float  # measured over predicted step time, smoothed
    decode_alpha: float  # of its last round
    decode_requests: int  # requests it holds
    # The alpha of a round of its current requests without the 0.5 floor (0: it holds
    # none): how much of its TBT budget its decoding takes, which the elastic pool's rule
    # sums over workers (schedulers/scaling.py). Not its last round's alpha, which an
    # emptied worker keeps.
    decode_load: float = 0.0


@runtime_checkable
class Scheduler(Protocol):
    name: str

    def add_request(self, req: RequestInfo, now: float) -> None: ...

    def schedule(self, idle_workers: Iterable[int], now: float) -> list[Job]:
        """Jobs for some of `idle_workers`; each worker gets at most one."""
        ...

    def update(self, results: Iterable[UnitResult], now: float) -> None: ...

    def num_unfinished(self) -> int: ...

    def estimate(self, req: RequestInfo, slo: SLO) -> Estimate | None:
        """Admission's prediction for `req`; None: the policy predicts nothing (the
        request-level baselines, admitted by the queue bound only)."""
        ...

    def worker_state(self, worker: int) -> WorkerPolicyState | None:
        """`worker`'s decode state; None where the policy keeps none (baselines, or a
        prefill-only worker)."""
        ...

    def add_worker(self, worker: int, role: str) -> None:
        """`worker` takes work from now on; `role`: "prefill", "decode" or "prefill+decode"
        (token-level: as the pool's other workers are cut; the baselines take any)."""
        ...

    def drain_worker(self, worker: int) -> None:
        """Place no new work on `worker`; what it holds runs to its end there."""
        ...

    def remove_worker(self, worker: int) -> None:
        """Forget `worker`. Work still queued there that never started (its state is not on
        the worker) is placed again elsewhere; the core reports the rest finished first."""
        ...

    def holds(self, worker: int) -> int:
        """Requests queued for prefill or decoding on `worker` (0: nothing; drained)."""
        ...
