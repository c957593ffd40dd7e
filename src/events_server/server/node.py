"""The enqueue transport on one Redis server: hiredis-packed pipelines, optional fsync."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

import hiredis
from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import OutOfMemoryError, RedisError, ResponseError

from events_server.queue.keys import KeySpace
from events_server.queue.scripts import Command
from events_server.server.errors import IngestError, StoreFull, StoreUnavailable
from events_server.server.script import ENQUEUE, Call


class NodeTransport:
    """Script calls on one server: all of a request's calls sent back to back on one connection."""

    one_node = True

    def __init__(
        self,
        redis: Redis,
        keys: KeySpace,
        *,
        observe_script: Callable[[float], None] | None = None,
        timeout_seconds: float = 2.0,
        durability: Literal["none", "fsync"] = "none",
    ) -> None:
        self._redis = redis
        self._keys = keys
        self._observe_script = observe_script
        self._timeout = timeout_seconds
        self._fsync = durability == "fsync"
        # WAITAOF numlocal=1 numreplicas=0: block until the local AOF holds every write
        # this connection made; its own timeout (ms) ends it before ours, with a reply.
        waitaof: tuple[Any, ...] = (b"WAITAOF", 1, 0, max(1, int(timeout_seconds * 1000) - 50))
        self._waitaof = hiredis.pack_command(waitaof)

    async def run(self, calls: Sequence[Call], *, partial: bool = False) -> list[Any]:
        """Every call in one pipeline (a second for any the server had no script for).

        ``partial``: a call Redis refused (full, wrong type: it wrote nothing) has its
        IngestError as its reply instead of failing the others; a failure of the whole
        (connection, timeout, fsync not confirmed) is raised all the same.
        """
        unsynced: list[str] = []

        async def send(commands: list[Command]) -> list[Any]:
            replies, why = await self._pipeline(commands)
            if why is not None:
                # A redo may use another connection: every WAITAOF must confirm.
                unsynced.append(why)
            return replies

        try:
            replies = await ENQUEUE.run_all(send, [argv for _, argv in calls])
            if partial:
                replies = [_refusal(r) if isinstance(r, Exception) else r for r in replies]
            else:
                _raise_refusal(replies)
            if unsynced:
                raise StoreUnavailable(unsynced[0])
            if self._fsync:
                duplicated = [
                    c[0]
                    for c, r in zip(calls, replies, strict=True)
                    if not isinstance(r, Exception) and 0 in r[::2]
                ]
                if duplicated:
                    await self._fsync_barrier(duplicated)
        except RedisError as exc:
            await self.forget_idle_connections()
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

    async def _pipeline(self, commands: list[Command]) -> tuple[list[Any], str | None]:
        """Send the commands back to back on one connection and read every reply.

        Returns the replies (error replies as exceptions) and, with fsync durability,
        why the AOF fsync was not confirmed (None when it was). The commands are packed
        by hiredis in C: redis-py's asyncio client packs in Python, which cost a fifth
        of the server's CPU at 100 events a call.
        """
        packed = b"".join(hiredis.pack_command(command) for command in commands)
        if not self._fsync:
            return await self._roundtrip(packed, len(commands)), None
        # Same connection, same send: WAITAOF covers exactly the writes above.
        replies = await self._roundtrip(packed + self._waitaof, len(commands) + 1)
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

    async def forget_idle_connections(self) -> None:
        # After a restart every pooled socket is dead; dropping the idle ones makes
        # the next calls reconnect instead of each failing once on a stale socket.
        await self._redis.connection_pool.disconnect(inuse_connections=False)

    async def ping(self) -> bool:
        """True when Redis answers."""
        try:
            async with asyncio.timeout(self._timeout):
                return bool(await self._redis.ping())
        except (RedisError, TimeoutError):
            await self.forget_idle_connections()
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


def _refusal(reply: Exception) -> IngestError:
    """What a write Redis refused means: StoreFull when it is full."""
    if isinstance(reply, IngestError):
        return reply
    if isinstance(reply, OutOfMemoryError):
        error: IngestError = StoreFull(f"redis is full and refused the write: {reply}")
    else:
        error = StoreUnavailable(f"redis refused the write: {type(reply).__name__}: {reply}")
    error.__cause__ = reply
    return error


def _raise_refusal(replies: list[Any]) -> None:
    """Raise the error of the first write Redis refused, if any: StoreFull when it is full."""
    for reply in replies:
        if isinstance(reply, Exception):
            raise _refusal(reply)


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
