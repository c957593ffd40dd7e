"""The bridge's own HTTPS (and so ``wss://``): TLS in front of the guarded HTTP protocol.

Given a certificate, uvicorn would wrap each connection in TLS itself, inside the event
loop's ``create_server``: a connection is then invisible to the bridge's bounds
(rest_bridge.connections) until its handshake is done, and the only bound on the
handshake is the loop's own 60 s (asyncio's and uvloop's default, which uvicorn does
not change). So 1,100 sockets that connect and never say hello held every descriptor
of a 1,024-descriptor process for a minute, and legitimate clients were refused.

Here the bridge wraps the connection itself (uvicorn is given no certificate): a TLS
connection counts against ``max_connections`` from its first byte, the oldest still
in its handshake is the first closed when the cap is reached, and a handshake must be
done within ``header_timeout_seconds``, as a request head must.
"""

from __future__ import annotations

import asyncio
import ssl
from asyncio.sslproto import SSLProtocol
from typing import Any

from uvicorn.config import Config
from uvicorn.server import ServerState

from rest_bridge.config import BridgeSettings
from rest_bridge.connections import REFUSED, ConnectionGuard
from rest_bridge.hot import HotHttpProtocol
from rest_bridge.http_protocol import GuardedHttpToolsProtocol


def server_context(settings: BridgeSettings) -> ssl.SSLContext | None:
    """The bridge's TLS server context (None: plain HTTP), client certificates required when
    ``http_tls_client_ca_file`` is set."""
    if not settings.http_tls_cert_file:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(settings.http_tls_cert_file, settings.http_tls_key_file)
    if settings.http_tls_client_ca_file:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(settings.http_tls_client_ca_file)
    return context


class GuardedTlsProtocol(SSLProtocol):
    """TLS for one connection, its handshake counted and timed by the connection guard."""

    def __init__(
        self,
        guard: ConnectionGuard,
        context: ssl.SSLContext,
        http: GuardedHttpToolsProtocol,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        super().__init__(
            loop,
            http,
            context,
            # Nobody waits on the handshake (asyncio takes None): the HTTP protocol's
            # connection_made is the sign that it is done.
            None,  # type: ignore[arg-type]
            server_side=True,
            # Seconds, as a float: typeshed's int is narrower than asyncio's.
            ssl_handshake_timeout=guard.header_timeout,  # type: ignore[arg-type]
        )
        self._guard = guard
        self._http = http
        self._raw: asyncio.Transport | None = None
        http.handshake = self

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._raw = transport
        if not self._guard.admit_handshake(self, self._http.connections):
            # Nothing to answer with before TLS: the socket is closed, and counted.
            self._guard.note(REFUSED)
            transport.abort()
            return
        super().connection_made(transport)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._guard.shaken(self)
        super().connection_lost(exc)

    def cut(self) -> None:
        """Close it now, handshake unfinished (the guard needs its descriptor)."""
        if self._raw is not None:
            self._raw.abort()


def bridge_protocol(
    config: Config,
    server_state: ServerState,
    app_state: dict[str, Any],
    _loop: asyncio.AbstractEventLoop | None = None,
) -> asyncio.BaseProtocol:
    """What uvicorn serves each connection with: the guarded HTTP protocol (its bodies
    within the byte budget), over TLS when the bridge has a certificate (uvicorn's
    ``http`` option)."""
    http = HotHttpProtocol(config, server_state, app_state, _loop)
    guard = http.guard
    if guard.tls is None:
        return http
    return GuardedTlsProtocol(guard, guard.tls, http, _loop or asyncio.get_running_loop())
