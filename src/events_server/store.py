"""Dedup + enqueue on Redis Streams: one Lua script call per partition batch.

The script is the only writer of events. Per event it checks the tenant-scoped
dedup key, appends the envelope to the partition stream, and only then sets the
key, so an append that fails never leaves a key behind and the client's retry is
not mistaken for a duplicate.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
import zlib
from collections.abc import Callable, Sequence
from typing import Any, Literal

import hiredis
from redis.asyncio import Redis, RedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, OutOfMemoryError, RedisError, ResponseError

from events_server.config import Settings
from events_server.errors import StoreFull, StoreUnavailable
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

ENQUEUE_SHA = hashlib.sha1(ENQUEUE_SCRIPT.encode()).hexdigest().encode()


RedisClient = Redis | RedisCluster
"""Either client the service runs on: one Redis server, or a Redis Cluster (see ``connect``)."""

Item = tuple[int, str, str | None, bytes]
"""One event to queue: (partition, tenant, deduplication_id or None, envelope bytes)."""

Outcome = tuple[bool, str, int]
"""What happened to one event: (accepted now? else a duplicate, entry id, partition)."""

NOT_RUN: Outcome = (False, "", -1)


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


Call = tuple[int, list[int], list[Any]]
"""One script call: (partition, indexes of its items in the request, EVALSHA arguments)."""


class EventStore:
    """Appends envelopes to partition streams, dropping retried duplicates atomically."""

    def __init__(
        self,
        redis: Redis,
        keys: KeySpace,
        dedup_ttl_seconds: int,
        *,
        observe_script: Callable[[float], None] | None = None,
        timeout_seconds: float = 2.0,
        durability: Literal["none", "fsync"] = "none",
    ) -> None:
        self._redis = redis
        self._keys = keys
        self._ttl = str(dedup_ttl_seconds).encode()
        self._observe_script = observe_script
        self._timeout = timeout_seconds
        self._fsync = durability == "fsync"
        # WAITAOF numlocal=1 numreplicas=0: block until the local AOF holds every write
        # this connection made; its own timeout (ms) ends it before ours, with a reply.
        waitaof: tuple[Any, ...] = (b"WAITAOF", 1, 0, max(1, int(timeout_seconds * 1000) - 50))
        self._waitaof = hiredis.pack_command(waitaof)
        self.refusal: str | None = None
        """Why writes are refused before reaching Redis (set by the readiness probe), or None."""

    @property
    def keys(self) -> KeySpace:
        """The key names this store writes."""
        return self._keys

    async def append(self, items: Sequence[Item]) -> list[Outcome]:
        """Queue items, in order per partition; one script call per partition, pipelined."""
        groups: dict[int, tuple[list[int], list[Any], list[Any]]] = {}
        for index, (partition, tenant, dedup_id, payload) in enumerate(items):
            group = groups.get(partition)
            if group is None:
                group = groups[partition] = ([], [self._keys.stream(partition)], [self._ttl])
            indexes, keys, args = group
            indexes.append(index)
            if dedup_id is None:
                args.append(0)
            else:
                keys.append(self._keys.dedup(partition, tenant, dedup_id))
                args.append(len(keys))
            args.append(payload)

        calls = [
            (partition, indexes, [len(keys), *keys, *args])
            for partition, (indexes, keys, args) in groups.items()
        ]
        if self.refusal is not None:
            raise StoreUnavailable(self.refusal)
        try:
            # One bound for the whole write (connect, scripts, reload, WAITAOF): socket
            # timeouts apply per read, so a hung Redis could otherwise cost several.
            async with asyncio.timeout(self._timeout):
                replies = await self._run(calls)
        except TimeoutError as exc:
            await self._forget_idle_connections()
            raise StoreUnavailable(
                f"redis: no answer within {self._timeout:g}s (the write may or may not have"
                " happened; retrying with the same deduplication_ids is safe)"
            ) from exc
        outcomes: list[Outcome] = [NOT_RUN] * len(items)
        for (partition, indexes, _), reply in zip(calls, replies, strict=True):
            for n, index in enumerate(indexes):
                outcomes[index] = (reply[2 * n] == 1, reply[2 * n + 1].decode(), partition)
        return outcomes

    async def _run(self, calls: list[Call]) -> list[Any]:
        """EVALSHA every call in one pipeline; load the script once if Redis lacks it."""
        try:
            replies, unsynced = await self._pipeline(calls)
            if any(isinstance(r, NoScriptError) for r in replies):
                # NOSCRIPT means the call did not run, so running it again is safe.
                await self._redis.script_load(ENQUEUE_SCRIPT)
                redo = [i for i, r in enumerate(replies) if isinstance(r, NoScriptError)]
                again, unsynced_again = await self._pipeline([calls[i] for i in redo])
                for i, reply in zip(redo, again, strict=True):
                    replies[i] = reply
                # The redo may have used another connection: both WAITAOFs must confirm.
                unsynced = unsynced or unsynced_again
            _raise_refusal(replies)
            if unsynced is not None:
                raise StoreUnavailable(unsynced)
            if self._fsync:
                duplicated = [c[0] for c, r in zip(calls, replies, strict=True) if 0 in r[::2]]
                if duplicated:
                    await self._fsync_barrier(duplicated)
        except RedisError as exc:
            await self._forget_idle_connections()
            raise StoreUnavailable(f"redis: {type(exc).__name__}: {exc}") from exc
        return replies

    async def _fsync_barrier(self, partitions: list[int]) -> None:
        """Wait for the fsync of duplicates' first copies, which other connections wrote.

        WAITAOF waits for the last write of its own connection, and a duplicate
        writes nothing: its first copy may still be unsynced (its own WAITAOF timed
        out, the client retried). A write now, on each partition's node, moves this
        connection past that first copy, so WAITAOF covers it.
        """
        sets: list[tuple[Any, ...]] = [
            (b"SET", self._keys.fsync_barrier(p), b"1") for p in partitions
        ]
        packed = b"".join(hiredis.pack_command(command) for command in sets)
        replies = await self._roundtrip(packed + self._waitaof, len(partitions) + 1)
        _raise_refusal(replies[:-1])
        if (unsynced := _unsynced(replies[-1])) is not None:
            raise StoreUnavailable(unsynced)

    async def _pipeline(self, calls: list[Call]) -> tuple[list[Any], str | None]:
        """Send the calls back to back on one connection and read every reply.

        Returns the replies (error replies as exceptions) and, with fsync durability,
        why the AOF fsync was not confirmed (None when it was). The commands are packed
        by hiredis in C: redis-py's asyncio client packs in Python, which cost a fifth
        of the server's CPU at 100 events a call.
        """
        packed = b"".join(
            hiredis.pack_command((b"EVALSHA", ENQUEUE_SHA, *argv)) for _, _, argv in calls
        )
        if not self._fsync:
            return await self._roundtrip(packed, len(calls)), None
        # Same connection, same send: WAITAOF covers exactly the writes above.
        replies = await self._roundtrip(packed + self._waitaof, len(calls) + 1)
        return replies[:-1], _unsynced(replies[-1])

    async def _roundtrip(self, packed: bytes, count: int) -> list[Any]:
        """Send packed commands on one pooled connection; read ``count`` replies."""
        pool = self._redis.connection_pool
        connection = await pool.get_connection()  # type: ignore[no-untyped-call]
        complete = False
        try:
            started = time.perf_counter()
            await connection.send_packed_command(packed, check_health=False)
            replies = [await _reply(connection) for _ in range(count)]
            complete = True
            if self._observe_script is not None:
                self._observe_script(time.perf_counter() - started)
            return replies
        finally:
            if not complete:
                # Replies may still be on their way (a timeout or a cancelled call): this
                # connection must never hand them to the next caller.
                await connection.disconnect(nowait=True)
            await pool.release(connection)

    async def _forget_idle_connections(self) -> None:
        # After a restart every pooled socket is dead; dropping the idle ones makes
        # the next calls reconnect instead of each failing once on a stale socket.
        await self._redis.connection_pool.disconnect(inuse_connections=False)

    async def ping(self) -> bool:
        """True when Redis answers."""
        try:
            async with asyncio.timeout(self._timeout):
                return bool(await self._redis.ping())
        except (RedisError, TimeoutError):
            await self._forget_idle_connections()
            return False

    async def info(self, *sections: str) -> dict[str, Any] | None:
        """Redis INFO fields of the given sections, or None when INFO is refused (ACLs).

        Raises RedisError or TimeoutError when Redis does not answer.
        """
        try:
            async with asyncio.timeout(self._timeout):
                found: dict[str, Any] = await self._redis.info(*sections)
                return found
        except ResponseError:
            return None


async def _reply(connection: AbstractConnection) -> Any:
    try:
        return await connection.read_response()
    except ResponseError as refused:
        # An error reply is read in full: the connection stays usable.
        return refused


def _raise_refusal(replies: list[Any]) -> None:
    """Raise the error of the first write Redis refused, if any: StoreFull when it is full."""
    for reply in replies:
        if isinstance(reply, OutOfMemoryError):
            raise StoreFull(f"redis is full and refused the write: {reply}") from reply
        if isinstance(reply, Exception):
            raise StoreUnavailable(
                f"redis refused the write: {type(reply).__name__}: {reply}"
            ) from reply


def _unsynced(reply: Any) -> str | None:
    """Why a WAITAOF reply does not confirm the local fsync, or None when it does."""
    if isinstance(reply, ResponseError):
        return f"redis could not confirm the write is on disk (durability=fsync): {reply}"
    if not reply or int(reply[0]) < 1:
        return (
            "redis did not confirm the write is on disk in time (durability=fsync); the events"
            " are queued but not yet durable, retrying with the same deduplication_ids is safe"
        )
    return None
