"""Reading the partition streams back in entry-id order, on one Redis or a cluster."""

from __future__ import annotations

import asyncio
import heapq
from collections.abc import AsyncIterator, Sequence
from typing import Any

from redis.asyncio import RedisCluster

from events_server.queue.connection import RedisClient
from events_server.queue.keys import ENVELOPE_FIELD, KeySpace

PAGE = 500
"""Entries fetched per stream per round trip when reading the whole queue."""

FOLLOW_BLOCK_MS = 1000


def entry_key(entry_id: bytes) -> tuple[int, int]:
    """A stream entry id as a sortable (milliseconds, sequence) pair."""
    ms, _, seq = entry_id.partition(b"-")
    return int(ms), int(seq)


def entries(reply: Any) -> list[tuple[bytes, bytes]]:
    """(entry id, envelope bytes) pairs of an XRANGE/XREVRANGE reply."""
    return [(entry_id, fields[ENVELOPE_FIELD]) for entry_id, fields in reply or ()]


def partition_of(stream: str) -> int:
    """The partition number in a stream name (``ev:{p7}:events`` -> 7)."""
    return int(stream.split("{p", 1)[1].split("}", 1)[0])


async def partition_streams(redis: RedisClient, keys: KeySpace) -> list[str]:
    """The configured partition streams plus any left over from another partition count."""
    found = {keys.stream(p) for p in range(keys.partitions)}
    pattern = f"{keys.prefix}:{{p*}}:events"
    async for name in redis.scan_iter(match=pattern, count=1000, _type="STREAM"):
        found.add(name.decode())
    return sorted(found, key=partition_of)


async def read_all(
    redis: RedisClient, streams: Sequence[str]
) -> AsyncIterator[tuple[str, bytes, bytes]]:
    """Every entry of every stream, oldest first (a k-way merge over paged XRANGEs)."""
    cursors = dict.fromkeys(streams, "-")
    pending: dict[str, int] = {}  # entries of each stream still in the heap
    heap: list[tuple[tuple[int, int], str, bytes, bytes]] = []

    async def refill(stream: str) -> None:
        page = entries(await redis.xrange(stream, min=cursors[stream], max="+", count=PAGE))
        for entry_id, payload in page:
            heapq.heappush(heap, (entry_key(entry_id), stream, entry_id, payload))
        if page:
            cursors[stream] = "(" + page[-1][0].decode()
        pending[stream] = len(page)

    for stream in streams:
        await refill(stream)
    while heap:
        _, stream, entry_id, payload = heapq.heappop(heap)
        yield stream, entry_id, payload
        pending[stream] -= 1
        if pending[stream] == 0:
            await refill(stream)


async def read_last(
    redis: RedisClient, streams: Sequence[str], count: int
) -> list[tuple[str, bytes, bytes]]:
    """The newest ``count`` entries across all streams, oldest first."""
    if count <= 0:
        return []
    newest: list[tuple[tuple[int, int], str, bytes, bytes]] = []
    for stream in streams:
        for entry_id, payload in entries(await redis.xrevrange(stream, count=count)):
            newest.append((entry_key(entry_id), stream, entry_id, payload))
    newest.sort()
    return [(s, i, p) for _, s, i, p in newest[-count:]]


async def read_new(redis: RedisClient, last_seen: dict[Any, Any]) -> list[Any]:
    """Entries after ``last_seen`` of each stream, waiting up to FOLLOW_BLOCK_MS for some."""
    if isinstance(redis, RedisCluster):
        # One stream per XREAD: the partitions live in different slots.
        replies: list[Any] = await asyncio.gather(
            *(redis.xread({s: i}, block=FOLLOW_BLOCK_MS) for s, i in last_seen.items())
        )
        return [stream for reply in replies for stream in reply or ()]
    reply: Any = await redis.xread(last_seen, block=FOLLOW_BLOCK_MS)
    return list(reply or ())
