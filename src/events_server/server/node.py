"""The enqueue transport on one Redis server: hiredis-packed pipelines, then their confirmation."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Any

import hiredis
from redis.asyncio import Redis
from redis.exceptions import OutOfMemoryError, RedisError, ResponseError

from events_server.queue.lanes import Lanes
from events_server.queue.scripts import Command
from events_server.server.confirm import Confirmation
from events_server.server.errors import IngestError, StoreFull, StoreUnavailable
from events_server.server.script import ENQUEUE, Call


class NodeTransport:
    """Script calls on one server: all of a request's calls sent back to back on one connection."""

    one_node = True

    def __init__(
        self,
        redis: Redis,
        confirmation: Confirmation,
        *,
        observe_script: Callable[[float], None] | None = None,
        timeout_seconds: float = 2.0,
    ) -> None:
        self._redis = redis
        self._confirmation = confirmation
        self._observe_script = observe_script
        self._timeout = timeout_seconds
        pool = redis.connection_pool
        # Half the pool at most, as for one caller's turns: the rest is for the others.
        self._lanes = Lanes(pool, max(1, pool.max_connections // 2))
        kwargs = pool.connection_kwargs
        self.name = str(kwargs.get("path") or f"{kwargs.get('host')}:{kwargs.get('port')}")
        """The server, as named in logs and metrics."""

    async def run(
        self, calls: Sequence[Call], *, partial: bool = False, deadline: float | None = None
    ) -> list[Any]:
        """Every call in one pipeline (a second for any the server had no script for), each
        pipeline followed by the confirmation the writes need (see server/confirm.py).

        ``partial``: a call Redis refused (full, wrong type: it wrote nothing) has its
        IngestError as its reply instead of failing the others; a failure of the whole
        (connection, timeout, the writes not confirmed) is raised all the same.
        """

        async def send(commands: list[Command]) -> list[Any]:
            confirm = self._confirmation.command(deadline)
            if confirm is None:
                return await self._pipeline(commands)
            # Same connection, same send: the confirmation covers exactly the writes above
            # (and a duplicate's first copy, through the script's barrier write). A redo
            # may use another connection: each send's confirmation must hold.
            replies = await self._pipeline([*commands, confirm])
            if (short := self._confirmation.check(self.name, replies[-1])) is not None:
                raise short  # the whole pipeline's outcome is unknown: no redo either
            return replies[:-1]

        try:
            replies = await ENQUEUE.run_all(send, [argv for _, argv in calls])
            if partial:
                replies = [_refusal(r) if isinstance(r, Exception) else r for r in replies]
            else:
                _raise_refusal(replies)
        except RedisError as exc:
            await self.forget_idle_connections()
            raise StoreUnavailable(f"redis: {type(exc).__name__}: {exc}") from exc
        return replies

    async def _pipeline(self, commands: list[Command]) -> list[Any]:
        """Send the commands back to back on one connection; every reply, errors as exceptions.

        The commands are packed by hiredis in C: redis-py's asyncio client packs in Python,
        which cost a fifth of the server's CPU at 100 events a call.
        """
        packed = b"".join(hiredis.pack_command(command) for command in commands)
        return await self._roundtrip(packed, len(commands))

    async def _roundtrip(self, packed: bytes, count: int) -> list[Any]:
        """Send packed commands on one connection; read ``count`` replies."""
        started = time.perf_counter()
        replies = await self._lanes.roundtrip(packed, count)
        if self._observe_script is not None:
            self._observe_script(time.perf_counter() - started)
        return replies

    async def forget_idle_connections(self) -> None:
        # After a restart every pooled socket is dead; dropping the idle ones makes
        # the next calls reconnect instead of each failing once on a stale socket.
        await self._lanes.forget_idle()
        await self._redis.connection_pool.disconnect(inuse_connections=False)

    async def ping(self) -> bool:
        """True when Redis answers."""
        try:
            async with asyncio.timeout(self._timeout):
                return bool(await self._redis.ping())
        except (RedisError, TimeoutError):
            await self.forget_idle_connections()
            return False

    async def info(self, *sections: str) -> dict[str, dict[str, Any]] | None:
        """Redis INFO fields of the given sections, by server name (this one), or None when
        INFO is refused (ACLs).

        Raises RedisError or TimeoutError when Redis does not answer.
        """
        try:
            async with asyncio.timeout(self._timeout):
                found: dict[str, Any] = await self._redis.info(*sections)
                return {self.name: found}
        except ResponseError:
            return None


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
