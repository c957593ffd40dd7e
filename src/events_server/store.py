"""Dedup + enqueue on Redis Streams: one Lua script call per partition batch.

The script is the only writer of events. Per event it checks the tenant-scoped
dedup key, appends the envelope to the partition stream, and only then sets the
key, so an append that fails never leaves a key behind and the client's retry is
not mistaken for a duplicate.
"""

from __future__ import annotations

import hashlib
import random
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError

from events_server.config import Settings
from events_server.errors import StoreUnavailable
from events_server.keys import KeySpace
from events_server.pb import events_pb2 as pb

# KEYS[1]   partition stream
# KEYS[2..] dedup keys of the events that carry a deduplication_id
# ARGV[1]   dedup TTL, seconds
# ARGV[2..] per event: index into KEYS of its dedup key ("0": none), envelope bytes
# Returns a flat array: per event 1|0 (accepted|duplicate), then the entry id
# (the new one, or the one stored in the dedup key).
# Entries hold one field, 'e' (keys.ENVELOPE_FIELD): the Envelope bytes.
ENQUEUE_SCRIPT = """#!lua
-- The shebang makes Redis check memory before the script starts (flagless
-- scripts are checked at their first write): a full Redis refuses the whole batch.
local stream = KEYS[1]
-- Checked before any write: a script is not rolled back when a command fails,
-- so failing here keeps a batch all-or-nothing.
local kind = redis.call('TYPE', stream)['ok']
if kind ~= 'stream' and kind ~= 'none' then
  return redis.error_reply('WRONGTYPE ' .. stream .. ' holds a ' .. kind .. ', not a stream')
end
local ttl = ARGV[1]
local out = {}
for i = 2, #ARGV, 2 do
  local k = tonumber(ARGV[i])
  local seen = false
  if k > 0 then
    seen = redis.call('GET', KEYS[k])
  end
  if seen then
    out[#out + 1] = 0
    out[#out + 1] = seen
  else
    local id = redis.call('XADD', stream, '*', 'e', ARGV[i + 1])
    if k > 0 then
      redis.call('SET', KEYS[k], id, 'EX', ttl)
    end
    out[#out + 1] = 1
    out[#out + 1] = id
  end
end
return out
"""

ENQUEUE_SHA = hashlib.sha1(ENQUEUE_SCRIPT.encode()).hexdigest()


RedisClient = Redis | RedisCluster
"""Either client the service runs on: one Redis server, or a Redis Cluster (see ``connect``)."""


@dataclass(frozen=True, slots=True)
class Outcome:
    """What happened to one event: queued now, or already queued earlier."""

    accepted: bool
    entry_id: str
    partition: int


def connect(settings: Settings) -> RedisClient:
    """A Redis (or, with redis_cluster, a cluster) client bounded by the configured timeout."""
    if settings.redis_cluster:
        return RedisCluster.from_url(
            settings.redis_url,
            socket_timeout=settings.redis_timeout_seconds,
            socket_connect_timeout=settings.redis_timeout_seconds,
            max_connections=settings.redis_max_connections,  # per node
            # As below, no silent retries. The cluster client still follows MOVED/ASK
            # redirects: those replies mean the command did not run.
            retry=Retry(NoBackoff(), 0),
            # With one node down its slots are unreachable; the others must keep serving.
            require_full_coverage=False,
        )
    return Redis.from_url(
        settings.redis_url,
        socket_timeout=settings.redis_timeout_seconds,
        socket_connect_timeout=settings.redis_timeout_seconds,
        max_connections=settings.redis_max_connections,
        # No silent retries: after a lost reply the script may already have run,
        # and re-running it would queue id-less events twice. The caller's retry
        # (with the same deduplication_ids) is the safe one.
        retry=Retry(NoBackoff(), 0),
    )


def partition_for(event: pb.Event, partitions: int) -> int:
    """Stable partition of an event: same tenant and user (or session, ...) -> same stream."""
    for name in ("user_id", "session_id", "dsid", "deduplication_id"):
        if event.HasField(name):
            routing = f"{event.tenant}\x00{getattr(event, name)}".encode()
            return zlib.crc32(routing) % partitions
    # Nothing to keep in order and no id to find again: spread the load.
    return random.randrange(partitions)


class EventStore:
    """Appends envelopes to partition streams, dropping retried duplicates atomically."""

    def __init__(self, redis: Redis, keys: KeySpace, dedup_ttl_seconds: int) -> None:
        self._redis = redis
        self._keys = keys
        self._ttl = str(dedup_ttl_seconds).encode()

    @property
    def keys(self) -> KeySpace:
        """The key names this store writes."""
        return self._keys

    async def append(self, items: Sequence[tuple[int, pb.Event, bytes]]) -> list[Outcome]:
        """Queue (partition, event, envelope bytes) items; one script call per partition."""
        groups: dict[int, list[int]] = {}
        for index, (partition, _, _) in enumerate(items):
            groups.setdefault(partition, []).append(index)

        calls: list[tuple[int, list[int], list[Any]]] = []
        for partition, indexes in groups.items():
            keys: list[Any] = [self._keys.stream(partition)]
            args: list[Any] = [self._ttl]
            for index in indexes:
                _, event, payload = items[index]
                if event.HasField("deduplication_id"):
                    keys.append(self._keys.dedup(partition, event.tenant, event.deduplication_id))
                    args.append(len(keys))
                else:
                    args.append(0)
                args.append(payload)
            calls.append((partition, indexes, [len(keys), *keys, *args]))

        replies = await self._run(calls)
        outcomes: list[Outcome | None] = [None] * len(items)
        for (partition, indexes, _), reply in zip(calls, replies, strict=True):
            for n, index in enumerate(indexes):
                outcomes[index] = Outcome(
                    accepted=reply[2 * n] == 1,
                    entry_id=reply[2 * n + 1].decode(),
                    partition=partition,
                )
        return [o for o in outcomes if o is not None]

    async def _run(self, calls: list[tuple[int, list[int], list[Any]]]) -> list[Any]:
        """EVALSHA every call in one pipeline; load the script once if Redis lacks it."""
        try:
            replies = await self._pipeline(calls)
            if any(isinstance(r, NoScriptError) for r in replies):
                # NOSCRIPT means the call did not run, so running it again is safe.
                await self._redis.script_load(ENQUEUE_SCRIPT)
                redo = [i for i, r in enumerate(replies) if isinstance(r, NoScriptError)]
                for i, reply in zip(
                    redo, await self._pipeline([calls[i] for i in redo]), strict=True
                ):
                    replies[i] = reply
        except RedisError as exc:
            await self._forget_idle_connections()
            raise StoreUnavailable(f"redis: {type(exc).__name__}: {exc}") from exc
        for reply in replies:
            if isinstance(reply, Exception):
                raise StoreUnavailable(
                    f"redis refused the write: {type(reply).__name__}: {reply}"
                ) from reply
        return replies

    async def _pipeline(self, calls: list[tuple[int, list[int], list[Any]]]) -> list[Any]:
        async with self._redis.pipeline(transaction=False) as pipe:
            for _, _, argv in calls:
                pipe.execute_command("EVALSHA", ENQUEUE_SHA, *argv)
            return await pipe.execute(raise_on_error=False)

    async def _forget_idle_connections(self) -> None:
        # After a restart every pooled socket is dead; dropping the idle ones makes
        # the next calls reconnect instead of each failing once on a stale socket.
        await self._redis.connection_pool.disconnect(inuse_connections=False)

    async def ping(self) -> bool:
        """True when Redis answers."""
        try:
            return bool(await self._redis.ping())
        except RedisError:
            await self._forget_idle_connections()
            return False
