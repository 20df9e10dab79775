"""Per-request token timelines and run summaries (DESIGN §8).

The simulator steps through a decode turn analytically (about 100 M tokens per simulated
hour), so a timeline takes a run of evenly spaced tokens in O(1) (`emit_evenly`) as well as
single tokens (`emit`). Everything per call is pure Python and constant time; numpy is used
only once per run, in `summarize`.

SLO attainment (Aegaeon's, token level). Token i is due at D_i, with D_1 = arrival + TTFT_SLO
and, once token i was emitted at t_i,

    D_{i+1} = max(D_i, t_i) + TBT_SLO

so an early token banks its slack, and after a miss the schedule restarts from the actual time.
Token i is late by max(0, t_i - D_i); the late intervals [D_i, t_i] are disjoint (the next
deadline lies past t_i), so their sum is the time during which the request was late, and

    attainment = 1 - late_time / (t_last - arrival)      (1.0 for a zero service time).

Closed form for a run of k tokens at t_j = t0 + j*step (j = 1..k), entered with deadline D:
token j's lateness is max(D_j, t_j) - D_j = D_{j+1} - TBT - D_j, so the run's lateness
telescopes to D_{k+1} - D - k*TBT. The recurrence is max-plus linear, so
D_{k+1} = max(D + k*TBT, max_j t_j + (k - j + 1)*TBT); the inner term is linear in j, so its
maximum sits at j = 1 or j = k:

    D_{k+1} = max(D + k*TBT, t_1 + k*TBT, t_k + TBT)
    late    = max(0, t_1 - D, t_k - D - (k - 1)*TBT)

With step <= TBT the t_1 term dominates: only the run's first token can be late. With
step > TBT the t_k term does: slack runs out mid-run (or at once), and from then on every
token is late by step - TBT.

Percentiles are nearest-rank: the smallest value v with at least p% of the (weighted) samples
<= v. No interpolation, so a reported value is always one that was observed.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Iterable, Sequence

import numpy as np


class TokenTimeline:
    """The token times of one request, reduced to what the metrics need."""

    __slots__ = ("arrival", "ttft_slo", "tbt_slo", "finished", "_n", "_first", "_last",
                 "_late", "_deadline", "_gaps")

    def __init__(self, arrival: float, ttft_slo: float, tbt_slo: float) -> None:
        if not (ttft_slo > 0 and tbt_slo > 0):
            raise ValueError(f"SLOs must be positive, got TTFT {ttft_slo}, TBT {tbt_slo}")
        self.arrival = arrival
        self.ttft_slo = ttft_slo
        self.tbt_slo = tbt_slo
        self.finished = False
        self._n = 0
        self._first = arrival
        self._last = arrival
        self._late = 0.0
        self._deadline = arrival + ttft_slo
        # Inter-token gaps as flat (gap seconds, how many such gaps) pairs: a C array, since
        # an hour at scale holds millions of them and tuples took ~100 bytes a pair.
        self._gaps = array("d")

    # -- recording ---------------------------------------------------------------------------

    def emit(self, t: float) -> None:
        """One token at time `t`."""
        self._enter(t, 1)
        deadline = self._deadline
        if t > deadline:
            self._late += t - deadline
            deadline = t
        self._deadline = deadline + self.tbt_slo
        self._n += 1
        self._last = t

    def emit_evenly(self, t0: float, step: float, k: int) -> None:
        """`k` tokens at t0 + step, t0 + 2*step, ..., t0 + k*step, in O(1).

        Written out flat (no helper calls, no max()): the simulator calls this for every
        request of every decode stretch, millions of times an hour of simulated time.
        """
        if k < 0 or step < 0:
            raise ValueError(f"need k >= 0 and step >= 0, got k={k}, step={step}")
        if k == 0:
            return
        first, last, tbt = t0 + step, t0 + k * step, self.tbt_slo
        # `_enter`, inlined.
        if first < self._last:
            raise ValueError(f"token at {first} precedes the previous one at {self._last}")
        if self._n:
            if k > 1:
                self._gaps.extend((first - self._last, 1.0, step, k - 1))
            else:
                self._gaps.extend((first - self._last, 1.0))
        else:
            self._first = first
            if k > 1:
                self._gaps.extend((step, k - 1))
        deadline = self._deadline
        # See the module docstring: the run's lateness is how far it pushed the schedule.
        late = first - deadline
        tail = last - deadline - (k - 1) * tbt
        if tail > late:
            late = tail
        if late > 0.0:
            self._late += late
        pushed = deadline + k * tbt
        if first + k * tbt > pushed:
            pushed = first + k * tbt
        if last + tbt > pushed:
            pushed = last + tbt
        self._deadline = pushed
        self._n += k
        self._last = last

    def finish(self) -> None:
        """Mark the request done (its last token was emitted)."""
        self.finished = True

    def _enter(self, first: float, k: int) -> None:
        """Check the next token's time and record the gap to it."""
        if first < self._last:
            raise ValueError(f"token at {first} precedes the previous one at {self._last}")
        if self._n:
            self._gaps.extend((first - self._last, 1.0))
        else:
            self._first = first

    # -- reading -----------------------------------------------------------------------------

    @property
    def num_tokens(self) -> int:
        return self._n

    @property
    def ttft(self) -> float | None:
        return self._first - self.arrival if self._n else None

    @property
    def first_time(self) -> float | None:
        return self._first if self._n else None

    @property
    def last_time(self) -> float | None:
        return self._last if self._n else None

    @property
    def late_time(self) -> float:
        """Total seconds the request spent behind its token schedule."""
        return self._late

    @property
    def next_deadline(self) -> float:
        """When the next token is due."""
        return self._deadline

    @property
    def attainment(self) -> float:
        """Fraction of the service time (arrival to last token) spent on schedule; 0 with no
        token yet."""
        if not self._n:
            return 0.0
        return _on_time_fraction(self._late, self._last - self.arrival)

    def attainment_at(self, now: float) -> float:
        """Attainment if the request were cut off at `now`: a token still pending past its
        deadline counts as late up to `now`, so a starved request cannot look healthy."""
        if not self._n:
            return 0.0
        pending = max(0.0, now - self._deadline)
        return _on_time_fraction(self._late + pending, max(now, self._last) - self.arrival)

    @property
    def mean_tpot(self) -> float:
        """(last - first) / (n - 1); 0 with fewer than two tokens."""
        return (self._last - self._first) / (self._n - 1) if self._n > 1 else 0.0

    @property
    def gap_runs(self) -> list[tuple[float, int]]:
        """Every inter-token gap as (gap seconds, count); the counts add up to n - 1."""
        gaps = self._gaps
        return [(gaps[i], int(gaps[i + 1])) for i in range(0, len(gaps), 2)]


def _on_time_fraction(late: float, service: float) -> float:
    if service <= 0.0:
        return 1.0
    return min(1.0, max(0.0, 1.0 - late / service))  # clamp away float noise only


# -- summaries ---------------------------------------------------------------------------------

def meets_slos(tl: TokenTimeline, ttft_slo: float | None = None,
               tbt_slo: float | None = None) -> bool:
    """DistServe/vLLM goodput test: finished, TTFT <= TTFT_SLO and mean TPOT <= TBT_SLO.
    SLOs left as None are the request's own."""
    if not tl.finished or not tl.num_tokens:
        return False
    ttft_slo = tl.ttft_slo if ttft_slo is None else ttft_slo
    tbt_slo = tl.tbt_slo if tbt_slo is None else tbt_slo
    return tl.ttft <= ttft_slo and tl.mean_tpot <= tbt_slo


def summarize(timelines: Iterable[TokenTimeline], duration_s: float,
              ttft_slo: float | None = None, tbt_slo: float | None = None, *,
              now: float | None = None) -> dict:
    """One run's metrics (DESIGN §8).

    `ttft_slo` / `tbt_slo` override the requests' own SLOs for the goodput test (None keeps
    each request's). With `now`, unfinished requests are scored by `attainment_at(now)`.
    Ratios and percentiles of an empty set are None.
    """
    if not duration_s > 0:
        raise ValueError(f"duration_s must be positive, got {duration_s}")
    tls = list(timelines)
    scores = [_score(tl, now) for tl in tls]
    met = sum(meets_slos(tl, ttft_slo, tbt_slo) for tl in tls)
    ttfts = [tl.ttft for tl in tls if tl.num_tokens]
    gaps, counts = _all_gaps(tls)
    return {
        "requests": len(tls),
        "finished": sum(tl.finished for tl in tls),
        "slo_attainment": sum(scores) / len(tls) if tls else None,
        "slo_met_fraction": met / len(tls) if tls else None,
        "goodput_rps": met / duration_s,
        "ttft_p50_s": percentile(ttfts, 50),
        "ttft_p99_s": percentile(ttfts, 99),
        "tbt_p99_s": weighted_percentile(gaps, counts, 99),
    }


def _score(tl: TokenTimeline, now: float | None) -> float:
    return tl.attainment if now is None or tl.finished else tl.attainment_at(now)


def _all_gaps(tls: Sequence[TokenTimeline]) -> tuple[np.ndarray, np.ndarray]:
    flat = array("d")
    for tl in tls:
        flat += tl._gaps  # a memcpy; one np.frombuffer per timeline cost 8 us each
    pairs = np.frombuffer(flat, dtype=np.float64).reshape(-1, 2) if flat else np.zeros((0, 2))
    gaps = np.ascontiguousarray(pairs[:, 0])
    counts = pairs[:, 1].astype(np.int64)  # whole numbers, exact in a double
    return gaps, counts


def percentile(values: Sequence[float], percent: float) -> float | None:
    """Nearest-rank percentile of `values`; None if empty."""
    return weighted_percentile(values, np.ones(len(values), dtype=np.int64), percent)


def weighted_percentile(values: Sequence[float] | np.ndarray, counts: Sequence[int] | np.ndarray,
                        percent: float) -> float | None:
    """Nearest-rank percentile where value i occurs counts[i] times: the smallest v such that
    at least `percent`% of all occurrences are <= v. None if there are none."""
    if not 0 < percent <= 100:
        raise ValueError(f"percent must be in (0, 100], got {percent}")
    values = np.asarray(values, dtype=np.float64)
    counts = np.asarray(counts, dtype=np.int64)
    # Any order among equal values gives the same answer, so no need for a stable sort.
    order = np.argsort(values)
    cumulative = np.cumsum(counts[order])
    if not len(cumulative) or cumulative[-1] <= 0:
        return None
    rank = max(1, math.ceil(percent * int(cumulative[-1]) / 100))
    return float(values[order][np.searchsorted(cumulative, rank)])


# -- sweeps ------------------------------------------------------------------------------------

def max_at_90(points: Iterable[dict], key: str, metric: str = "slo_attainment",
              threshold: float = 0.9) -> float | None:
    """The largest `key` value x of a sweep such that `metric` >= threshold at x and at every
    smaller measured x: the last x before the first failure. A pass above a failing x is
    noise, not capacity, and is ignored. Several points at one x pass only if all do; a None
    metric fails. Returns None when the smallest x already fails (or there are no points).
    """
    by_x: dict[float, list] = {}
    for point in points:
        by_x.setdefault(point[key], []).append(point[metric])
    best = None
    for x in sorted(by_x):
        if not all(v is not None and v >= threshold for v in by_x[x]):
            break
        best = x
    return best


def sustainable_rate(points: Iterable[dict], threshold: float = 0.9) -> float | None:
    """DistServe/vLLM: the highest arrival rate at which >= 90% of requests meet both TTFT and
    TPOT SLOs (`slo_met_fraction`), read off a rate sweep the way `max_at_90` reads one."""
    return max_at_90(points, "rate", metric="slo_met_fraction", threshold=threshold)
