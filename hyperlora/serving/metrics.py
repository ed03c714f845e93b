"""Prometheus metrics of one server (``/metrics``), in a registry of its own (several servers per process in tests).

Counters and histograms are updated by the engine (tokens, steps, latencies) and the app (requests); the pool's
hits, misses, evictions and adapter-generation time are read from `Runtime.stats()` at scrape time, so they are
exactly the pool's own counters.
"""
from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

__all__ = ["Metrics", "CONTENT_TYPE"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_ROWS = (1, 2, 4, 8, 16, 32, 64, 128)


class _PoolCollector:
    """The adapter pool's counters, read when scraped."""

    def __init__(self, stats: Callable[[], dict]):
        self._stats = stats

    def collect(self):
        s = self._stats()
        for name, key, doc in (("hits", "hits", "pool lookups that found the adapter"),
                               ("misses", "misses", "pool lookups that did not"),
                               ("evictions", "evictions", "adapters evicted (LRU) to make room"),
                               ("generations", "generations", "adapters generated from policy texts")):
            yield CounterMetricFamily(f"hyperlora_pool_{name}", doc, value=float(s.get(key, 0)))
        yield CounterMetricFamily("hyperlora_adapter_generation_seconds", "time spent generating adapters",
                                  value=float(s.get("generation_seconds", 0.0)))
        for key in ("used", "pinned", "in_flight", "capacity"):
            yield GaugeMetricFamily(f"hyperlora_pool_slots_{key}", f"adapter pool slots: {key}", value=float(s.get(key, 0)))


class Metrics:
    def __init__(self, pool_stats: Callable[[], dict] | None = None):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("hyperlora_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=r)
        self.prompt_tokens = Counter("hyperlora_prompt_tokens", "prompt tokens prefilled", registry=r)
        self.generation_tokens = Counter("hyperlora_generation_tokens", "tokens generated", registry=r)
        self.finished = Counter("hyperlora_finished_requests", "generations finished, by reason", ["reason"],
                                registry=r)
        self.queue_depth = Gauge("hyperlora_queue_depth", "requests waiting for admission", registry=r)
        self.running = Gauge("hyperlora_running_requests", "requests in the running batch", registry=r)
        self.batch_rows = Histogram("hyperlora_batch_rows", "rows per decode step", buckets=_ROWS, registry=r)
        self.step_adapters = Histogram("hyperlora_step_distinct_adapters", "distinct adapters per decode step "
                                       "(rows without one not counted)", buckets=(0,) + _ROWS, registry=r)
        self.prefill_rows = Histogram("hyperlora_prefill_rows", "requests prefilled together", buckets=_ROWS,
                                      registry=r)
        self.adapter_prepare = Histogram("hyperlora_adapter_prepare_seconds", "time to resolve a new request's "
                                         "adapter (a pool hit, or generating it)", buckets=_LATENCY, registry=r)
        self.ttft = Histogram("hyperlora_time_to_first_token_seconds", "submit -> first token", buckets=_LATENCY,
                              registry=r)
        self.tpot = Histogram("hyperlora_time_per_output_token_seconds", "time between a request's tokens",
                              buckets=_LATENCY, registry=r)
        self.step_seconds = Histogram("hyperlora_step_seconds", "one decode step", buckets=_LATENCY, registry=r)
        if pool_stats is not None:
            r.register(_PoolCollector(pool_stats))

    def render(self) -> bytes:
        return generate_latest(self.registry)
