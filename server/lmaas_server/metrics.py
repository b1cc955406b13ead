"""Prometheus metrics. With several uvicorn workers set LMAAS_PROMETHEUS_MULTIPROC_DIR (multiprocess mode);
the CLI exports it as PROMETHEUS_MULTIPROC_DIR before prometheus_client is imported.

Labels never carry keys, prompts or texts: endpoints are route templates (e.g. /v1/inputs/{handle}).
"""

from __future__ import annotations

import os
import time

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from starlette.types import Message, Receive, Scope, Send

from lmaas_server.api.asgi import HTTPMiddleware

REQUESTS = Counter("lmaas_requests_total", "HTTP requests by endpoint and status", ["endpoint", "status"])
LATENCY = Histogram(
    "lmaas_request_duration_seconds", "HTTP request latency", ["endpoint"],
    buckets=(0.005, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)  # fmt: skip
CALLS = Counter("lmaas_calls_charged_total", "API calls charged (settled)")
TOKENS = Counter("lmaas_tokens_charged_total", "Tokens charged (settled)")
BATCH_ROWS = Histogram("lmaas_forward_batch_rows", "Rows per forward pass", buckets=(1, 8, 32, 64, 128, 256, 512, 1024))
OOM_SPLITS = Counter("lmaas_oom_splits_total", "Forward batches split in halves after running out of memory")
QUEUE_DEPTH = Gauge("lmaas_queue_depth", "Jobs waiting for the forward worker", multiprocess_mode="livesum")
CACHE_EVENTS = Counter("lmaas_cache_events_total", "Cache hits and misses", ["cache", "event"])


def cache_event(cache: str, hit: bool) -> None:
    CACHE_EVENTS.labels(cache=cache, event="hit" if hit else "miss").inc()


def exposition() -> tuple[bytes, str]:
    """The metrics page; aggregated over worker processes in multiprocess mode."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(), CONTENT_TYPE_LATEST


class MetricsMiddleware(HTTPMiddleware):
    """Counts requests and latency per route template and status."""

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        start = time.perf_counter()
        status = 500

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", "unmatched")
            REQUESTS.labels(endpoint=endpoint, status=str(status)).inc()
            LATENCY.labels(endpoint=endpoint).observe(time.perf_counter() - start)
