"""Prometheus metrics of the REST bridge (served at its own ``/metrics``)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from events_server.ops.exposition import LATENCY_BUCKETS, LabelCache, Observer, scrape_registry

# Anything else a client puts in the request line is counted as "other".
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

# WebSocket close codes kept as label values; any other is counted as "other".
WS_CLOSE_CODES = frozenset({1000, 1001, 1005, 1006, 1007, 1008, 1009, 1011, 1012, 1013, 4100})

UNMATCHED_ROUTE = "unmatched"
"""Route label of requests no route matched (their paths are client-chosen, so not labels)."""


class BridgeMetrics:
    """HTTP requests by route, method and status, and their latency; WebSocket connections and
    frames."""

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
        self.ws_handshakes = Counter(
            "events_ws_handshakes",
            "WebSocket handshakes on /ws/create-events by HTTP status (101: accepted).",
            ["status"],
            registry=self.registry,
        )
        self.ws_open = Gauge(
            "events_ws_connections_open",
            "WebSocket connections open now.",
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self.ws_in_flight = Gauge(
            "events_ws_frames_in_flight",
            "WebSocket frames being handled now (their CreateEvents calls are out).",
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self.ws_closes = Counter(
            "events_ws_closes",
            "WebSocket connections ended, by close code.",
            ["code"],
            registry=self.registry,
        )
        self.ws_frames = Counter(
            "events_ws_frames",
            "WebSocket frames by outcome: accepted, duplicate, not_ok, error, unanswered,"
            " resend_in_flight.",
            ["outcome"],
            registry=self.registry,
        )
        self.ws_frame_seconds = Histogram(
            "events_ws_frame_duration_seconds",
            "Time from reading a WebSocket frame to its answer (or to giving up on it).",
            ["outcome"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.gathered_calls = Histogram(
            "events_gathered_call_requests",
            "Requests (POSTs, WebSocket frames) per gathered call to the server (count: calls;"
            " sum: requests).",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=self.registry,
        )
        self._call_size = Observer(self.gathered_calls)
        self.scrape = scrape_registry(self.registry)
        self._children = LabelCache()
        self._request_changes: dict[
            tuple[str, str, int], tuple[Callable[[float], None], Callable[[float], None]]
        ] = {}

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        """Count one answered request and its duration."""
        # Routes are templates and methods llhttp's: a bounded set of keys.
        changes = self._request_changes.get((route, method, status))
        if changes is None:
            label = method if method in METHODS else "other"
            changes = self._request_changes[route, method, status] = (
                self._children.counting(self.requests, (route, label, str(status))),
                self._children.observing(self.seconds, (route, label)),
            )
        count, observe = changes
        count(1)
        observe(seconds)

    def ws_frame(self, outcome: str, seconds: float | None = None) -> None:
        """Count one WebSocket frame (and how long it took, when it was handled)."""
        self._children.counting(self.ws_frames, (outcome,))(1)
        if seconds is not None:
            self._children.observing(self.ws_frame_seconds, (outcome,))(seconds)

    def gathered(self, requests: int) -> None:
        """Count one gathered call to the server, of ``requests`` requests."""
        self._call_size(requests)

    def ws_handshake(self, status: int) -> None:
        """Count one handshake answered with ``status``."""
        self._children.get(self.ws_handshakes, (str(status),)).inc()

    def ws_closed(self, code: int) -> None:
        """Count one connection ended with close ``code``."""
        label = str(code) if code in WS_CLOSE_CODES else "other"
        self._children.get(self.ws_closes, (label,)).inc()
