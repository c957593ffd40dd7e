"""The bridge's one gRPC channel to the server: TLS when configured, and the bridge's identity.

The server believes the client context the bridge forwards only from the bridge (see
``events_server.server.identity``), which proves itself by its client certificate
(mutual TLS) or by the shared ``EVENTS_BRIDGE_TOKEN``, sent on every call. With neither,
the server believes a bridge on its own host only.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any, cast

import grpc

from events_server.client.tls import channel_credentials, name_options
from events_server.wire.addresses import is_local_address
from events_server.wire.metadata import MD_BRIDGE_TOKEN
from rest_bridge.config import BridgeSettings

log = logging.getLogger(__name__)

Metadata = tuple[tuple[str, str], ...]


class _WithMetadata:
    """A multi-callable that adds fixed metadata to every call it makes."""

    __slots__ = ("_call", "_extra")

    def __init__(self, call: Any, extra: Metadata) -> None:
        self._call = call
        self._extra = extra

    def __call__(self, request: Any = None, *, metadata: Any = None, **kwargs: Any) -> Any:
        # request None: a streaming request, whose messages are written to the call.
        return self._call(
            request, metadata=(*metadata, *self._extra) if metadata else self._extra, **kwargs
        )


class CredentialChannel:
    """A grpc.aio channel whose stubs send the bridge credential on every call.

    Not a client interceptor: grpc.aio runs each intercepted call in a task of its own, a
    cost on every request; this adds one tuple.
    """

    def __init__(self, channel: grpc.aio.Channel, extra: Metadata) -> None:
        self._channel = channel
        self._extra = extra

    def unary_unary(self, *args: Any, **kwargs: Any) -> Any:
        return _WithMetadata(self._channel.unary_unary(*args, **kwargs), self._extra)

    def unary_stream(self, *args: Any, **kwargs: Any) -> Any:
        return _WithMetadata(self._channel.unary_stream(*args, **kwargs), self._extra)

    def stream_unary(self, *args: Any, **kwargs: Any) -> Any:
        return _WithMetadata(self._channel.stream_unary(*args, **kwargs), self._extra)

    def stream_stream(self, *args: Any, **kwargs: Any) -> Any:
        return _WithMetadata(self._channel.stream_stream(*args, **kwargs), self._extra)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._channel, name)


@asynccontextmanager
async def upstream_channel(
    settings: BridgeSettings, options: Sequence[tuple[str, Any]] = ()
) -> AsyncIterator[grpc.aio.Channel]:
    """The channel to ``settings.grpc_target``, closed on the way out.

    ValueError when a configured TLS file cannot be read.
    """
    if settings.grpc_secure:
        credentials = channel_credentials(
            settings.grpc_ca_file or None,
            settings.grpc_client_cert_file or None,
            settings.grpc_client_key_file or None,
        )
        channel = grpc.aio.secure_channel(
            settings.grpc_target,
            credentials,
            options=[*options, *name_options(settings.grpc_server_name)],
        )
    else:
        channel = grpc.aio.insecure_channel(settings.grpc_target, options=list(options))
    proven = bool(settings.bridge_token or settings.grpc_client_cert_file)
    if not proven and not is_local_address(settings.grpc_target):
        log.warning(
            "the events-server at %s is not on this host, and this bridge proves nothing to"
            " it: the server will ignore the client context it forwards (client IP, user"
            " agent, page origin: keyless storefront requests are then refused) and its"
            " rejected-request reports. Give both the same EVENTS_BRIDGE_TOKEN, or this"
            " bridge a client certificate the server's EVENTS_TLS_CLIENT_CA_FILE signed",
            settings.grpc_target,
        )
    try:
        if settings.bridge_token is None:
            yield channel
        else:
            token = ((MD_BRIDGE_TOKEN, settings.bridge_token.get_secret_value()),)
            yield cast(grpc.aio.Channel, CredentialChannel(channel, token))
    finally:
        await channel.close()
