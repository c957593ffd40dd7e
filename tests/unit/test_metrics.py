"""Metrics without a server: bounded tenant labels, no /metrics in the API document."""

from __future__ import annotations

from events_server.server.metrics import OTHER_TENANT, TenantLabels
from rest_bridge.app import create_app
from rest_bridge.config import BridgeSettings


def test_metrics_are_not_part_of_the_api_document() -> None:
    paths = create_app(BridgeSettings()).openapi()["paths"]
    assert "/metrics" not in paths


def test_tenant_labels_are_capped_and_only_queued_events_take_a_place() -> None:
    labels = TenantLabels(2)
    assert labels("junk", admit=False) == OTHER_TENANT  # a rejected event takes no place
    assert labels("a") == "a"
    assert labels("x" * 65) == OTHER_TENANT  # too long to be a label
    assert labels("b") == "b"
    assert labels("c") == OTHER_TENANT
    assert labels("a", admit=False) == "a"
    assert TenantLabels(0)("a") == OTHER_TENANT
