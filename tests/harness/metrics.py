"""Prometheus scrapes over real HTTP, as samples by name and labels."""

from __future__ import annotations

import ssl

import httpx
from prometheus_client.parser import text_string_to_metric_families

from events_server.server.app import EventsServer

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
CREATE = "/events.v1.EventsService/CreateEvents"


def scrape(url: str, verify: ssl.SSLContext | None = None) -> Samples:
    """Every sample at a /metrics URL, by name and labels."""
    answer = httpx.get(url, timeout=10, verify=verify or True)
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain")
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(answer.text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value (0 when the series does not exist yet)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def server_metrics_url(server: EventsServer) -> str:
    """The /metrics URL of an in-process server."""
    assert server.metrics_endpoint is not None
    return f"http://127.0.0.1:{server.metrics_endpoint.port}/metrics"


def calls(server: EventsServer, code: str = "OK", method: str = CREATE) -> float:
    """CreateEvents calls (or ``method``'s) an in-process server has answered with ``code``
    so far."""
    value = server.metrics.registry.get_sample_value(
        "events_grpc_requests_total", {"method": method, "code": code}
    )
    return value or 0.0
