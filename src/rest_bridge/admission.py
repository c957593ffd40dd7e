"""Who a request is, from its headers alone: nothing costly before the caller is known.

A POST's body is what costs the bridge (read, inflated, parsed and validated before the
server saw the request): unauthenticated 1 MiB bodies from 512 connections once held
2.9 GB. So before the body is read the bridge asks the server (Origins.Admit, with the
request's key or, keyless, its page origin, and the client context) whether it would let
the caller in: a key in force (one the page's origin may use), or a registered storefront
origin. A refusal is answered at once, 401 or 403 in the words CreateEvents would use, and
the connection closed: its body is never read, so it costs a small multiple of its headers.

Admissions are kept for ``admission_cache_seconds`` per (key, origin), so a caller in use
costs one call to the server per period, and concurrent requests of one credential share
one question. Refusals are not kept: the server answers one from its own caches (an
unknown key costs its client address's unknown-key allowance, then nothing), and a key
created a moment ago must not stay refused here. The server still checks every request
it is sent: an admission kept here only decides that the body is worth reading.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from typing import Any

import grpc

from events_server.pb import events_pb2 as pb
from events_server.pb import events_pb2_grpc
from rest_bridge.config import BridgeSettings
from rest_bridge.errors import grpc_error_response
from rest_bridge.expiring import Expiring
from rest_bridge.responses import Reply
from rest_bridge.upstream import forwarded_metadata

CACHE_LIMIT = 10_000
"""Admissions kept per process; past it they start over (each is a key or origin in use)."""

Credential = tuple[str | None, str | None]

CLOSE = (b"connection", b"close")


def _credential(headers: dict[bytes, bytes], key: str | None) -> Credential:
    origin = headers.get(b"origin")
    return key, origin.decode("latin-1") if origin is not None else None


class Admission:
    """The server's answer on a request's credentials, asked once its headers are in."""

    def __init__(
        self, stub: Callable[[], events_pb2_grpc.OriginsAsyncStub], settings: BridgeSettings
    ) -> None:
        self._stub = stub
        self._settings = settings
        self._admitted: Expiring[Credential, bool] = Expiring(
            settings.admission_cache_seconds, CACHE_LIMIT
        )
        self._asking: dict[Credential, asyncio.Future[Reply | None]] = {}

    def admitted(self, headers: dict[bytes, bytes], key: str | None) -> bool:
        """Whether the caller is admitted already (kept): before_body would say None."""
        return self._admitted.get(_credential(headers, key)) is not None

    async def before_body(
        self, scope: dict[str, Any], headers: dict[bytes, bytes], key: str | None
    ) -> Reply | None:
        """None when the body is worth reading; else the reply to send instead, after which
        the connection is closed (the body was not read, so it cannot be reused)."""
        refused = await self.refusal(scope, headers, key)
        if refused is None:
            return None
        return Reply(refused.status, refused.body, [*refused.headers, CLOSE])

    async def refusal(
        self, scope: dict[str, Any], headers: dict[bytes, bytes], key: str | None
    ) -> Reply | None:
        """None when the server knows the caller; else its refusal as an HTTP reply (401,
        403; 503 when the server cannot be asked)."""
        credential = _credential(headers, key)
        if self._admitted.get(credential) is not None:
            return None
        asking = self._asking.get(credential)
        if asking is None:
            client = scope.get("client")
            metadata = forwarded_metadata(headers, client[0] if client else "", key)
            asking = self._asking[credential] = asyncio.ensure_future(
                self._ask(credential, metadata)
            )
            asking.add_done_callback(functools.partial(self._asked, credential))
        # Shielded: a client gone mid-question must not cancel the others' answer.
        return await asyncio.shield(asking)

    async def _ask(
        self, credential: Credential, metadata: tuple[tuple[str, str], ...]
    ) -> Reply | None:
        try:
            await self._stub().Admit(
                pb.AdmitRequest(), timeout=self._settings.grpc_timeout_seconds, metadata=metadata
            )
        except grpc.aio.AioRpcError as error:
            # A server older than Admit: its CreateEvents checks the caller, as it always did.
            if error.code() != grpc.StatusCode.UNIMPLEMENTED:
                return grpc_error_response(error, self._settings.retry_after_seconds)
        self._admitted.put(credential, True)
        return None

    def _asked(self, credential: Credential, asking: asyncio.Future[Reply | None]) -> None:
        del self._asking[credential]
        if not asking.cancelled():
            asking.exception()  # retrieved: every asker may have gone
