"""The one TCP fault proxy: in front of Valkey (RESP) or of the gRPC server (HTTP/2).

Modes (switch at any time from the test's thread):

- ``pass``: bytes flow both ways.
- ``blackhole``: bytes are swallowed both ways, as on a network that drops every
  packet; connections stay open and nobody is told. On leaving the mode, every
  connection that lost bytes is closed (its protocol stream is broken).
- ``cut_reply``: requests flow upstream, but every reply is dropped and its
  connection reset the moment it starts: the work was done, the caller never hears
  of it. ``cut_next_reply()`` does that to the next reply only.

What a reply is depends on the protocol:

- ``resp`` (Valkey): the answer to a request that holds an ``EVALSHA`` (the enqueue
  script), so only script calls lose their replies.
- ``http2`` (gRPC): a HEADERS frame on a stream from the server, the start of an
  answer to a call, or a DATA frame, a message on a stream already answering (the
  bridge's gathered stream answers each batch so; a unary call's HEADERS come before its
  DATA, so it is cut where it always was). Server-to-client bytes are whole HTTP/2
  frames from the first byte (the server sends no preface), so they are split into
  frames as they come.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal
from urllib.parse import urlparse

from tests.harness.servers import LoopThread

Mode = Literal["pass", "blackhole", "cut_reply"]
Protocol = Literal["resp", "http2"]

CHUNK = 1 << 16
FRAME_HEADER = 9
HEADERS = 0x1
DATA = 0x0


class _Link:
    """One proxied connection: client side, upstream side, and what was seen on it."""

    def __init__(self, client: asyncio.StreamWriter, upstream: asyncio.StreamWriter) -> None:
        self.client = client
        self.upstream = upstream
        self.lost_bytes = False
        self.script_sent = False
        self.replies = b""  # http2: bytes of a frame not yet whole

    def reset(self) -> None:
        for writer in (self.client, self.upstream):
            writer.transport.abort()


class FaultProxy:
    """The proxy on its own event loop thread, listening on a free loopback port."""

    def __init__(self, upstream_host: str, upstream_port: int, protocol: Protocol = "resp") -> None:
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.protocol = protocol
        self.mode: Mode = "pass"
        self.cuts = 0
        """Replies dropped."""
        self.peak_connections = 0
        """Most client connections open at once."""
        self._armed = False
        self._links: set[_Link] = set()
        self._lock = threading.Lock()
        self._thread = LoopThread()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port: int = sock.getsockname()[1]
        self._server = self._thread.run(self._listen(sock))
        self.address = f"127.0.0.1:{self.port}"
        """host:port, for a gRPC channel."""
        self.url = f"redis://{self.address}/0"
        """A Redis URL, for a server's settings."""

    async def _listen(self, sock: socket.socket) -> asyncio.Server:
        return await asyncio.start_server(self._accept, sock=sock)

    def set_mode(self, mode: Mode) -> None:
        """Switch modes; leaving blackhole closes every connection that lost bytes."""
        with self._lock:
            self.mode = mode
            if mode != "blackhole":
                broken = [link for link in self._links if link.lost_bytes]
            else:
                broken = []
        for link in broken:
            self._thread.loop.call_soon_threadsafe(link.reset)

    def cut_next_reply(self) -> None:
        """Drop the connection carrying the next reply, then pass again."""
        with self._lock:
            self._armed = True

    @property
    def connections(self) -> int:
        """Client connections open now."""
        with self._lock:
            return len(self._links)

    def close(self) -> None:
        """Stop listening, reset every connection, stop the loop thread."""

        async def shut() -> None:
            self._server.close()
            for link in list(self._links):
                link.reset()
            await self._server.wait_closed()

        try:
            self._thread.run(shut(), timeout=10)
        finally:
            self._thread.close()

    def _cutting(self) -> bool:
        return self.mode == "cut_reply" or self._armed

    def _take_cut(self) -> bool:
        """Whether to cut the reply now starting; counts the cut."""
        with self._lock:
            if not self._cutting():
                return False
            self._armed = False
            self.cuts += 1
            return True

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(
                self.upstream_host, self.upstream_port
            )
        except OSError:
            writer.transport.abort()
            return
        link = _Link(writer, up_writer)
        with self._lock:
            self._links.add(link)
            self.peak_connections = max(self.peak_connections, len(self._links))
        try:
            await asyncio.gather(
                self._pump(link, reader, up_writer, to_upstream=True),
                self._pump(link, up_reader, writer, to_upstream=False),
            )
        finally:
            with self._lock:
                self._links.discard(link)
            link.reset()

    def _pieces(self, link: _Link, data: bytes) -> Iterator[tuple[bytes, bool]]:
        """Server-to-client bytes as (piece, whether it starts a reply)."""
        if self.protocol == "resp":
            yield data, link.script_sent
            return
        link.replies += data
        while len(link.replies) >= FRAME_HEADER:
            size = FRAME_HEADER + int.from_bytes(link.replies[:3], "big")
            if len(link.replies) < size:
                return
            frame, link.replies = link.replies[:size], link.replies[size:]
            stream = int.from_bytes(frame[5:9], "big") & 0x7FFFFFFF
            yield frame, frame[3] in (HEADERS, DATA) and stream != 0

    async def _pump(
        self,
        link: _Link,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        to_upstream: bool,
    ) -> None:
        try:
            while data := await reader.read(CHUNK):
                if self.mode == "blackhole":
                    link.lost_bytes = True
                    continue
                if to_upstream:
                    if self._cutting() and b"EVALSHA" in data:
                        link.script_sent = True
                    writer.write(data)
                else:
                    for piece, reply in self._pieces(link, data):
                        if reply and self._take_cut():
                            link.reset()
                            return
                        writer.write(piece)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            # One side is done: so is the link (half-open links would only confuse).
            link.reset()


@contextmanager
def proxy_to(url: str) -> Iterator[FaultProxy]:
    """A FaultProxy in front of the Redis at ``url``."""
    parsed = urlparse(url)
    proxy = FaultProxy(parsed.hostname or "127.0.0.1", parsed.port or 6379)
    try:
        yield proxy
    finally:
        proxy.close()
