"""The server on a real 3-node Valkey cluster: the core scenarios, the load split, a node failure.

The fixtures below replace the session's single-Valkey ones for this module only, so
the core dedup and enqueue scenarios of test_service run here again, on the cluster.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis
from redis.cluster import RedisCluster
from redis.crc import key_slot

from events_server.consumer import Consumer, Message
from events_server.consumer.groups import group_states, replay_dead_letters, trim
from events_server.pb import events_pb2_grpc
from events_server.queue.keys import KeySpace
from events_server.server.app import EventsServer
from events_server.server.auth import ApiKey
from events_server.server.routing import partition_for
from events_server.server.settings import Settings
from tests import test_service as core
from tests.harness.cluster import ValkeyCluster
from tests.harness.consumers import FAST, entries, in_order, produce, run
from tests.harness.data import ev
from tests.harness.keys import store_key
from tests.harness.processes import run_events_server
from tests.harness.rpc import ACCEPTED, DUPLICATE, SERVING, health_of, keyed_channel, send, statuses
from tests.harness.servers import LoopThread, started_server
from tests.harness.waiting import eventually, until

# --- the cluster in place of the single Valkey ---------------------------------------


@pytest.fixture(scope="module")
def settings(valkey_cluster: ValkeyCluster) -> Settings:
    """Server settings for the cluster: 16 partitions over 3 nodes."""
    return Settings(
        redis_url=valkey_cluster.url,
        redis_cluster=True,
        grpc_addr="127.0.0.1:0",
        key_prefix=f"test-{uuid.uuid4().hex[:8]}",
        partitions=16,
        redis_timeout_seconds=1.0,
        health_interval_seconds=0.1,
        shutdown_grace_seconds=1.0,
        metrics_addr="",  # no fixed port: the session server may hold the default one
    )


@pytest.fixture(scope="module")
def keys(settings: Settings) -> KeySpace:
    """The module's Redis key names."""
    return KeySpace(settings.key_prefix, settings.partitions)


@pytest.fixture(scope="module")
def grpc_server(
    loop: LoopThread, settings: Settings, session_key: tuple[ApiKey, str]
) -> Iterator[tuple[EventsServer, int]]:
    """A real gRPC server queuing on the cluster, which holds the session's API key."""
    store_key(redis.RedisCluster.from_url(settings.redis_url), settings.key_prefix, session_key[0])
    server, port = loop.run(started_server(settings))
    yield server, port
    loop.run(server.stop(0))


@pytest.fixture(scope="module")
def channel(
    session_key: tuple[ApiKey, str], grpc_server: tuple[EventsServer, int]
) -> Iterator[grpc.Channel]:
    """A gRPC channel to the cluster-backed server, sending the session's key."""
    with keyed_channel(f"127.0.0.1:{grpc_server[1]}", session_key[1]) as chan:
        yield chan


@pytest.fixture(scope="module")
def stub(channel: grpc.Channel) -> events_pb2_grpc.EventsServiceStub:
    """EventsService client of the cluster-backed server."""
    return events_pb2_grpc.EventsServiceStub(channel)


@pytest.fixture
def rdb(
    valkey_cluster: ValkeyCluster, settings: Settings, session_key: tuple[ApiKey, str]
) -> Iterator[RedisCluster]:
    """A cluster client; every key of the module's prefix is gone before each test, but for
    the session's API key, which is in force."""
    client = RedisCluster.from_url(valkey_cluster.url, socket_timeout=5)
    for key in client.scan_iter(match=f"{settings.key_prefix}:*", count=1000):
        client.unlink(key)
    store_key(RedisCluster.from_url(valkey_cluster.url), settings.key_prefix, session_key[0])
    yield client
    client.close()


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


# --- cluster specifics ------------------------------------------------------------------


def node_of(valkey_cluster: ValkeyCluster, keys: KeySpace, partition: int) -> int:
    """Index of the node serving the partition."""
    return valkey_cluster.node_of_slot(key_slot(keys.stream(partition).encode()))


def user_per_partition(keys: KeySpace) -> dict[int, str]:
    """A user id (of tenant shop-a) routed to each partition."""
    users: dict[int, str] = {}
    n = 0
    while len(users) < keys.partitions:
        user = f"user-{n}"
        users.setdefault(partition_for(ev(user_id=user), keys.partitions), user)
        n += 1
    return users


def crossslot_errors(valkey_cluster: ValkeyCluster) -> list[int]:
    """CROSSSLOT replies each node sent since its stats were last reset."""
    counts = []
    for index in range(len(valkey_cluster.nodes)):
        with valkey_cluster.client(index) as node:
            stats = node.info("errorstats").get("errorstat_CROSSSLOT", {"count": 0})
            counts.append(int(stats["count"]))
    return counts


def test_every_key_of_a_partition_is_in_one_slot_and_partitions_cover_every_node(
    valkey_cluster: ValkeyCluster, keys: KeySpace
) -> None:
    for partition in range(keys.partitions):
        slot = key_slot(keys.stream(partition).encode())
        others = (
            keys.dedup(partition, "a:b", "c"),
            keys.dead_letters(partition, "analytics"),
            keys.owner(partition, "analytics"),
        )
        assert {key_slot(key.encode()) for key in others} == {slot}
    nodes = {node_of(valkey_cluster, keys, p) for p in range(keys.partitions)}
    assert nodes == {0, 1, 2}


@pytest.mark.slow
def test_ten_thousand_events_split_over_the_nodes_with_no_crossslot(
    stub: events_pb2_grpc.EventsServiceStub,
    rdb: RedisCluster,
    settings: Settings,
    keys: KeySpace,
    valkey_cluster: ValkeyCluster,
) -> None:
    with valkey_cluster.client(0) as node:
        # The counter below does see a cross-slot command...
        with pytest.raises(redis.ResponseError, match="same slot"):
            node.mset({"{a}x": 1, "{b}y": 2})
        assert crossslot_errors(valkey_cluster)[0] == 1
    for index in range(len(valkey_cluster.nodes)):
        with valkey_cluster.client(index) as node:
            node.config_resetstat()

    expected: Counter[int] = Counter()
    for batch in range(100):
        events = [
            ev(tenant=f"shop-{i % 7}", user_id=f"u-{batch}-{i}", deduplication_id=f"{batch}-{i}")
            for i in range(100)
        ]
        for event in events:
            expected[node_of(valkey_cluster, keys, partition_for(event, keys.partitions))] += 1
        reply = send(stub, *events)
        assert reply.accepted == 100
    retry = ev(tenant="shop-3", user_id="u-0-3", deduplication_id="0-3")
    assert statuses(send(stub, retry)) == [DUPLICATE]

    # Counted on each node itself, not through the cluster client.
    actual: Counter[int] = Counter()
    partitions_on: Counter[int] = Counter()
    for partition in range(keys.partitions):
        index = node_of(valkey_cluster, keys, partition)
        partitions_on[index] += 1
        with valkey_cluster.client(index) as node:
            actual[index] += node.xlen(keys.stream(partition))
    print("\nper-node split of 10,000 events (16 partitions, 3 nodes):")
    for index in sorted(actual):
        print(
            f"  node {index} (slots {valkey_cluster.ranges[index][0]}-"
            f"{valkey_cluster.ranges[index][1]}): {partitions_on[index]} partitions,"
            f" {actual[index]} events ({actual[index] / 100:.1f}%)"
        )
    assert actual == expected
    assert sum(actual.values()) == 10_000
    assert all(actual[index] > 0 for index in range(3))
    assert crossslot_errors(valkey_cluster) == [0, 0, 0]

    # What operators see: the same split, by `events-server partitions`.
    shown = run_events_server(settings, "partitions", "--redis-cluster").stdout
    for index, node in enumerate(valkey_cluster.nodes):
        summary = (
            f"127.0.0.1:{node.port}: {partitions_on[index]} partitions, {actual[index]} entries"
        )
        assert summary in shown


@pytest.mark.slow
def test_a_dead_node_fails_only_its_partitions_and_the_server_recovers(
    stub: events_pb2_grpc.EventsServiceStub,
    channel: grpc.Channel,
    rdb: RedisCluster,
    keys: KeySpace,
    valkey_cluster: ValkeyCluster,
) -> None:
    users = user_per_partition(keys)
    victim = 1
    dead = {p for p in range(keys.partitions) if node_of(valkey_cluster, keys, p) == victim}
    live_user, dead_user = users[min(set(users) - dead)], users[min(dead)]
    valkey_cluster.nodes[victim].kill()
    try:
        for partition, user in sorted(users.items()):
            if partition in dead:
                with pytest.raises(grpc.RpcError) as caught:
                    send(stub, ev(user_id=user))
                assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, partition
            else:
                assert statuses(send(stub, ev(user_id=user))) == [ACCEPTED], partition
        # A call touching both: the live node queued its part, the call still failed.
        with pytest.raises(grpc.RpcError) as caught:
            send(
                stub,
                ev(user_id=live_user, deduplication_id="mixed-1"),
                ev(user_id=dead_user, deduplication_id="mixed-2"),
            )
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        # The other nodes still serve, so the server stays in the load balancer.
        time.sleep(0.3)
        assert health_of(channel) == SERVING
    finally:
        valkey_cluster.restart(victim)

    # The restarted node lost its data and script cache (no persistence here): the
    # server reconnects and reloads the script by itself.
    def dead_partition_works() -> bool:
        try:
            return statuses(send(stub, ev(user_id=dead_user))) == [ACCEPTED]
        except grpc.RpcError:
            return False

    recovery = eventually(dead_partition_works, within=10)
    print(f"\npartitions of the restarted node serve again {recovery:.2f}s after it is healthy")
    # The client's retry of the failed mixed call is safe: the part already queued is
    # a duplicate, the rest is queued now.
    retry = send(
        stub,
        ev(user_id=live_user, deduplication_id="mixed-1"),
        ev(user_id=dead_user, deduplication_id="mixed-2"),
    )
    assert statuses(retry) == [DUPLICATE, ACCEPTED]
    assert health_of(channel) == SERVING


@pytest.mark.slow
def test_a_replica_that_takes_over_a_dead_primary_gets_its_partitions(
    session_key: tuple[ApiKey, str],
    loop: LoopThread,
    settings: Settings,
    keys: KeySpace,
    tmp_path: Path,
) -> None:
    cluster = ValkeyCluster(tmp_path / "failover")
    cluster.start()
    try:
        replica = cluster.add_replica(1)
        own = settings.model_copy(update={"redis_url": cluster.url})
        store_key(redis.RedisCluster.from_url(cluster.url), own.key_prefix, session_key[0])
        server, port = loop.run(started_server(own))
        try:
            with keyed_channel(f"127.0.0.1:{port}", session_key[1]) as channel:
                stub = events_pb2_grpc.EventsServiceStub(channel)
                users = user_per_partition(keys)
                user = next(u for p, u in sorted(users.items()) if node_of(cluster, keys, p) == 1)
                assert statuses(send(stub, ev(user_id=user, deduplication_id="b"))) == [ACCEPTED]
                with cluster.client(1) as primary:
                    assert primary.wait(1, 5000) == 1  # the replica has the dedup key too

                cluster.nodes[1].kill()
                with pytest.raises(grpc.RpcError) as caught:
                    send(stub, ev(user_id=user))
                assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
                with redis.Redis(port=replica.port, socket_timeout=5) as promoted:
                    promoted.execute_command("CLUSTER", "FAILOVER", "TAKEOVER")

                def served() -> bool:
                    try:
                        return statuses(send(stub, ev(user_id=user))) == [ACCEPTED]
                    except grpc.RpcError:
                        return False

                # No restart of the server: it re-reads the slot map after failures.
                moved = eventually(served, within=10)
                print(f"\npartitions served by the promoted replica {moved:.2f}s after takeover")
                assert statuses(send(stub, ev(user_id=user, deduplication_id="b"))) == [DUPLICATE]
        finally:
            loop.run(server.stop(0))
    finally:
        cluster.stop()


@pytest.mark.slow
def test_consumers_trim_and_replay_work_on_the_cluster(
    stub: events_pb2_grpc.EventsServiceStub,
    rdb: RedisCluster,
    settings: Settings,
    keys: KeySpace,
    valkey_cluster: ValkeyCluster,
) -> None:
    for index in range(len(valkey_cluster.nodes)):
        with valkey_cluster.client(index) as node:
            node.config_resetstat()
    queued = produce(stub, 2_000, users=200)

    async def scenario(client: Any) -> tuple[list[Message], list[Message], Any, Any]:
        got: dict[str, list[Message]] = {"a": [], "b": []}
        consumers = {n: Consumer(client, keys, "g", name=n, settings=FAST) for n in got}

        def handler(name: str) -> Callable[[Message], Awaitable[None]]:
            async def handle(message: Message) -> None:
                if message.envelope.event.url == "n=7":
                    raise ValueError("poison")  # a dead letter after 3 deliveries
                got[name].append(message)

            return handle

        runs = [asyncio.create_task(c.run(handler(n))) for n, c in consumers.items()]
        await until(lambda: len(entries(got["a"] + got["b"])) == len(queued) - 1, within=30)
        for consumer in consumers.values():
            consumer.stop()
        await asyncio.gather(*runs)
        states = await group_states(client, keys)
        removed = await trim(client, keys)
        return got["a"], got["b"], states, removed

    got_a, got_b, states, removed = run(settings, scenario)
    # Which consumer got how much is a race on a run this short (one may finish
    # before the other joins); sharing is test_consumer's subject.
    assert len(entries(got_a + got_b)) == len(queued) - 1
    assert in_order(got_a)
    assert in_order(got_b)
    [state] = states
    assert (state.pending, state.lag, state.dead_letters) == (0, 0, 1)
    assert sum(removed.values()) == len(queued)
    assert sum(rdb.xlen(stream) for stream in keys.streams()) == 0

    async def replay(client: Any) -> dict[int, int]:
        return await replay_dead_letters(client, keys, "g")

    assert sum(run(settings, replay).values()) == 1
    assert crossslot_errors(valkey_cluster) == [0, 0, 0]


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


def test_tail_reads_every_partition_of_the_cluster(
    stub: events_pb2_grpc.EventsServiceStub,
    rdb: RedisCluster,
    settings: Settings,
    keys: KeySpace,
    valkey_cluster: ValkeyCluster,
) -> None:
    users = user_per_partition(keys)
    sent = send(stub, *(ev(user_id=user) for user in users.values()))
    shown = run_events_server(settings, "tail", "--redis-cluster").stdout
    lines = [json.loads(line) for line in shown.splitlines()]
    assert sorted((line["partition"], line["entry_id"]) for line in lines) == sorted(
        (r.partition, r.entry_id) for r in sent.results
    )
