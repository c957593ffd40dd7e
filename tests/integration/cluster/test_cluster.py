"""The server on a real 3-node Valkey cluster: the core scenarios, slots, keys, tail.

This folder's conftest.py puts the cluster in place of the session's single Valkey,
so the core dedup and enqueue scenarios of test_service run here again, on the cluster.
The slow ones (the load split, a node failure, a failover) are tests/reliability/cluster/'s.
"""

from __future__ import annotations

import json
import time

import grpc
import pytest
from redis.cluster import RedisCluster
from redis.crc import key_slot

from events_server.pb import events_pb2_grpc
from events_server.queue.keys import KeySpace
from events_server.server.app import EventsServer
from events_server.server.settings import Settings
from tests.harness.cluster import ValkeyCluster, node_of, user_per_partition
from tests.harness.data import ev
from tests.harness.processes import run_events_server
from tests.harness.rpc import keyed_channel, send
from tests.integration import test_service as core
from tests.integration import test_track as track

# --- the core dedup and enqueue scenarios, on the cluster ----------------------------


test_same_id_across_requests_is_queued_once = core.test_same_id_across_requests_is_queued_once


test_same_id_within_one_request_is_queued_once = core.test_same_id_within_one_request_is_queued_once


test_same_id_from_two_tenants_is_queued_twice = core.test_same_id_from_two_tenants_is_queued_twice


test_events_without_an_id_are_queued_every_time = (
    core.test_events_without_an_id_are_queued_every_time
)


test_an_id_is_queued_again_after_the_ttl = core.test_an_id_is_queued_again_after_the_ttl


test_retries_land_in_the_partition_of_the_first_attempt = (
    core.test_retries_land_in_the_partition_of_the_first_attempt
)


test_failed_append_leaves_no_dedup_key_and_a_retry_queues_once = (
    core.test_failed_append_leaves_no_dedup_key_and_a_retry_queues_once
)


test_script_is_reloaded_when_redis_lost_it = core.test_script_is_reloaded_when_redis_lost_it


# One purchase per transaction: its key in its partition's slot, beside the stream.
test_the_dedup_is_per_tenant_and_per_kind_and_keeps_for_the_dedup_ttl = (
    track.test_the_dedup_is_per_tenant_and_per_kind_and_keeps_for_the_dedup_ttl
)


# --- cluster specifics ------------------------------------------------------------------


def test_every_key_of_a_partition_is_in_one_slot_and_partitions_cover_every_node(
    valkey_cluster: ValkeyCluster, keys: KeySpace
) -> None:
    for partition in range(keys.partitions):
        slot = key_slot(keys.stream(partition).encode())
        others = (
            keys.dedup(partition, "a:b", "c"),
            keys.transaction(partition, "a:b", "purchase", "T-1"),
            keys.dead_letters(partition, "analytics"),
            keys.owner(partition, "analytics"),
        )
        assert {key_slot(key.encode()) for key in others} == {slot}
    nodes = {node_of(valkey_cluster, keys, p) for p in range(keys.partitions)}
    assert nodes == {0, 1, 2}


def test_keys_are_created_used_and_revoked_on_the_cluster(
    settings: Settings, grpc_server: tuple[EventsServer, int], rdb: RedisCluster
) -> None:
    def keys_cmd(*args: str) -> str:
        return run_events_server(settings, "keys", *args, EVENTS_REDIS_CLUSTER="true").stdout

    secret = keys_cmd("create", "--tenant", "shop-a", "--label", "cluster").splitlines()[-1]
    with keyed_channel(f"127.0.0.1:{grpc_server[1]}", secret) as channel:
        stub = events_pb2_grpc.EventsServiceStub(channel)
        assert send(stub, ev()).accepted == 1
        [line] = [x for x in keys_cmd("list").splitlines() if "label='cluster'" in x]
        keys_cmd("revoke", line.split()[0])  # one MULTI on the {keys} slot
        deadline = time.monotonic() + settings.key_cache_seconds + 1
        refused: grpc.RpcError | None = None
        while refused is None:
            try:
                send(stub, ev())
            except grpc.RpcError as error:
                refused = error
            assert time.monotonic() < deadline, "a revoked key kept working"
            time.sleep(0.1)
    assert refused.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.usefixtures("rdb")
def test_tail_reads_every_partition_of_the_cluster(
    stub: events_pb2_grpc.EventsServiceStub, settings: Settings, keys: KeySpace
) -> None:
    users = user_per_partition(keys)
    sent = send(stub, *(ev(user_id=user) for user in users.values()))
    shown = run_events_server(settings, "tail", "--redis-cluster").stdout
    lines = [json.loads(line) for line in shown.splitlines()]
    assert sorted((line["partition"], line["entry_id"]) for line in lines) == sorted(
        (r.partition, r.entry_id) for r in sent.results
    )
