"""Pipelined round trips on connections redis-py opened, driven directly.

redis-py's pool opens each connection (address, TLS, AUTH, SELECT, protocol: whatever
the URL says) and counts it against its bound; the write path then keeps it and writes
packed commands on its socket, reading the replies with a hiredis reader of its own.
That leaves out, per round trip, the pool's lock and health check, a task per command
for the write's timeout and a timeout scope per reply: about as much CPU as the rest of
a one-event write. The caller bounds the whole round trip in time (``EventStore``), and
a lane whose round trip did not complete is closed, never reused: its replies may still
be on their way.
"""

from __future__ import annotations

from typing import Any

import hiredis
from redis.asyncio import ConnectionPool
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError, InvalidResponse, RedisError, ResponseError

READ_SIZE = 65536

_MORE = object()
"""What the reader gives while a reply is incomplete (False is a RESP3 reply)."""


class Lane:
    """One pooled connection, taken out of redis-py's command path."""

    __slots__ = ("_parser", "_reader", "_writer", "connection")

    def __init__(self, connection: AbstractConnection) -> None:
        self.connection = connection
        # Set by connect(); redis-py's own streams (private, but stable from 5.x to 8.x).
        reader, writer = connection._reader, connection._writer
        if reader is None or writer is None:
            raise ConnectionError("the pool gave a connection that is not connected")
        self._reader = reader
        self._writer = writer
        self._parser = hiredis.Reader(
            protocolError=InvalidResponse,
            # redis-py's mapping of error replies: NOSCRIPT, OOM, LOADING ... as its classes.
            replyError=connection._parser.parse_error,
            notEnoughData=_MORE,
        )

    def fresh(self) -> bool:
        """Open, and nothing unasked for waiting on it (a closed socket, stray bytes)."""
        reader = self._reader
        return (
            not reader.at_eof()
            and reader.exception() is None
            and not self._parser.has_data()
            and not self._writer.is_closing()
        )

    async def exchange(self, packed: bytes, count: int) -> list[Any]:
        """Write ``packed`` (``count`` commands); their replies, error replies as values.

        Raises redis-py's ConnectionError when the socket fails or closes, and the error of
        a reply that is no command's refusal (LOADING, a broken reply): what redis-py
        raises for them.
        """
        self._writer.write(packed)
        parser, reader = self._parser, self._reader
        replies: list[Any] = []
        while len(replies) < count:
            reply = parser.gets()
            if reply is _MORE:
                try:
                    data = await reader.read(READ_SIZE)
                except OSError as error:
                    raise ConnectionError(f"Error while reading from redis: {error}") from error
                if not data:
                    raise ConnectionError("Connection closed by server.")
                parser.feed(data)
                continue
            if isinstance(reply, RedisError) and not isinstance(reply, ResponseError):
                raise reply
            replies.append(reply)
        return replies


class Lanes:
    """The write path's connections: taken from ``pool`` as needed, kept between round trips
    (at most ``keep`` idle), handed back closed when they fail or are forgotten."""

    def __init__(self, pool: ConnectionPool, keep: int) -> None:
        self._pool = pool
        self._keep = keep
        self._idle: list[Lane] = []

    async def roundtrip(self, packed: bytes, count: int) -> list[Any]:
        """Send packed commands on one lane; read ``count`` replies (see ``Lane.exchange``)."""
        lane = await self._take()
        try:
            replies = await lane.exchange(packed, count)
        except BaseException:
            # Replies may still be on their way (a timeout, a cancelled call): this socket
            # must never hand them to the next round trip.
            await self._close(lane)
            raise
        if len(self._idle) < self._keep:
            self._idle.append(lane)
        else:
            await self._pool.release(lane.connection)
        return replies

    async def _take(self) -> Lane:
        idle = self._idle
        while idle:
            lane = idle.pop()
            if lane.fresh():
                return lane
            await self._close(lane)
        # Connected and checked by the pool; MaxConnectionsError past its bound.
        connection = await self._pool.get_connection()  # type: ignore[no-untyped-call]
        try:
            return Lane(connection)
        except BaseException:
            await self._pool.release(connection)
            raise

    async def _close(self, lane: Lane) -> None:
        try:
            await lane.connection.disconnect(nowait=True)
        finally:
            await self._pool.release(lane.connection)

    async def forget_idle(self) -> None:
        """Close the idle lanes (after a restart every socket is dead)."""
        idle, self._idle = self._idle, []
        for lane in idle:
            await self._close(lane)
