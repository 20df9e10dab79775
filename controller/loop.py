"""The controller's loop: schedule, dispatch, update, on any clock and any workers.

The same loop drives simulated workers on a virtual clock (the discrete-event simulator)
and real workers on the wall clock. Only the `Executor` differs: a simulated one knows when a
job will end the moment it starts; a real one runs it and reports when it has.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Protocol

from tokenpool.schedulers.types import Job, RequestInfo


class Executor(Protocol):
    def start(self, job: Job, now: float) -> None:
        """Begin `job` on its worker, which is idle."""

    def next_done(self) -> float | None:
        """When the earliest running job ends, if the executor knows (simulation)."""

    def collect(self, now: float) -> list[tuple[int, list]]:
        """(worker, results) of every job finished by `now`; their workers are idle again."""


class Clock(Protocol):
    def now(self) -> float: ...

    def advance(self, until: float) -> float:
        """Move to `until` (or as near as this clock can) and return the new time."""


class VirtualClock:
    def __init__(self, start: float = 0.0):
        self._now = start

    def now(self) -> float:
        return self._now

    def advance(self, until: float) -> float:
        if until > self._now:
            self._now = until
        return self._now


class WallClock:
    """Seconds since the controller started; sleeps to reach a future event."""

    def __init__(self):
        self._start = time.monotonic()

    def now(self) -> float:
        return time.monotonic() - self._start

    def advance(self, until: float) -> float:
        delay = until - self.now()
        if delay > 0:
            time.sleep(delay)
        return self.now()


def run(scheduler, executor: Executor, clock: Clock, num_workers: int,
        arrivals: Iterable[tuple[float, RequestInfo]],
        on_arrival: Callable[[RequestInfo], None] | None = None) -> float:
    """Serve `arrivals` (sorted by time) until every job is done; returns the end time."""
    pending = iter(arrivals)
    upcoming = next(pending, None)
    idle = set(range(num_workers))
    busy = 0
    now = clock.now()
    # Bound once: a simulated hour at scale goes round this loop over a million times.
    add_request, update, schedule = scheduler.add_request, scheduler.update, scheduler.schedule
    collect, start, advance = executor.collect, executor.start, clock.advance
    next_done = executor.next_done
    while upcoming is not None or busy:
        while upcoming is not None and upcoming[0] <= now:
            if on_arrival is not None:
                on_arrival(upcoming[1])
            add_request(upcoming[1], now)
            upcoming = next(pending, None)
        for worker, results in collect(now):
            idle.add(worker)
            busy -= 1
            update(results, now)
        for job in schedule(idle, now):
            start(job, now)
            idle.discard(job.worker)
            busy += 1
        # On to the next event: an arrival or a job's end, whichever comes first.
        done = next_done()
        if upcoming is None:
            now = advance(now if done is None else done)
        else:
            now = advance(upcoming[0] if done is None or upcoming[0] < done else done)
    return now
