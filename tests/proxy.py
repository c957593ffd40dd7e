"""A small asyncio TCP proxy between the server and Valkey that fails on demand.

Modes (switch at any time from the test's thread):

- ``pass``: bytes flow both ways.
- ``blackhole``: bytes are swallowed both ways, as on a network that drops every
  packet; connections stay open and nobody is told. On leaving the mode, every
  connection that lost bytes is closed (its Redis protocol stream is broken).
- ``cut_reply``: requests flow to Valkey, but the first reply to a request that
  holds an ``EVALSHA`` is dropped and the connection reset: the script ran, the
  caller never hears of it.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from typing import Literal

from tests.support import LoopThread

Mode = Literal["pass", "blackhole", "cut_reply"]

CHUNK = 1 << 16


class _Link:
    """One proxied connection: client side and upstream side."""

    def __init__(self, client: asyncio.StreamWriter, upstream: asyncio.StreamWriter) -> None:
        self.client = client
        self.upstream = upstream
        self.lost_bytes = False
        self.script_sent = False

    def reset(self) -> None:
        for writer in (self.client, self.upstream):
            writer.transport.abort()


class FaultProxy:
    """The proxy on its own event loop thread, listening on a free loopback port."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.mode: Mode = "pass"
        self.cuts = 0
        """Script replies dropped (cut_reply)."""
        self.peak_connections = 0
        """Most client connections open at once."""
        self._links: set[_Link] = set()
        self._lock = threading.Lock()
        self._thread = LoopThread()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port: int = sock.getsockname()[1]
        self._server = self._thread.run(self._listen(sock))
        self.url = f"redis://127.0.0.1:{self.port}/0"

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
                mode = self.mode
                if mode == "blackhole":
                    link.lost_bytes = True
                    continue
                if to_upstream:
                    if mode == "cut_reply" and b"EVALSHA" in data:
                        link.script_sent = True
                elif link.script_sent and self.mode == "cut_reply":
                    with self._lock:
                        self.cuts += 1
                    link.reset()
                    return
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            # One side is done: so is the link (half-open links would only confuse).
            link.reset()
