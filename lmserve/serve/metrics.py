"""Prometheus metrics of one app (its own CollectorRegistry), per-request timing, and the /metrics route."""

from __future__ import annotations

import time

from fastapi import Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from lmserve.engine.client import EngineLoad

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
_TPOT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)


class ServerMetrics:
    """Counters, histograms and gauges in a registry of their own, so several apps can share a process."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "lmserve_requests", "HTTP requests by route and status code", ["route", "status"], registry=r
        )
        self.prompt_tokens = Counter("lmserve_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("lmserve_generation_tokens", "Tokens generated", registry=r)
        self.finished = Counter(
            "lmserve_request_finished", "Engine requests finished, by reason", ["finish_reason"], registry=r
        )
        self.ttft = Histogram(
            "lmserve_time_to_first_token_seconds", "Time to first token", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.tpot = Histogram(
            "lmserve_time_per_output_token_seconds",
            "Time per output token",
            buckets=_TPOT_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "lmserve_e2e_request_latency_seconds",
            "End-to-end request latency",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.running = Gauge("lmserve_num_requests_running", "Requests running in the engine", registry=r)
        self.waiting = Gauge("lmserve_num_requests_waiting", "Requests waiting in the engine", registry=r)
        self.kv_usage = Gauge("lmserve_kv_cache_usage_perc", "KV cache usage (0..1)", registry=r)
        self.prefix_queries = Gauge(
            "lmserve_prefix_cache_queries", "Prefix-cache block lookups so far", registry=r
        )
        self.prefix_hits = Gauge("lmserve_prefix_cache_hits", "Prefix-cache block hits so far", registry=r)
        self.prefix_hit_rate = Gauge(
            "lmserve_prefix_cache_hit_rate", "Prefix-cache hits / queries (0..1)", registry=r
        )

    def update_engine_gauges(self, stats: EngineLoad) -> None:
        self.running.set(stats.num_running)
        self.waiting.set(stats.num_waiting)
        self.kv_usage.set(stats.kv_cache_usage)
        queries, hits = stats.prefix_cache_queries, stats.prefix_cache_hits
        self.prefix_queries.set(queries)
        self.prefix_hits.set(hits)
        self.prefix_hit_rate.set(hits / queries if queries else 0.0)

    def render(self, stats: EngineLoad | None) -> Response:
        if stats is not None:
            self.update_engine_gauges(stats)
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)


class RequestTimer:
    """Times one engine request: TTFT at the first token, TPOT and end-to-end latency at the end."""

    def __init__(self, metrics: ServerMetrics | None) -> None:
        self.metrics = metrics
        self.start = time.perf_counter()
        self.first_token_at: float | None = None

    def on_output(self, num_new_tokens: int) -> None:
        if self.first_token_at is None and num_new_tokens > 0:
            self.first_token_at = time.perf_counter()
            if self.metrics is not None:
                self.metrics.ttft.observe(self.first_token_at - self.start)

    def on_finish(self, num_prompt_tokens: int, num_generated_tokens: int, finish_reason: str | None) -> None:
        if self.metrics is None:
            return
        end = time.perf_counter()
        m = self.metrics
        m.e2e.observe(end - self.start)
        m.prompt_tokens.inc(num_prompt_tokens)
        m.generation_tokens.inc(num_generated_tokens)
        m.finished.labels(finish_reason=finish_reason or "unknown").inc()
        if self.first_token_at is not None and num_generated_tokens > 1:
            m.tpot.observe((end - self.first_token_at) / (num_generated_tokens - 1))
