"""The bridge's end of the batch link (events_server.wire.batch_link): its gathered batches
as frames on a plain TCP connection, where the server offers one; else on the gRPC stream.

``BatchLink.exchange`` is ``GatheredLink.exchange``'s twin: one batch, named by its
``call_id``, its answer or the error its call would have raised. The connection opens
when a batch needs it: a ticket asked of the server (BridgeIngest.OpenBatchLink, on the
channel that proves the bridge), then a connection to the offered port on the host of
``grpc_target``, the ticket as its first frame, and the server's ``ACCEPTED``.

Where there is no link (gRPC over TLS or a Unix socket here, a server that offers none,
an older server without the method, a port that cannot be reached), batches go on the
gRPC stream (``fallback``), for FALLBACK_SECONDS, with a warning, then the link is tried
again; each failure in a row doubles that, up to FALLBACK_MOST_SECONDS (a port a firewall
drops is a stall of HANDSHAKE_SECONDS for the batches that wait on the attempt).

When the connection breaks, every batch out on it fails as UNAVAILABLE, as on a broken
stream: nothing is sent again here. A server that stops says ``draining``: no
batch is sent on that connection any more, and the next opens a new one.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable, Coroutine
from typing import Any

import grpc

from events_server.pb import events_pb2 as pb
from events_server.pb import events_pb2_grpc
from events_server.wire.addresses import split_address
from events_server.wire.batch_link import HANDSHAKE_SECONDS, HEADER, MAX_ANSWER_BYTES, frame
from rest_bridge.gather_stream import BatchesOut, GatheredLink

log = logging.getLogger(__name__)

FALLBACK_SECONDS = 30.0
"""How long batches go on the gRPC stream after the link could not be opened..."""

FALLBACK_MOST_SECONDS = 900.0
"""...doubled for each failure in a row, up to this."""


def link_host(grpc_target: str, tls: bool) -> str | None:
    """The host the link is reached on: grpc_target's (None: TLS or a Unix socket, no link)."""
    split = None if tls else split_address(grpc_target)
    if split is None or not split[1]:
        return None
    return split[0] or None


_NO_LINK = (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.PERMISSION_DENIED)
"""An older server, or one that does not take this process for the bridge."""


def _unavailable(details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, details=details)


class _Connection(asyncio.Protocol):
    """One open link and the batches out on it."""

    def __init__(self) -> None:
        self.transport: Any = None
        self.out = BatchesOut()
        self.accepted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.over = False
        """Broken, closed or draining: no batch is sent on it any more."""
        self._buffer = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def send(
        self, request: pb.GatheredRequest, call_id: int, seconds: float
    ) -> asyncio.Future[pb.GatheredResponse]:
        answer = self.out.add(request, call_id, seconds)
        self.transport.write(frame(request.SerializeToString()))
        return answer

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        while len(buffer) >= HEADER.size:
            (size,) = HEADER.unpack_from(buffer)
            if size > MAX_ANSWER_BYTES:
                self._break(f"the events-server sent a frame of {size} bytes on the batch link")
                return
            if len(buffer) < HEADER.size + size:
                return
            raw = bytes(buffer[HEADER.size : HEADER.size + size])
            del buffer[: HEADER.size + size]
            if not self.accepted.done():
                if raw:  # the first answer is ACCEPTED: anything else is not our server
                    self._break("the batch link did not accept its ticket")
                    return
                self.accepted.set_result(None)
                continue
            self._answer(raw)

    def _answer(self, raw: bytes) -> None:
        try:
            response = pb.GatheredResponse.FromString(raw)
        except Exception:
            self._break("the events-server sent a frame that is not a GatheredResponse")
            return
        if response.draining:  # the server stops: later batches go on a new connection
            self.over = True
            self._close_if_idle()
            return
        self.out.answer(response)
        if self.over:
            self._close_if_idle()

    def _close_if_idle(self) -> None:
        if not self.out and self.transport is not None:
            self.transport.close()

    def _break(self, details: str) -> None:
        log.warning("%s: closed", details)
        self._fail(_unavailable(details))
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(_unavailable("the events-server closed the batch link"))

    def _fail(self, error: grpc.aio.AioRpcError) -> None:
        """The link is over: so is every batch out on it, as each call would have been."""
        self.over = True
        if not self.accepted.done():
            self.accepted.set_exception(error)
            self.accepted.exception()  # retrieved: whoever waited has it
        self.out.fail(error)


class BatchLink:
    """One link at a time to the server, for every batch of a bridge process."""

    def __init__(
        self,
        stub: Callable[[], events_pb2_grpc.BridgeIngestAsyncStub],
        host: str | None,
        fallback: GatheredLink,
        timeout_seconds: float,
    ) -> None:
        self._stub = stub
        self._host = host
        self._fallback = fallback
        self._timeout = timeout_seconds
        self._connection: _Connection | None = None
        self._opening: asyncio.Task[_Connection | None] | None = None
        self._ids = itertools.count(1)
        self.fallback_until = 0.0 if host is not None else float("inf")
        self._fallback_seconds = FALLBACK_SECONDS
        """Until when batches go on the gRPC stream (no link offered or reachable)."""

    def exchange(
        self, request: pb.GatheredRequest, seconds: float
    ) -> Coroutine[Any, Any, pb.GatheredResponse]:
        """The answer to one batch (raises grpc.aio.AioRpcError as its call would)."""
        return self._exchange(request, seconds)

    async def _exchange(self, request: pb.GatheredRequest, seconds: float) -> pb.GatheredResponse:
        connection = self._connection
        if connection is None or connection.over:
            connection = await self._open()
            if connection is None:
                return await self._fallback.exchange(request, seconds)
        return await connection.send(request, next(self._ids), seconds)

    async def _open(self) -> _Connection | None:
        """The open link (one opening shared by every batch that waits for it), or None."""
        if self.fallback_until > asyncio.get_running_loop().time():
            return None
        if self._opening is None:
            self._opening = asyncio.get_running_loop().create_task(self._connect())
        opening = self._opening
        try:
            return await asyncio.shield(opening)
        finally:
            if opening.done() and self._opening is opening:
                self._opening = None

    async def _connect(self) -> _Connection | None:
        loop = asyncio.get_running_loop()
        assert self._host is not None
        try:
            offer = await self._stub().OpenBatchLink(pb.BatchLinkRequest(), timeout=self._timeout)
        except grpc.aio.AioRpcError as error:
            if error.code() not in _NO_LINK:
                return None  # the server unreachable: the stream fails as the link would
            self._without_link(error.details() or error.code().name)
            return None
        if not offer.port:
            self._without_link("it offers none")
            return None
        connection: _Connection | None = None
        try:
            async with asyncio.timeout(HANDSHAKE_SECONDS):
                _, connection = await loop.create_connection(_Connection, self._host, offer.port)
                connection.transport.write(frame(offer.ticket))
                await connection.accepted
        except (grpc.aio.AioRpcError, OSError, TimeoutError) as error:
            if connection is not None and connection.transport is not None:
                connection.transport.abort()
            why = error.details() if isinstance(error, grpc.aio.AioRpcError) else repr(error)
            self._without_link(f"port {offer.port} on {self._host}: {why}")
            return None
        self._connection = connection
        self._fallback_seconds = FALLBACK_SECONDS
        return connection

    def _without_link(self, why: str) -> None:
        seconds = self._fallback_seconds
        log.warning(
            "no batch link to the events-server (%s): batches go on the gRPC stream for %g s",
            why,
            seconds,
        )
        self.fallback_until = asyncio.get_running_loop().time() + seconds
        self._fallback_seconds = min(seconds * 2, FALLBACK_MOST_SECONDS)

    def close(self) -> None:
        """Close the link (the bridge stops; what is out on it fails as UNAVAILABLE)."""
        if self._connection is not None and self._connection.transport is not None:
            self._connection.transport.abort()
