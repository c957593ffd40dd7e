"""What a new operator sees on a cluster: settings checked on every primary, queue sizes
read, and writes refused (not silently unreplicated) when primaries lack the replicas
that EVENTS_CONFIRM_REPLICAS asks for. This folder's cluster has no replicas."""

from __future__ import annotations

import logging

import grpc
import pytest
from redis.cluster import RedisCluster

from events_server.pb import events_pb2_grpc
from events_server.queue.keys import KeySpace
from events_server.server.app import EventsServer
from events_server.server.auth import ApiKey
from events_server.server.settings import Settings
from tests.harness.cluster import ValkeyCluster, user_per_partition
from tests.harness.data import ev
from tests.harness.rpc import NOT_SERVING, health_of, keyed_channel, send
from tests.harness.servers import LoopThread, serving
from tests.harness.waiting import eventually


def primaries(cluster: ValkeyCluster) -> list[str]:
    """The node names of the cluster's primaries, as metrics and logs give them."""
    return [f"127.0.0.1:{node.port}" for node in cluster.nodes]


def test_settings_are_checked_on_every_primary(
    grpc_server: tuple[EventsServer, int],
    valkey_cluster: ValkeyCluster,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = grpc_server[0]
    # INFO was read from each primary (not "settings not checked"): their replicas are known.
    for node in primaries(valkey_cluster):
        assert server.scrape.get_sample_value("events_redis_replicas_in_sync", {"node": node}) == 0
    # No replicas are asked for here (confirm_replicas=0): no primary is short of them.
    assert server.scrape.get_sample_value("events_redis_primaries_short_of_replicas") == 0
    with caplog.at_level(logging.WARNING, logger="events_server"), valkey_cluster.client(2) as node:
        node.config_set("maxmemory-policy", "allkeys-lru")
        try:
            warning = (
                f"redis primary {primaries(valkey_cluster)[2]}: maxmemory-policy is allkeys-lru"
            )
            eventually(lambda: any(warning in r.getMessage() for r in caplog.records))
        finally:
            node.config_set("maxmemory-policy", "noeviction")
    assert not any("settings not checked" in r.getMessage() for r in caplog.records)


def test_queue_sizes_are_read_from_the_cluster(
    grpc_server: tuple[EventsServer, int],
    stub: events_pb2_grpc.EventsServiceStub,
    rdb: RedisCluster,
    keys: KeySpace,
    loop: LoopThread,
) -> None:
    users = user_per_partition(keys)
    send(stub, *(ev(user_id=u, deduplication_id=f"q{p}") for p, u in users.items()))
    send(stub, *(ev(user_id=u) for u in users.values()))
    rdb.xgroup_create(keys.stream(3), "analytics", id="0")
    server = grpc_server[0]
    loop.run(server.sampler.sample())

    def value(name: str, **labels: str) -> float | None:
        found: float | None = server.scrape.get_sample_value(name, labels)
        return found

    for partition in range(keys.partitions):
        assert value("events_stream_length", partition=str(partition)) == 2
    assert value("events_group_lag", partition="3", group="analytics") == 2
    assert value("events_dedup_keys") == keys.partitions


def test_primaries_without_the_replicas_writes_need_refuse_them(
    settings: Settings,
    session_key: tuple[ApiKey, str],
    loop: LoopThread,
    valkey_cluster: ValkeyCluster,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The production default on a cluster (a replica per primary), on one that has none.
    wanting = settings.model_copy(update={"confirm_replicas": "auto"})
    assert wanting.replicas_to_confirm == 1
    with (
        caplog.at_level(logging.WARNING, logger="events_server"),
        serving(loop, wanting) as (server, target),
        keyed_channel(target, session_key[1]) as channel,
    ):
        assert health_of(channel) == NOT_SERVING
        assert server.scrape.get_sample_value("events_redis_primaries_short_of_replicas") == 3
        for node in primaries(valkey_cluster):
            assert any(
                f"redis primary {node} has 0 replicas in sync, and writes need 1" in r.getMessage()
                for r in caplog.records
            )
        with pytest.raises(grpc.RpcError) as caught:
            send(events_pb2_grpc.EventsServiceStub(channel), ev(deduplication_id="unreplicated"))
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "0 of the 1 replicas required" in (caught.value.details() or "")
        counted = sum(
            server.scrape.get_sample_value(
                "events_redis_confirmations_timed_out_total", {"node": n}
            )
            or 0
            for n in primaries(valkey_cluster)
        )
        assert counted == 1
