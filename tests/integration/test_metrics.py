"""Metrics over real HTTP scrapes: the counters move, labels stay bounded, gauges follow Redis."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import httpx
import pytest
import redis

from events_server.pb import events_pb2 as pb
from events_server.pb import events_pb2_grpc
from events_server.queue.connection import connect
from events_server.queue.keys import KeySpace
from events_server.server.app import EventsServer
from events_server.server.metrics import OTHER_TENANT
from events_server.server.sampler import RedisSampler
from events_server.server.settings import Settings
from events_server.wire.metadata import GATHERED_METHOD
from tests.harness.data import ev, event_of_size
from tests.harness.metrics import CREATE, scrape, server_metrics_url, value
from tests.harness.processes import BridgeProcess, ServerProcess, events_env, http_ok
from tests.harness.rpc import keyed_channel, send
from tests.harness.servers import LoopThread, serving_stub
from tests.harness.valkey import SessionValkey, free_port
from tests.harness.waiting import eventually


def test_counters_move_after_requests(
    http: httpx.Client, bridge: str, server: EventsServer, rdb: redis.Redis
) -> None:
    grpc_before = scrape(server_metrics_url(server))
    http_before = scrape(f"{bridge}/metrics")

    ok = {"tenant": "my_store", "market": "us", "type": "purchase", "deduplication_id": "m-1"}
    assert http.post("/create-events", json=[ok, ok]).status_code == 200  # accepted + duplicate
    bad = [{"tenant": "my_store", "market": "us", "type": "click"}, {**ok, "tenant": ""}]
    assert http.post("/create-events", json=bad).status_code == 422  # the server's rule
    assert http.post("/create-events", content=b"[{").status_code == 422  # the bridge's own
    assert http.get("/no-such-page").status_code == 404

    grpc_after = scrape(server_metrics_url(server))
    http_after = scrape(f"{bridge}/metrics")

    def grew(name: str, **labels: str) -> float:
        return value(grpc_after, name, **labels) - value(grpc_before, name, **labels)

    def grew_http(name: str, **labels: str) -> float:
        return value(http_after, name, **labels) - value(http_before, name, **labels)

    def events(tenant: str, kind: str, outcome: str, reason: str = "") -> float:
        return grew("events_total", tenant=tenant, type=kind, outcome=outcome, reason=reason)

    assert events("my_store", "purchase", "accepted") == 1
    assert events("my_store", "purchase", "duplicate") == 1
    # The invalid event names its reason; its valid sibling was refused with it.
    assert events("my_store", "click", "rejected", "batch_rejected") == 1
    # A tenant not yet seen on a queued event (here: empty) takes no label of its own.
    assert events(OTHER_TENANT, "purchase", "rejected", "string_too_short") == 1
    # The bridge's requests reach the server in its gathered calls (here one each: sent one
    # after the other), each counted by the code its own CreateEvents call would end with.
    assert grew("events_gathered_requests_total", code="OK") == 1
    assert grew("events_gathered_requests_total", code="INVALID_ARGUMENT") == 1
    assert grew("events_gathered_call_requests_count") == 2
    assert grew("events_grpc_requests_total", method=GATHERED_METHOD, code="OK") == 2
    assert grew("events_grpc_request_duration_seconds_count", method=GATHERED_METHOD) == 2
    assert grew("events_grpc_requests_total", method=CREATE, code="OK") == 0
    # The valid request only (twice when Redis had to be given the script first).
    assert grew("events_redis_script_duration_seconds_count") in {1, 2}
    assert grew("events_auth_failures_total", kind="unknown_key") == 0

    route = "/create-events"
    assert grew_http("events_http_requests_total", route=route, method="POST", status="200") == 1
    assert grew_http("events_http_requests_total", route=route, method="POST", status="422") == 2
    assert grew_http("events_http_request_duration_seconds_count", route=route, method="POST") == 3
    # Unknown paths are one series, whatever the path: clients cannot mint label values.
    assert grew_http("events_http_requests_total", route="unmatched", method="GET", status="404")


def test_tenant_cap_applies_to_the_servers_counters(
    api_key: str, loop: LoopThread, settings: Settings, rdb: redis.Redis
) -> None:
    capped_settings = settings.model_copy(update={"metrics_max_tenants": 1})
    with serving_stub(loop, capped_settings, api_key) as (capped, _, stub):
        send(stub, ev(tenant="first"), ev(tenant="second"), ev(tenant="third"))
        samples = scrape(server_metrics_url(capped))
    accepted = {
        dict(labels)["tenant"]: v
        for (name, labels), v in samples.items()
        if name == "events_total" and dict(labels)["outcome"] == "accepted"
    }
    assert accepted == {"first": 1, OTHER_TENANT: 2}


def test_queue_gauges_follow_redis(  # noqa: PLR0917
    loop: LoopThread,
    server: EventsServer,
    stub: events_pb2_grpc.EventsServiceStub,
    valkey: SessionValkey,
    rdb: redis.Redis,
    keys: KeySpace,
) -> None:
    reply = send(
        stub, *[ev(user_id="same", deduplication_id=f"g-{i}") for i in range(3)], ev(user_id="b")
    )
    partition = reply.results[0].partition
    stream = keys.stream(partition)
    rdb.xgroup_create(stream, "analytics", id="0")
    rdb.xreadgroup("analytics", "worker-1", {stream: ">"}, count=1)  # one delivered, unacked

    loop.run(server.sampler.sample())
    samples = scrape(server_metrics_url(server))

    for p in range(keys.partitions):
        assert value(samples, "events_stream_length", partition=str(p)) == rdb.xlen(keys.stream(p))
    assert sum(v for (n, _), v in samples.items() if n == "events_stream_length") == 4
    group = {"partition": str(partition), "group": "analytics"}
    assert value(samples, "events_group_pending", **group) == 1
    assert value(samples, "events_group_lag", **group) == rdb.xlen(stream) - 1
    dedup_keys = len(list(rdb.scan_iter(match=keys.dedup_pattern())))
    assert dedup_keys == 3
    if valkey.process is not None:  # our own Valkey: nothing else in it has a TTL
        assert value(samples, "events_dedup_keys") == dedup_keys
    else:
        assert value(samples, "events_dedup_keys") >= dedup_keys


# --- multiprocess mode ----------------------------------------------------------------


def server_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment of a real events-server process on the session's Redis and keys."""
    return events_env(
        settings,
        EVENTS_LOG_LEVEL="WARNING",
        EVENTS_METRICS_SAMPLE_INTERVAL_SECONDS="0.1",
        **extra,
    )


@pytest.fixture
def two_servers(
    settings: Settings, tmp_path: Path, rdb: redis.Redis
) -> Iterator[list[tuple[str, str]]]:
    """Two real events-server processes sharing one PROMETHEUS_MULTIPROC_DIR: (gRPC, metrics)."""
    metrics_ports = [free_port(), free_port()]
    servers = [
        ServerProcess(
            server_env(
                settings,
                PROMETHEUS_MULTIPROC_DIR=str(tmp_path),
                EVENTS_METRICS_ADDR=f"127.0.0.1:{port}",
            )
        )
        for port in metrics_ports
    ]
    try:
        yield [
            (server.start(), f"http://127.0.0.1:{port}/metrics")
            for server, port in zip(servers, metrics_ports, strict=True)
        ]
    finally:
        for server in servers:
            server.stop()


def test_multiprocess_figures_add_up_across_processes(
    api_key: str,
    two_servers: list[tuple[str, str]],
) -> None:
    for (target, _), calls in zip(two_servers, (2, 3), strict=True):
        with keyed_channel(target, api_key) as channel:
            stub = events_pb2_grpc.EventsServiceStub(channel)
            for _ in range(calls):
                send(stub, ev(tenant="mp"))
    accepted = {"tenant": "mp", "type": "add_to_cart", "outcome": "accepted", "reason": ""}
    for _, metrics_url in two_servers:  # either process reports the sum of both
        samples = scrape(metrics_url)
        assert value(samples, "events_grpc_requests_total", method=CREATE, code="OK") == 5
        assert value(samples, "events_total", **accepted) == 5

        # Read from Redis by each process, never added up: each sees the whole queue once.
        def queue_length(url: str = metrics_url) -> bool:
            lengths = [v for (n, _), v in scrape(url).items() if n == "events_stream_length"]
            return sum(lengths) == 5

        eventually(queue_length)


def test_gauges_disappear_while_redis_is_away_and_come_back_with_it(
    loop: LoopThread, valkey: SessionValkey, settings: Settings, keys: KeySpace, rdb: redis.Redis
) -> None:
    process = valkey.killable()
    client = connect(replace(settings.redis, timeout_seconds=0.5))
    sampler = RedisSampler(client, keys, interval=0.05)

    async def start() -> asyncio.Task[None]:
        return asyncio.create_task(sampler.run())

    def names() -> set[str]:
        return {family.name for family in sampler.collect()}

    task = loop.run(start())
    try:
        eventually(lambda: "events_stream_length" in names())
        process.kill()
        eventually(lambda: names() == set())  # no stale figures
        process.start()
        eventually(lambda: "events_stream_length" in names())
        assert not task.done()  # the outage did not end the sampler
    finally:
        if not process.running():
            process.start()
        loop.loop.call_soon_threadsafe(task.cancel)
        loop.run(client.aclose())


def test_server_workers_report_the_figures_of_all_workers(
    api_key: str, settings: Settings, rdb: redis.Redis
) -> None:
    grpc_port, metrics_port = free_port(), free_port()
    env = server_env(settings, EVENTS_METRICS_ADDR=f"127.0.0.1:{metrics_port}")
    server = ServerProcess(env, None, f"127.0.0.1:{grpc_port}", workers=2)
    try:
        server.start()  # once both workers are up
        for _ in range(20):  # a new connection each: the kernel spreads them over both
            with keyed_channel(f"127.0.0.1:{grpc_port}", api_key) as channel:
                send(events_pb2_grpc.EventsServiceStub(channel), ev(tenant="workers"))
        samples = scrape(f"http://127.0.0.1:{metrics_port}/metrics")
    finally:
        server.stop()
    # One worker listens for metrics, and counts what the other served too.
    assert value(samples, "events_grpc_requests_total", method=CREATE, code="OK") == 20


def test_bridge_workers_report_the_figures_of_all_workers(grpc_target: str, api_key: str) -> None:
    bridge = BridgeProcess(grpc_target, None, "--workers", "2", "--log-level", "warning")
    base = bridge.url
    event = {"tenant": "t", "market": "m", "type": "click"}
    bridge.spawn()
    try:
        eventually(lambda: http_ok(f"{base}/healthz"), within=20)
        for _ in range(10):  # a new connection each: uvicorn's workers share the socket
            posted = httpx.post(
                f"{base}/create-events", json=[event], headers={"x-api-key": api_key}
            )
            assert posted.status_code == 200, posted.text
        totals = [
            value(
                scrape(f"{base}/metrics"),
                "events_http_requests_total",
                route="/create-events",
                method="POST",
                status="200",
            )
            for _ in range(4)  # whichever worker answers the scrape
        ]
    finally:
        bridge.stop()
    assert totals == [10, 10, 10, 10]


def test_limit_violations_are_the_reasons_of_rejected_events(
    loop: LoopThread, settings: Settings, api_key: str, rdb: redis.Redis
) -> None:
    limits = {"max_events_per_request": 3, "max_event_bytes": 200, "max_string_length": 50}
    with serving_stub(loop, settings, api_key, **limits) as (limited, _, stub):
        with pytest.raises(grpc.RpcError):
            send(stub, *[ev(type=pb.EVENT_TYPE_PAGE_VIEW)] * 4)
        with pytest.raises(grpc.RpcError):
            send(
                stub,
                event_of_size(201, 50, type=pb.EVENT_TYPE_CLICK),
                ev(type=pb.EVENT_TYPE_PURCHASE, url="x" * 51),
                ev(type=pb.EVENT_TYPE_ADD_TO_CART),
            )
        samples = scrape(server_metrics_url(limited))

    def rejected(kind: str, reason: str) -> float:
        labels = {"tenant": OTHER_TENANT, "type": kind, "outcome": "rejected", "reason": reason}
        return value(samples, "events_total", **labels)

    # Too many: each event of the request carries the request's reason.
    assert rejected("page_view", "too_many_events") == 4
    assert rejected("click", "event_too_large") == 1
    assert rejected("purchase", "string_too_long") == 1
    assert rejected("add_to_cart", "batch_rejected") == 1
    assert value(samples, "events_grpc_requests_total", method=CREATE, code="INVALID_ARGUMENT") == 2
