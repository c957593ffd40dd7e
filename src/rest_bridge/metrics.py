"""Prometheus metrics of the REST bridge (served at its own ``/metrics``)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

from events_server.ops.exposition import LATENCY_BUCKETS, LabelCache, scrape_registry

# Anything else a client puts in the request line is counted as "other".
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

UNMATCHED_ROUTE = "unmatched"
"""Route label of requests no route matched (their paths are client-chosen, so not labels)."""


class BridgeMetrics:
    """HTTP requests by route, method and status, and their latency."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.requests = Counter(
            "events_http_requests",
            "HTTP requests by route, method and status.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.seconds = Histogram(
            "events_http_request_duration_seconds",
            "Time to answer an HTTP request, by route and method.",
            ["route", "method"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.scrape = scrape_registry(self.registry)
        self._children = LabelCache()

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        """Count one answered request and its duration."""
        method = method if method in METHODS else "other"
        self._children.get(self.requests, (route, method, str(status))).inc()
        self._children.get(self.seconds, (route, method)).observe(seconds)
