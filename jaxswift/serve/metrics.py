"""Prometheus metrics of one server: requests by endpoint and status, time to first token, time per output token,
token counts, live gauges (queue depth, running slots, KV pages) read from the orchestrator when scraped, and the
engine's prefix-cache counters (in prompt tokens: hits came from cached pages, misses were prefilled)."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServerMetrics:
    def __init__(self, orchestrator):
        engine = orchestrator.engine
        self.registry = CollectorRegistry()  # one per app, so several servers can live in one process
        r = self.registry
        self.requests = Counter("jaxswift_requests", "HTTP requests", ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("jaxswift_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("jaxswift_generation_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram("jaxswift_time_to_first_token_seconds", "Submission to first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("jaxswift_time_per_output_token_seconds", "Mean time between output tokens",
                              buckets=LATENCY_BUCKETS, registry=r)
        Gauge("jaxswift_queue_depth", "Requests waiting for a slot", registry=r).set_function(
            lambda: orchestrator.queue_depth)
        Gauge("jaxswift_running_slots", "Slots decoding a request", registry=r).set_function(
            lambda: orchestrator.running)
        Gauge("jaxswift_kv_pages_used", "KV-cache pages in use", registry=r).set_function(
            lambda: getattr(engine, "kv_pages_used", 0))
        Gauge("jaxswift_kv_pages_total", "KV-cache pages", registry=r).set_function(
            lambda: getattr(engine, "kv_pages_total", 0))
        Gauge("jaxswift_kv_pages_cached", "KV-cache pages holding a cached prompt prefix", registry=r).set_function(
            lambda: getattr(engine, "kv_pages_cached", 0))
        r.register(_PrefixCacheCounters(engine))

    def count_request(self, endpoint: str, status: int):
        self.requests.labels(endpoint=endpoint, status=str(status)).inc()

    def observe_finished(self, ticket, prompt_tokens: int, completion_tokens: int):
        """Latency figures of a finished ticket (all its choices); called once per request."""
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(completion_tokens)
        if ticket.first_token_at is None:
            return
        self.ttft.observe(ticket.first_token_at - ticket.submitted_at)
        per_choice = completion_tokens / max(ticket.n, 1)
        if per_choice > 1:
            self.tpot.observe((time.monotonic() - ticket.first_token_at) / (per_choice - 1))

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _PrefixCacheCounters:
    """jaxswift_prefix_cache_{hit,miss}_tokens_total, read from the engine's own counters when scraped."""

    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        for name, help_text in (("hit", "Prompt tokens whose keys/values came from the prefix cache"),
                                ("miss", "Prompt tokens prefilled (not found in the prefix cache)")):
            yield CounterMetricFamily(f"jaxswift_prefix_cache_{name}_tokens", help_text,
                                      value=getattr(self.engine, f"prefix_cache_{name}_tokens", 0))
