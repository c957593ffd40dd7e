"""What the server left in Redis: the one stream dumper, and the rejected-requests record."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis

from events_server.pb import events_pb2 as pb
from events_server.queue.keys import ENVELOPE_FIELD, KeySpace
from events_server.server.settings import Settings
from tests.harness.waiting import eventually

Client = redis.Redis | redis.RedisCluster


def dump(client: Client, keys: KeySpace) -> list[tuple[int, str, pb.Envelope]]:
    """Every entry of every partition stream, stream by stream: (partition, entry id, envelope).

    A partition whose key is absent, or not a stream (made a string by a fault test), has none.
    """
    found = []
    for partition in range(keys.partitions):
        if client.type(keys.stream(partition)) != b"stream":
            continue
        entries: Any = client.xrange(keys.stream(partition))
        for entry_id, fields in entries:
            envelope = pb.Envelope.FromString(fields[ENVELOPE_FIELD])
            found.append((partition, entry_id.decode(), envelope))
    return found


def queued(client: Client, keys: KeySpace) -> list[tuple[int, pb.Envelope]]:
    """Every envelope queued: (partition, envelope), stream by stream."""
    return [(partition, envelope) for partition, _, envelope in dump(client, keys)]


def stream_contents(client: Client, keys: KeySpace) -> dict[str, list[str]]:
    """deduplication_id -> entry ids holding it, over every partition stream."""
    found: dict[str, list[str]] = {}
    for _, entry_id, envelope in dump(client, keys):
        found.setdefault(envelope.event.deduplication_id, []).append(entry_id)
    return found


def orphan_dedup_keys(client: Client, keys: KeySpace) -> list[str]:
    """Dedup keys (of events and of transactions) whose entry id is on no stream: they would
    swallow a retry."""
    on_streams = {entry_id for _, entry_id, _ in dump(client, keys)}
    orphans = []
    for pattern in (keys.dedup_pattern(), keys.transaction_pattern()):
        for key in client.scan_iter(match=pattern, count=1000):
            value: Any = client.get(key)
            if value is None or value.decode() not in on_streams:
                orphans.append(key.decode())
    return orphans


def records(client: Client, keys: KeySpace, tenant: str) -> list[dict[bytes, bytes]]:
    """The tenant's rejected-request records, oldest first."""
    entries: Any = client.xrange(keys.rejected(tenant))
    return [fields for _, fields in entries]


def wait_for_records(
    client: Client, keys: KeySpace, tenant: str, count: int = 1
) -> list[dict[bytes, bytes]]:
    """The tenant's records once there are ``count`` (they are written in the background)."""
    eventually(lambda: int(client.xlen(keys.rejected(tenant))) >= count)
    return records(client, keys, tenant)


@dataclass(frozen=True)
class Queue:
    """The session's queue as a test sees it: settings, key names, a clean client, a key."""

    settings: Settings
    keys: KeySpace
    rdb: redis.Redis
    api_key: str
