"""Consumers under test: events produced through the real server, and checks of their order."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import redis

from events_server.consumer import Consumer, ConsumerSettings, Message
from events_server.pb import events_pb2_grpc
from events_server.queue.connection import connect
from events_server.queue.keys import KeySpace
from events_server.server.settings import Settings
from tests.harness.data import ev
from tests.harness.rpc import send

T = TypeVar("T")

FAST = ConsumerSettings(
    batch_size=20,
    block_seconds=0.1,
    lease_seconds=1.0,
    claim_idle_seconds=0.3,
    max_deliveries=3,
    retry_delay_seconds=0.01,
)
"""Consumer settings that make a test's retries and reclaims take a moment, not minutes."""

Entry = tuple[int, str]
"""(partition, entry id): entry ids are unique within a partition only."""

Handling = tuple[int, int, str, int]
"""(monotonic ns, partition, entry id, deliveries): one line of a consumer worker's log."""


def produce(stub: events_pb2_grpc.EventsServiceStub, count: int, users: int = 20) -> set[Entry]:
    """Queue ``count`` events of ``users`` users through the real server."""
    queued: set[Entry] = set()
    for start in range(0, count, 100):
        events = [ev(user_id=f"user-{n % users}", url=f"n={n}") for n in range(start, start + 100)]
        queued |= {(r.partition, r.entry_id) for r in send(stub, *events[: count - start]).results}
    return queued


def entries(messages: Iterable[Message]) -> set[Entry]:
    """The distinct entries among the messages."""
    return {(m.partition, m.entry_id) for m in messages}


def entry_key(entry_id: str) -> tuple[int, int]:
    """An entry id as a sortable (ms, seq)."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq)


def in_order(messages: Iterable[Message]) -> bool:
    """True when each partition's messages come in increasing entry-id order."""
    last: dict[int, tuple[int, int]] = {}
    for message in messages:
        key = entry_key(message.entry_id)
        if key <= last.get(message.partition, (-1, -1)):
            return False
        last[message.partition] = key
    return True


def run(settings: Settings, scenario: Callable[[Any], Awaitable[T]]) -> T:
    """Run an async scenario with its own event loop and Redis client."""

    async def main() -> T:
        client = connect(settings.redis)
        try:
            return await asyncio.wait_for(scenario(client), 30)
        finally:
            await client.aclose()

    return asyncio.run(main())


async def take(consumer: Consumer, count: int) -> list[Message]:
    """Iterate until ``count`` messages were handled (each acknowledged), then stop."""
    got: list[Message] = []
    async for message in consumer:
        got.append(message)
        if len(got) == count:
            consumer.stop()
    return got


Handled = tuple[str, int]
"""(the event's url, deliveries) of one call of a handler."""


def handle(
    settings: Settings, keys: KeySpace, group: str, react: Callable[[Message, list[Handled]], bool]
) -> list[Handled]:
    """Run a consumer of ``group`` whose handler records each message, then calls ``react``.

    ``react`` fails the handling by raising, and stops the consumer by returning True.
    Every (url, deliveries) handled, in order.
    """
    seen: list[Handled] = []

    async def scenario(client: Any) -> None:
        consumer = Consumer(client, keys, group, settings=FAST)

        async def handler(message: Message) -> None:
            seen.append((message.envelope.event.url, message.deliveries))
            if react(message, seen):
                consumer.stop()

        await consumer.run(handler)

    run(settings, scenario)
    return seen


def pending(rdb: redis.Redis, keys: KeySpace, group: str) -> int:
    """Entries delivered to the group's consumers and not acknowledged, over all partitions."""
    return sum(int(rdb.xpending(stream, group)["pending"]) for stream in keys.streams())


def handled(logs: list[Path]) -> list[Handling]:
    """Every handling in every consumer worker's log, in time order."""
    lines = []
    for log in logs:
        if log.exists():
            for line in log.read_text().splitlines():
                ns, partition, entry_id, deliveries = line.split()
                lines.append((int(ns), int(partition), entry_id, int(deliveries)))
    return sorted(lines)


def out_of_order(lines: list[Handling], queued: set[Entry]) -> int:
    """Handlings of an entry while an older entry of its partition was not handled yet."""
    order: dict[int, list[str]] = defaultdict(list)
    for partition, entry_id in queued:
        order[partition].append(entry_id)
    position = {}
    for partition, ids in order.items():
        ids.sort(key=entry_key)
        position.update({(partition, entry_id): i for i, entry_id in enumerate(ids)})
    seen: dict[int, set[int]] = defaultdict(set)
    done: dict[int, int] = defaultdict(int)  # how many of the oldest are all handled
    violations = 0
    for _, partition, entry_id, _ in lines:
        index = position[(partition, entry_id)]
        if index > done[partition]:
            violations += 1
        seen[partition].add(index)
        while done[partition] in seen[partition]:
            done[partition] += 1
    return violations
