"""Metrics without a server: bounded tenant labels, no /metrics in the API document."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import values as prometheus_values

from events_server.ops.exposition import (
    LabelCache,
    LoopValue,
    Observer,
    values_changed_on_one_thread,
)
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


def test_values_kept_without_a_lock_expose_what_locked_ones_do(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def exposed() -> bytes:
        registry = CollectorRegistry()
        counter = Counter("calls", "calls", ["code"], registry=registry)
        histogram = Histogram("seconds", "seconds", registry=registry, buckets=(0.01, 0.1))
        gauge = Gauge("open", "open", registry=registry)
        for n in range(1000):
            counter.labels("OK" if n % 3 else "UNAVAILABLE").inc()
            histogram.observe(n / 5000)
            gauge.set(n)
        counter.labels("OK").inc(2.5)
        lines = generate_latest(registry).splitlines()
        return b"\n".join(line for line in lines if b"_created" not in line)  # a clock

    locked = exposed()
    monkeypatch.setattr(prometheus_values, "ValueClass", prometheus_values.ValueClass)
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    values_changed_on_one_thread()
    assert prometheus_values.ValueClass is LoopValue
    assert exposed() == locked
    assert b'calls_total{code="OK"} 668.5' in locked


def test_lean_changes_expose_what_inc_and_observe_do() -> None:
    amounts = [0.0, 0.01, 0.010001, 0.05, 0.1, 0.5, 7.0, float("inf"), -1.0, float("nan")]

    def exposed(lean: bool) -> bytes:
        registry = CollectorRegistry()
        counter = Counter("calls", "calls", ["code"], registry=registry)
        labelled = Histogram("took", "took", ["route"], registry=registry, buckets=(0.01, 0.1))
        plain = Histogram("size", "size", registry=registry, buckets=(1, 8, 64))
        cache = LabelCache()
        observe_plain = Observer(plain) if lean else plain.observe
        for n, amount in enumerate(amounts * 3):
            code = "OK" if n % 3 else "UNAVAILABLE"
            if lean:
                cache.counting(counter, (code,))(1)
                cache.observing(labelled, ("/a",))(amount)
            else:
                counter.labels(code).inc()
                labelled.labels("/a").observe(amount)
            observe_plain(n)
        lines = generate_latest(registry).splitlines()
        return b"\n".join(line for line in lines if b"_created" not in line)  # a clock

    checked = exposed(lean=False)
    assert exposed(lean=True) == checked
    assert b'took_bucket{le="0.01",route="/a"} 9.0' in checked
    assert b'size_bucket{le="8.0"} 9.0' in checked
