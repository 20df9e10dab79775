"""Prometheus metrics of the serving edge and the pool (DESIGN §6), on a registry of their own.

Names follow vLLM's where they exist, with the `tokenpool:` prefix, and every series has a
`model_name` label. Two sources:
- per-request timing and token counts, prefix-cache queries and hits among them, from
  `Frontend`'s events (`on_event`, called on the event loop as each event reaches the edge,
  so TTFT and ITL are what a client sees, and cache hits what it is billed for);
- pool-side values (queue depths, switches, KV swap bytes, KV usage), read from
  `controller.snapshot()` at scrape time by a custom collector. The controller's counters
  only grow, so the exported counters stay monotonic; the switch-duration histogram is
  built from the per-bucket counts the controller keeps.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from tokenpool.sim.timelines import TokenTimeline
from tokenpool.controller.catalog import ModelCard
from tokenpool.controller.pool_stats import SWITCH_BUCKETS

PREFIX = "tokenpool:"
MODEL = "model_name"
# vLLM's buckets, extended down: a CPU worker's first token can take seconds, a GPU's ms.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
               1.0, 2.5, 5.0, 10.0)
E2E_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
               50.0, 60.0, 120.0, 240.0, 480.0)
# Frontend reports refusals by error class; the label uses stable short names.
_REASONS = {"OverloadedError": "overloaded", "UnavailableError": "unavailable"}
_ENDED_BY_CLIENT = "cancelled"


@dataclass(frozen=True, slots=True)
class _TokenSeries:
    """A model's per-token series, labelled once: `labels()` per token costs a lock and a
    dict lookup on the event loop's hottest path."""

    ttft: object
    itl: object
    tokens: object
    cache_queries: object
    cache_hits: object


@dataclass(slots=True)
class _Live:
    """One request between its first and its finished event."""

    timeline: TokenTimeline
    series: _TokenSeries
    last_token_at: float | None = None


class ServingMetrics:
    """The `/metrics` registry, and `Frontend`'s observer."""

    def __init__(self, controller, catalog: Mapping[str, ModelCard] | None = None):
        """`catalog`: the served models' cards, whose `kv_pages` (KV pages one worker holds
        of the model's page shape) `kv_cache_usage_perc` is a share of; without it that
        gauge is not exported."""
        self.controller = controller
        self.registry = CollectorRegistry()
        self._live: dict[str, _Live] = {}
        self._attainment: dict[str, tuple[float, int]] = {}  # model -> (sum, count)
        self._series: dict[str, _TokenSeries] = {}
        self._lock = threading.Lock()  # on_event runs on the loop, scrapes in a thread
        self._make_edge_metrics()
        kv_pages = {model: card.kv_pages for model, card in (catalog or {}).items()}
        self.registry.register(PoolCollector(controller, kv_pages))

    def _make_edge_metrics(self) -> None:
        def hist(name, doc, buckets):
            return Histogram(PREFIX + name, doc, [MODEL], buckets=buckets,
                             registry=self.registry)

        def counter(name, doc, extra=()):
            return Counter(PREFIX + name, doc, [MODEL, *extra], registry=self.registry)

        self.ttft = hist("time_to_first_token_seconds", "Time to first token, from the "
                         "request's acceptance at the edge.", TTFT_BUCKETS)
        self.itl = hist("inter_token_latency_seconds", "Time between consecutive token "
                        "events of a request at the edge.", ITL_BUCKETS)
        self.e2e = hist("e2e_request_latency_seconds", "Acceptance to the finished event, of "
                        "requests the client did not abandon.", E2E_BUCKETS)
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of accepted requests.")
        self.generation_tokens = counter("generation_tokens", "Generated tokens delivered.")
        # vLLM's prefix_cache_queries / prefix_cache_hits, in tokens: their ratio is the hit
        # rate. Counted once per request, at its first token, so a preempted or retried
        # request is not queried twice.
        self.cache_queries = counter("prefix_cache_queries", "Prompt tokens looked up in "
                                     "the prefix cache, of requests that got a first token.")
        self.cache_hits = counter("prefix_cache_hits", "Prompt tokens the prefix cache "
                                  "served (billed as cached_tokens).")
        self.rejected = counter("requests_rejected", "Requests refused before running.",
                                ["reason"])
        self.finished = counter("request_success", "Finished requests, by how they ended "
                                "(stop, length, cancelled, timeout, error).",
                                ["finished_reason"])
        self.slo_attainment = Gauge(
            PREFIX + "slo_attainment", "Mean Aegaeon SLO attainment of finished requests "
            "(DESIGN §8), client-cancelled ones left out.", [MODEL], registry=self.registry)

    # -- Frontend's observer ---------------------------------------------------------------

    def on_rejected(self, model: str, reason: str) -> None:
        self.rejected.labels(model, _REASONS.get(reason, reason)).inc()

    def on_event(self, request, event, now: float) -> None:
        model = request.model
        with self._lock:
            live = self._live.get(request.request_id)
            if live is None:
                live = self._live[request.request_id] = self._start(request)
            if event.token_ids:
                if live.last_token_at is None:  # admitted: what the prefix cache served it
                    live.series.cache_queries.inc(len(request.prompt_ids))
                    live.series.cache_hits.inc(event.num_cached_tokens)
                self._tokens(live, len(event.token_ids), request.arrival, now)
            if event.finished:
                del self._live[request.request_id]
                self._finish(model, live, event.finish_reason or "error", request.arrival, now)

    def _start(self, request) -> _Live:
        model = request.model
        self.prompt_tokens.labels(model).inc(len(request.prompt_ids))
        series = self._series.get(model)
        if series is None:
            series = self._series[model] = _TokenSeries(
                self.ttft.labels(model), self.itl.labels(model),
                self.generation_tokens.labels(model), self.cache_queries.labels(model),
                self.cache_hits.labels(model))
        return _Live(TokenTimeline(request.arrival, request.slo.ttft_s, request.slo.tbt_s),
                     series)

    def _tokens(self, live: _Live, n: int, arrival: float, now: float) -> None:
        series = live.series
        if live.last_token_at is None:
            series.ttft.observe(now - arrival)
        else:
            series.itl.observe(now - live.last_token_at)
        live.last_token_at = now
        for _ in range(n):  # tokens of one event reach the client together
            live.timeline.emit(now)
        series.tokens.inc(n)

    def _finish(self, model: str, live: _Live, reason: str, arrival: float, now: float) -> None:
        self.finished.labels(model, reason).inc()
        if reason == _ENDED_BY_CLIENT:
            return  # the client chose to stop: neither its latency nor its SLO says much
        self.e2e.labels(model).observe(now - arrival)
        live.timeline.finish()
        # A failed or timed-out request is scored up to now: a late end counts as late.
        score = live.timeline.attainment_at(now) if reason not in ("stop", "length") \
            else live.timeline.attainment
        total, count = self._attainment.get(model, (0.0, 0))
        self._attainment[model] = (total + score, count + 1)
        self.slo_attainment.labels(model).set((total + score) / (count + 1))

    @property
    def num_live(self) -> int:
        """Requests with events still to come (0 when nothing runs: nothing leaks)."""
        with self._lock:
            return len(self._live)


class PoolCollector(Collector):
    """Pool-side series, read from the controller when Prometheus scrapes."""

    def __init__(self, controller, kv_pages: Mapping[str, int]):
        self.controller = controller
        self.kv_pages = dict(kv_pages)

    def collect(self):
        snapshot = self.controller.snapshot()  # a PoolSnapshot: published, not locked
        yield self._switch_seconds(snapshot.models)
        yield from self._model_series(snapshot.models)
        yield self._kv_usage(snapshot.workers)

    @staticmethod
    def _switch_seconds(models) -> HistogramMetricFamily:
        histogram = HistogramMetricFamily(PREFIX + "model_switch_seconds", "Seconds a worker "
                                          "spent switching to the model (weights copied into "
                                          "its arena).", labels=[MODEL])
        for m in models:
            cumulative, buckets = 0, []
            for bound, count in zip(SWITCH_BUCKETS, m.switch_counts):
                cumulative += count
                buckets.append((str(bound), cumulative))
            buckets.append(("+Inf", m.switches))
            histogram.add_metric([m.id], buckets, m.switch_seconds)
        return histogram

    @staticmethod
    def _model_series(models):
        running = GaugeMetricFamily(PREFIX + "num_requests_running",
                                    "Requests decoding.", labels=[MODEL])
        waiting = GaugeMetricFamily(PREFIX + "num_requests_waiting",
                                    "Accepted requests waiting for their first token.",
                                    labels=[MODEL])
        switches = CounterMetricFamily(PREFIX + "model_switches",
                                       "Switches of a worker to the model.", labels=[MODEL])
        switch_bytes = CounterMetricFamily(PREFIX + "model_switch_bytes", "Weight bytes copied "
                                           "by switches to the model.", labels=[MODEL])
        swapped = CounterMetricFamily(PREFIX + "kv_swap_bytes", "KV bytes swapped out to "
                                      "and in from host memory.", labels=[MODEL])
        for m in models:
            running.add_metric([m.id], m.running)
            waiting.add_metric([m.id], m.waiting)
            switches.add_metric([m.id], m.switches)
            switch_bytes.add_metric([m.id], m.switch_bytes)
            swapped.add_metric([m.id], m.kv_swap_bytes)
        return running, waiting, switches, switch_bytes, swapped

    def _kv_usage(self, workers) -> GaugeMetricFamily:
        """Per worker, labelled with the model it has loaded: its KV pages in use over what
        that model's page shape fits (pages of other models still held there count too)."""
        usage = GaugeMetricFamily(PREFIX + "kv_cache_usage_perc", "Fraction of a worker's "
                                  "KV cache in use (1 = full).", labels=[MODEL, "worker"])
        for w in workers:
            total = self.kv_pages.get(w.model)
            if total:  # a worker with no model loaded has no model_name to report under
                usage.add_metric([w.model, str(w.id)], min(1.0, w.kv_pages_used / total))
        return usage

