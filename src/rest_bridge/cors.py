"""CORS for storefront pages: the server decides which origins may call, the bridge answers.

The bridge asks the server (Origins.Check, with the request's key if it has one)
and keeps each answer for ``cors_cache_seconds`` per (origin, key). Only requests
that carry an Origin header do any of this: curl and servers send none, so the hot
path never pays for it. The server also checks the Origin of every write itself
(forwarded as ``grpcgateway-origin``): a refused page gets no CORS headers here
and a 403 from the server.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc

from events_server.ops.logs import request_id
from events_server.pb import events_pb2 as pb
from events_server.pb import events_pb2_grpc
from events_server.wire.metadata import MD_API_KEY, REQUEST_ID_HEADER, new_request_id
from events_server.wire.origins import REFUSED, OriginDecision
from rest_bridge.config import BridgeSettings
from rest_bridge.credentials import api_key
from rest_bridge.errors import grpc_error_response
from rest_bridge.expiring import Expiring
from rest_bridge.responses import json_reply
from rest_bridge.upstream import metadata_value

Headers = list[tuple[bytes, bytes]]

CACHE_LIMIT = 10_000
"""Cached answers per process; past it the cache starts over (a flood of made-up keys)."""

# No real origin is this long (a DNS name has at most 253 characters).
MAX_ORIGIN_CHARS = 512

ALLOW_METHODS = b"POST"
ALLOW_HEADERS = b"Content-Type, Content-Encoding, X-API-KEY, X-Request-Id"
EXPOSE_HEADERS = b"Retry-After, X-Request-Id"
MAX_AGE = b"600"  # seconds a browser may reuse a preflight's answer


def is_preflight(scope: dict[str, Any]) -> bool:
    """An OPTIONS request a browser sends before a cross-origin POST."""
    names = {name for name, _ in scope["headers"]}
    return b"origin" in names and b"access-control-request-method" in names


def _allow_origin(origin: bytes, decision: OriginDecision) -> Headers:
    if decision.credentials:
        return [
            (b"access-control-allow-origin", origin),
            (b"access-control-allow-credentials", b"true"),
            (b"vary", b"Origin"),
        ]
    # Allowed by a "*" only: never echoed with credentials, so no page can send
    # the visitor's cookies along.
    return [(b"access-control-allow-origin", b"*"), (b"vary", b"Origin")]


class Cors:
    """The server's CORS answers, cached, turned into headers."""

    def __init__(
        self, stub: Callable[[], events_pb2_grpc.OriginsAsyncStub], settings: BridgeSettings
    ) -> None:
        self._stub = stub
        self._settings = settings
        self._cache: Expiring[tuple[str, str | None], OriginDecision] = Expiring(
            settings.cors_cache_seconds, CACHE_LIMIT
        )

    def known(self, origin: str, key: str | None) -> OriginDecision | None:
        """The answer ``decide`` gives without asking the server; None when it must ask."""
        if origin == "null" or len(origin) > MAX_ORIGIN_CHARS:
            return REFUSED  # "null": sandboxed frames and file:// pages, anyone's
        return self._cache.get((origin, key))

    async def decide(self, origin: str, key: str | None) -> OriginDecision:
        """The server's answer for this origin and key; AioRpcError when it cannot be asked."""
        if (known := self.known(origin, key)) is not None:
            return known
        metadata = [(REQUEST_ID_HEADER, request_id.get() or new_request_id())]
        if key:
            metadata.append((MD_API_KEY, metadata_value(key)))
        reply = await self._stub().Check(
            pb.OriginCheckRequest(origin=origin),
            timeout=self._settings.grpc_timeout_seconds,
            metadata=tuple(metadata),
        )
        decision = OriginDecision(reply.allowed, reply.allowed and reply.credentials)
        self._cache.put((origin, key), decision)
        return decision

    @staticmethod
    def response_headers(origin: bytes, decision: OriginDecision) -> Headers:
        """What an actual response carries for a page of this origin (nothing when refused)."""
        if not decision.allowed:
            return []
        expose = (b"access-control-expose-headers", EXPOSE_HEADERS)
        return [*_allow_origin(origin, decision), expose]

    async def preflight(self, scope: dict[str, Any], send: Any) -> None:
        """Answer a preflight: 204 with the CORS headers, 403 for an origin refused."""
        headers = dict(scope["headers"])
        origin = headers[b"origin"]
        key, _ = api_key(headers, scope.get("query_string", b""))
        try:
            decision = await self.decide(origin.decode("latin-1"), key)
        except grpc.aio.AioRpcError as error:
            await grpc_error_response(error, self._settings.retry_after_seconds).send(send)
            return
        if not decision.allowed:
            shown = origin.decode("latin-1")[:MAX_ORIGIN_CHARS]
            listed = "the API key's origins" if key else "the origins of any API key"
            detail = f"origin {shown!r} is not allowed: it is not among {listed}, nor global"
            if shown == "null":
                detail = "origin 'null' is never allowed (sandboxed frames and file:// pages)"
            await json_reply(403, {"detail": detail}).send(send)
            return
        await send(
            {
                "type": "http.response.start",
                "status": 204,
                "headers": [
                    *_allow_origin(origin, decision),
                    (b"access-control-allow-methods", ALLOW_METHODS),
                    (b"access-control-allow-headers", ALLOW_HEADERS),
                    (b"access-control-max-age", MAX_AGE),
                ],
            }
        )
        await send({"type": "http.response.body", "body": b""})
