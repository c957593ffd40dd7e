"""The server's end of the batch link (events_server.wire.batch_link): the bridge's gathered
batches as frames on a plain TCP connection, worked as StreamGathered works them.

Who may connect: whoever presents, as its first frame and within HANDSHAKE_SECONDS, a
ticket this process handed out on BridgeIngest.OpenBatchLink, which the access
interceptor lets only the bridge call. A ticket is good once and for TICKET_SECONDS.
A connection without one costs a socket and a timer: at most MAX_HANDSHAKES wait at
once, MAX_HANDSHAKES_PER_PEER from one address (more are closed on arrival), and nothing
it sends is read past the ticket's size.

Offered only where gRPC is plaintext (with TLS the link would carry in the clear what the
bridge otherwise sends encrypted) and on a TCP listener (a Unix socket's gRPC has none).

Bounded like a stream: at most STREAM_BATCHES batches of a connection are worked at once,
and past it, or while the bridge does not read its answers (the transport's write buffer
is full), the connection is not read, so TCP's flow control holds the bridge. A frame
over ``max_frame`` bytes (the gRPC receive limit) or that is not a GatheredRequest ends
the connection, as it would end a stream; the bridge fails what it had out on it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hmac
import ipaddress
import logging
import secrets
import time
from typing import Any

import grpc

from events_server.ops.logs import IpMode, client_ip_for_log
from events_server.pb import events_pb2 as pb
from events_server.server import identity
from events_server.server.errors import IngestError
from events_server.server.gathered import decode
from events_server.server.gathered_stream import STREAM_BATCHES, GatheredStreams
from events_server.server.metrics import ServerMetrics
from events_server.wire.addresses import split_address
from events_server.wire.batch_link import (
    ACCEPTED,
    HANDSHAKE_SECONDS,
    HEADER,
    TICKET_BYTES,
    TICKET_SECONDS,
    frame,
)
from events_server.wire.metadata import BATCH_LINK_METHOD

log = logging.getLogger(__name__)

MAX_HANDSHAKES = 64
"""Connections waiting to send their ticket at once; more are closed as they come."""

MAX_HANDSHAKES_PER_PEER = 8
"""...and from one address: one host's flood leaves the other hosts (the bridge's) room."""

MAX_TICKETS = 64
"""Tickets handed out and not used yet; past it the oldest is void."""

REFUSAL_LOG_SECONDS = 10.0
"""Refused connections are logged at most once in this, with how many there were."""


def link_host(grpc_addr: str) -> str | None:
    """Where the link listens: the gRPC listener's host (None: a Unix socket, no link)."""
    split = split_address(grpc_addr)
    return None if split is None else split[0] or "0.0.0.0"


def _peer(address: Any) -> tuple[str, str]:
    """A connection's peer as gRPC's context.peer() spells it, and its address."""
    if not isinstance(address, tuple) or len(address) < 2:
        return "unknown", "unknown"
    host, port = address[0], address[1]
    try:
        v6 = ipaddress.ip_address(host).version == 6
    except ValueError:
        v6 = False
    return (f"ipv6:[{host}]:{port}" if v6 else f"ipv4:{host}:{port}"), host


class BatchLinks:
    """The batch link's listener, its tickets and its connections (one per server process)."""

    def __init__(
        self,
        streams: GatheredStreams,
        host: str | None,
        max_frame: int,
        ip_mode: IpMode,
        metrics: ServerMetrics,
    ) -> None:
        self.streams = streams
        self._accepted = metrics.batch_links.labels("accepted")
        self._refusals = metrics.batch_links.labels("refused")
        self._host = host
        self.max_frame = max_frame
        self.ip_mode = ip_mode
        self._listener: asyncio.Server | None = None
        self.port = 0
        """Where it listens (0: not listening, nothing offered)."""
        self._tickets: collections.OrderedDict[bytes, float] = collections.OrderedDict()
        self.handshaking = 0
        self._handshaking_from: collections.Counter[str] = collections.Counter()
        self.links: set[_Link] = set()
        self.draining = False
        self._refused = 0
        self._refusal_logged = 0.0

    async def start(self) -> None:
        """Listen (on the gRPC listener's host, a port of the system's choosing)."""
        if self._host is None:
            return
        loop = asyncio.get_running_loop()
        self._listener = await loop.create_server(lambda: _Link(self), self._host, 0)
        self.port = self._listener.sockets[0].getsockname()[1]
        log.info("batch link on port %d (for the REST bridge's batches)", self.port)

    async def OpenBatchLink(self, request: object, context: Any) -> pb.BatchLinkOffer:
        """A ticket for the link (the access interceptor lets only the bridge in)."""
        caller = identity.current.get()
        if caller is None or not caller.bridge:
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{BATCH_LINK_METHOD} is for the REST bridge only, and this caller is not it",
            )
        if self.draining:  # as a stopping server refuses a new stream
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the events-server is stopping")
        if not self.port:
            return pb.BatchLinkOffer()
        ticket = secrets.token_bytes(TICKET_BYTES)
        tickets = self._tickets
        tickets[ticket] = time.monotonic() + TICKET_SECONDS
        while len(tickets) > MAX_TICKETS:
            tickets.popitem(last=False)
        return pb.BatchLinkOffer(
            port=self.port, ticket=ticket, ticket_ms=int(TICKET_SECONDS * 1000)
        )

    def take(self, ticket: bytes) -> bool:
        """Whether ``ticket`` is one handed out, unused and in time (it is used up now)."""
        now = time.monotonic()
        for known in list(self._tickets):
            if hmac.compare_digest(known, ticket):
                return self._tickets.pop(known) > now
        return False

    def refused(self, why: str, peer: str) -> None:
        """A connection closed as not the bridge's (logged, not on every one: a flood)."""
        self._refused += 1
        self._refusals.inc()
        now = time.monotonic()
        if now - self._refusal_logged >= REFUSAL_LOG_SECONDS:
            log.warning(
                "batch link: refused %d connection(s), the last from %s: %s",
                self._refused,
                peer,
                why,
            )
            self._refused = 0
            self._refusal_logged = now

    def wait_for_ticket(self, host: str) -> bool:
        """Whether a new connection from ``host`` may wait for its ticket (it is counted)."""
        if (
            self.draining
            or self.handshaking >= MAX_HANDSHAKES
            or self._handshaking_from[host] >= MAX_HANDSHAKES_PER_PEER
        ):
            return False
        self.handshaking += 1
        self._handshaking_from[host] += 1
        return True

    def ticket_waited(self, host: str) -> None:
        """A connection no longer waits for its ticket (it gave one, or it is gone)."""
        self.handshaking -= 1
        self._handshaking_from[host] -= 1
        if not self._handshaking_from[host]:
            del self._handshaking_from[host]

    def accepted(self, link: _Link) -> None:
        """A connection gave a good ticket: it is a link."""
        self.links.add(link)
        self._accepted.inc()

    def drain(self) -> None:
        """The server stops: no new connections, and each link told to send no more."""
        self.draining = True
        if self._listener is not None:
            self._listener.close()
        for link in list(self.links):
            link.tell_draining()

    async def wait(self, grace: float) -> None:
        """Until every link's batches are answered, for ``grace`` seconds at most; then every
        connection is closed (what is still worked is cancelled, as grpc.aio's stop does)."""
        loop = asyncio.get_running_loop()
        ends = loop.time() + grace
        while (left := ends - loop.time()) > 0 and (
            working := [task for link in self.links for task in link.tasks]
        ):
            await asyncio.wait(working, timeout=left)
        for link in list(self.links):
            link.close()


class _Link(asyncio.Protocol):
    """One connection: its ticket first, then batches."""

    def __init__(self, links: BatchLinks) -> None:
        self._links = links
        self._transport: Any = None
        self._buffer = bytearray()
        self._accepted = False
        self._timer: asyncio.TimerHandle | None = None
        self._handshaking: str | None = None
        """While it waits to send its ticket: the address it came from."""
        self.tasks: set[asyncio.Task[None]] = set()
        self._reading = True
        self._write_paused = False
        self.closed = False
        self.working = 0
        self.draining = False
        self._peer = "unknown"
        self._client = ""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        self._peer, host = _peer(transport.get_extra_info("peername"))
        links = self._links
        if not links.wait_for_ticket(host):
            links.refused("too many connections without a ticket yet", self._peer)
            self.closed = True
            transport.abort()  # type: ignore[attr-defined]
            return
        self._handshaking = host
        self._client = client_ip_for_log(host, links.ip_mode)
        self._timer = asyncio.get_running_loop().call_later(HANDSHAKE_SECONDS, self._too_slow)

    def _handshake_over(self) -> None:
        if self._handshaking is not None:
            self._links.ticket_waited(self._handshaking)
            self._handshaking = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _too_slow(self) -> None:
        self._timer = None
        self._refuse("no ticket within the handshake's seconds")

    def _refuse(self, why: str) -> None:
        self._links.refused(why, self._peer)
        self.close()

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        self._buffer += data
        if not self._accepted:
            self._handshake()
        if self._accepted:
            self._work_frames()

    def _handshake(self) -> None:
        buffer = self._buffer
        if len(buffer) >= HEADER.size and HEADER.unpack_from(buffer)[0] != TICKET_BYTES:
            self._refuse("its first frame is not a ticket")
            return
        if len(buffer) > HEADER.size + TICKET_BYTES:  # nothing is sent before ACCEPTED
            self._refuse("it sent more than its ticket before the ticket was taken")
            return
        if len(buffer) < HEADER.size + TICKET_BYTES:
            return
        ticket = bytes(buffer[HEADER.size :])
        buffer.clear()
        if not self._links.take(ticket):
            self._refuse("its ticket is not one handed out, or it is used or out of time")
            return
        self._accepted = True
        self._handshake_over()
        self._links.accepted(self)
        self._transport.write(ACCEPTED)
        if self._links.draining:
            self.tell_draining()

    def _work_frames(self) -> None:
        buffer = self._buffer
        loop = asyncio.get_running_loop()
        while len(buffer) >= HEADER.size and self.working < STREAM_BATCHES:
            (size,) = HEADER.unpack_from(buffer)
            if size > self._links.max_frame:
                log.warning(
                    "batch link from %s: a frame of %d bytes, over the %d allowed: closed",
                    self._peer,
                    size,
                    self._links.max_frame,
                )
                self.close()
                return
            if len(buffer) < HEADER.size + size:
                break
            raw = bytes(buffer[HEADER.size : HEADER.size + size])
            del buffer[: HEADER.size + size]
            try:
                batch = decode(raw)
            except IngestError as error:  # not from our bridge: the link ends
                log.warning("batch link from %s: closed: %s", self._peer, error)
                self.close()
                return
            task = loop.create_task(
                self._links.streams.work_batch(self, batch, self._peer, self._client)
            )
            self.tasks.add(task)
            self.working += 1
            task.add_done_callback(self._done)
        self._flow()

    def _done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        self.working -= 1
        if not self.closed:
            self._work_frames()  # what waited in the buffer, then the socket again

    def _flow(self) -> None:
        # Read while below the bound and while the bridge reads its answers: else TCP's
        # window fills and holds the bridge's writes (no queue of batches here).
        wanted = self.working < STREAM_BATCHES and not self._write_paused
        if wanted != self._reading and not self.closed:
            self._reading = wanted
            if wanted:
                self._transport.resume_reading()
            else:
                self._transport.pause_reading()

    def pause_writing(self) -> None:
        self._write_paused = True
        self._flow()

    def resume_writing(self) -> None:
        self._write_paused = False
        if not self.closed:
            self._work_frames()

    async def write(self, response: pb.GatheredResponse) -> None:
        """One batch's answer (raises ConnectionError when the link is gone)."""
        if self.closed:
            raise ConnectionError("the batch link is closed")
        self._transport.write(frame(response.SerializeToString()))

    def tell_draining(self) -> None:
        if not self.draining and not self.closed:
            self.draining = True
            with contextlib.suppress(Exception):
                self._transport.write(frame(pb.GatheredResponse(draining=True).SerializeToString()))

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        links = self._links
        self._handshake_over()
        links.links.discard(self)
        for task in self.tasks:  # the bridge is gone: it fails these itself
            task.cancel()
