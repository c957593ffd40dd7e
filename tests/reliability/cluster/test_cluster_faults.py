"""The server on a real 3-node Valkey cluster under load and failure.

Ten thousand events split over the nodes, a dead node, a replica taking over, the
consumers' trim and replay. This folder's conftest.py puts the cluster in place of
the session's single Valkey.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis
from redis.cluster import RedisCluster

from events_server.consumer import Consumer, Message
from events_server.consumer.groups import group_states, replay_dead_letters, trim
from events_server.pb import events_pb2_grpc
from events_server.queue.keys import KeySpace
from events_server.server.auth import ApiKey
from events_server.server.routing import partition_for
from events_server.server.settings import Settings
from tests.harness.cluster import ValkeyCluster, crossslot_errors, node_of, user_per_partition
from tests.harness.consumers import FAST, entries, in_order, produce, run
from tests.harness.data import ev
from tests.harness.keys import store_key
from tests.harness.processes import run_events_server
from tests.harness.rpc import (
    ACCEPTED,
    DUPLICATE,
    SERVING,
    accepted_now,
    health_of,
    send,
    statuses,
)
from tests.harness.servers import LoopThread, serving_stub
from tests.harness.waiting import eventually, until


@pytest.mark.slow
@pytest.mark.usefixtures("rdb")
def test_ten_thousand_events_split_over_the_nodes_with_no_crossslot(
    stub: events_pb2_grpc.EventsServiceStub,
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
    recovery = eventually(lambda: accepted_now(stub, ev(user_id=dead_user)), within=10)
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
        with serving_stub(loop, own, session_key[1]) as (_, _, stub):
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

            # No restart of the server: it re-reads the slot map after failures.
            moved = eventually(lambda: accepted_now(stub, ev(user_id=user)), within=10)
            print(f"\npartitions served by the promoted replica {moved:.2f}s after takeover")
            assert statuses(send(stub, ev(user_id=user, deduplication_id="b"))) == [DUPLICATE]
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
