"""The consumer library against real Valkey: groups, order, acks, retries, reclaim, dead letters."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import redis

from events_server.consumer import Consumer, Message
from events_server.consumer.groups import group_states, replay_dead_letters
from events_server.pb import events_pb2_grpc
from events_server.queue.keys import KeySpace
from events_server.server.settings import Settings
from tests.harness.consumers import (
    FAST,
    Handled,
    entries,
    handle,
    in_order,
    pending,
    produce,
    run,
    take,
)
from tests.harness.waiting import until


def test_a_consumer_creates_its_group_and_handles_every_partition_in_order(
    stub: events_pb2_grpc.EventsServiceStub, rdb: redis.Redis, settings: Settings, keys: KeySpace
) -> None:
    ids = produce(stub, 300)

    async def scenario(client: Any) -> list[Message]:
        async with Consumer(client, keys, "analytics", settings=FAST) as consumer:
            return await take(consumer, 300)

    messages = run(settings, scenario)
    assert len(messages) == 300
    assert entries(messages) == ids
    assert in_order(messages)
    assert {m.deliveries for m in messages} == {1}
    assert messages[0].envelope.event.tenant == "shop-a"
    assert all(len(rdb.xinfo_groups(stream)) == 1 for stream in keys.streams())
    assert pending(rdb, keys, "analytics") == 0  # each one acknowledged after the loop body


def test_a_loop_body_that_raises_leaves_the_entry_pending_for_the_next_consumer(
    stub: events_pb2_grpc.EventsServiceStub, rdb: redis.Redis, settings: Settings, keys: KeySpace
) -> None:
    produce(stub, 5, users=1)  # one partition, in order

    async def loop_body_raises_at_n2(consumer: Consumer) -> None:
        async for message in consumer:
            if message.envelope.event.url == "n=2":
                raise RuntimeError(message.entry_id)

    async def crash(client: Any) -> None:
        async with Consumer(client, keys, "g", name="first", settings=FAST) as consumer:
            with pytest.raises(RuntimeError):
                await loop_body_raises_at_n2(consumer)

    run(settings, crash)
    # Handed back on close: idle enough to be taken at once, not after claim_idle_seconds,
    # and counted as delivered only if the loop body saw it.
    [partition] = [p for p in range(keys.partitions) if rdb.xlen(keys.stream(p))]
    left: Any = rdb.xpending_range(keys.stream(partition), "g", "-", "+", 10)
    assert [(e["consumer"], e["times_delivered"]) for e in left] == [
        (b"first", 1),
        (b"first", 0),
        (b"first", 0),
    ]
    assert min(e["time_since_delivered"] for e in left) >= FAST.claim_idle_seconds * 1000

    async def again(client: Any) -> list[Message]:
        async with Consumer(client, keys, "g", name="second", settings=FAST) as consumer:
            return await take(consumer, 3)

    messages = run(settings, again)
    assert [m.envelope.event.url for m in messages] == ["n=2", "n=3", "n=4"]
    # n=2 was handed to the loop body once; n=3 and n=4 were read but never handed out.
    assert [m.deliveries for m in messages] == [2, 1, 1]
    assert pending(rdb, keys, "g") == 0


def test_a_failing_handler_is_retried_in_place_then_the_partition_goes_on(
    stub: events_pb2_grpc.EventsServiceStub, rdb: redis.Redis, settings: Settings, keys: KeySpace
) -> None:
    produce(stub, 4, users=1)

    def react(message: Message, seen: list[Handled]) -> bool:
        if message.envelope.event.url == "n=1" and message.deliveries < 3:
            raise ValueError("not yet")
        return len(seen) == 6

    seen = handle(settings, keys, "g", react)
    assert seen == [("n=0", 1), ("n=1", 1), ("n=1", 2), ("n=1", 3), ("n=2", 1), ("n=3", 1)]
    assert pending(rdb, keys, "g") == 0
    assert sum(rdb.xlen(keys.dead_letters(p, "g")) for p in range(keys.partitions)) == 0


def test_a_poison_entry_goes_to_the_dead_letters_after_max_deliveries_and_replays(
    stub: events_pb2_grpc.EventsServiceStub, rdb: redis.Redis, settings: Settings, keys: KeySpace
) -> None:
    produce(stub, 3, users=1)

    def react(message: Message, _: list[Handled]) -> bool:
        if message.envelope.event.url == "n=1":
            raise ValueError("cannot parse n=1")
        return message.envelope.event.url == "n=2"

    calls = handle(settings, keys, "g", react)
    assert calls == [("n=0", 1), ("n=1", 1), ("n=1", 2), ("n=1", 3), ("n=2", 1)]
    assert pending(rdb, keys, "g") == 0
    partition = next(p for p in range(keys.partitions) if rdb.xlen(keys.dead_letters(p, "g")))
    dead_letters: Any = rdb.xrange(keys.dead_letters(partition, "g"))
    [(_, dead)] = dead_letters
    assert dead[b"deliveries"] == b"3"
    assert dead[b"error"] == b"ValueError: cannot parse n=1"
    assert dead[b"group"] == b"g"

    async def states(client: Any) -> Any:
        return await group_states(client, keys)

    [state] = run(settings, states)
    assert (state.group, state.pending, state.lag, state.dead_letters) == ("g", 0, 0, 1)

    # A second group that handled everything is not bothered by g's replay.
    async def other(client: Any) -> list[Message]:
        async with Consumer(client, keys, "other", settings=FAST) as consumer:
            return await take(consumer, 3)

    assert len(run(settings, other)) == 3

    async def replay(client: Any) -> dict[int, int]:
        return await replay_dead_letters(client, keys, "g")

    assert run(settings, replay) == {partition: 1}
    assert rdb.xlen(keys.dead_letters(partition, "g")) == 0

    async def retried(client: Any) -> list[Message]:
        async with Consumer(client, keys, "g", settings=FAST) as consumer:
            return await take(consumer, 1)

    [message] = run(settings, retried)
    assert (message.envelope.event.url, message.deliveries) == ("n=1", 1)

    async def other_again(client: Any) -> list[Message]:
        consumer = Consumer(client, keys, "other", settings=FAST)
        got: list[Message] = []

        async def handler(message: Message) -> None:
            got.append(message)

        task = asyncio.create_task(consumer.run(handler))
        await asyncio.sleep(0.5)
        consumer.stop()
        await task
        return got

    assert run(settings, other_again) == []  # the replay was for g only...
    assert pending(rdb, keys, "other") == 0  # ...and "other" acknowledged it unseen


def test_a_dead_consumers_entries_are_reclaimed_after_the_idle_time_and_first(
    stub: events_pb2_grpc.EventsServiceStub, rdb: redis.Redis, settings: Settings, keys: KeySpace
) -> None:
    produce(stub, 6, users=1)
    partition = next(p for p in range(keys.partitions) if rdb.xlen(keys.stream(p)))
    stream = keys.stream(partition)
    for p in range(keys.partitions):
        rdb.xgroup_create(keys.stream(p), "g", id="0", mkstream=True)
    # A consumer that read three entries and died without acknowledging them.
    read_at = time.monotonic()
    rdb.xreadgroup("g", "ghost", {stream: ">"}, count=3)
    slow = FAST.model_copy(update={"claim_idle_seconds": 1.0})

    async def scenario(client: Any) -> list[tuple[float, Message]]:
        got: list[tuple[float, Message]] = []
        async with Consumer(client, keys, "g", settings=slow) as consumer:
            async for message in consumer:
                got.append((time.monotonic(), message))
                if len(got) == 6:
                    consumer.stop()
        return got

    got = run(settings, scenario)
    urls = [m.envelope.event.url for _, m in got]
    assert urls == [f"n={n}" for n in range(6)]  # the ghost's first, then the rest, in order
    assert [m.deliveries for _, m in got] == [2, 2, 2, 1, 1, 1]
    assert got[0][0] - read_at >= slow.claim_idle_seconds
    assert pending(rdb, keys, "g") == 0


def test_consumers_of_a_group_share_the_partitions_and_take_over_a_leaver(
    stub: events_pb2_grpc.EventsServiceStub, rdb: redis.Redis, settings: Settings, keys: KeySpace
) -> None:
    ids = produce(stub, 400)

    def owners() -> dict[int, str]:
        found: dict[int, Any] = {p: rdb.get(keys.owner(p, "g")) for p in range(keys.partitions)}
        return {p: owner.decode() for p, owner in found.items() if owner is not None}

    async def scenario(client: Any) -> tuple[list[Message], list[Message], list[dict[int, str]]]:
        got_a: list[Message] = []
        got_b: list[Message] = []
        seen_owners: list[dict[int, str]] = []

        async def slowly(into: list[Message]) -> Callable[[Message], Awaitable[None]]:
            async def handler(message: Message) -> None:
                into.append(message)
                await asyncio.sleep(0.002)

            return handler

        a = Consumer(client, keys, "g", name="a", settings=FAST)
        b = Consumer(client, keys, "g", name="b", settings=FAST)
        run_a = asyncio.create_task(a.run(await slowly(got_a)))
        run_b = asyncio.create_task(b.run(await slowly(got_b)))
        even = {"a": keys.partitions // 2, "b": keys.partitions // 2}
        await until(lambda: Counter(owners().values()) == even)
        seen_owners.append(owners())
        a.stop()  # a leaves cleanly: b takes everything that is left
        await run_a
        alone = {"b": keys.partitions}
        await until(lambda: entries(got_a + got_b) == ids and Counter(owners().values()) == alone)
        seen_owners.append(owners())
        b.stop()
        await run_b
        return got_a, got_b, seen_owners

    got_a, got_b, seen = run(settings, scenario)
    shared, alone = seen
    per_consumer = [sum(1 for o in shared.values() if o == name) for name in "ab"]
    assert per_consumer == [keys.partitions // 2] * 2
    assert set(alone.values()) == {"b"}
    assert len(alone) == keys.partitions
    assert entries(got_a + got_b) == ids
    assert in_order(got_a)
    assert in_order(got_b)
    assert pending(rdb, keys, "g") == 0
