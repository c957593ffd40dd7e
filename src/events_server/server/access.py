"""The gRPC server's edge: request id, one access line and the call metrics for every unary call.

Metadata is never logged whole: it carries ``x-api-key``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeAlias

import grpc

from events_server.ops.access_log import AccessLog
from events_server.ops.logs import IpMode, accept_request_id, client_ip_for_log
from events_server.ops.logs import request_id as current_request_id
from events_server.server.identity import BRIDGE_ONLY_METHODS, BridgeIdentity
from events_server.server.identity import current as current_identity
from events_server.server.metrics import ServerMetrics
from events_server.server.passage import client_ip
from events_server.server.status import call_events
from events_server.wire.metadata import ADMIT_METHOD, MD_API_KEY, MD_ORIGIN, REQUEST_ID_HEADER

ACCESS_LOGGER = "events_server.access"

# Probes and reflection are frequent and dull: their lines are DEBUG.
QUIET_PREFIXES = ("/grpc.health.", "/grpc.reflection.")

# Quiet when OK: the bridge's admission of a request's caller, whose own line follows.
QUIET_WHEN_OK = frozenset({ADMIT_METHOD})

Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"  # generic only in the type stubs
Continuation: TypeAlias = "Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]]"


class AccessInterceptor(grpc.aio.ServerInterceptor):
    """Wraps every unary-unary handler and the bridge's stream; other streaming ones
    (reflection, Watch) pass untouched."""

    def __init__(
        self,
        metrics: ServerMetrics,
        ip_mode: IpMode,
        forwarded_hops: int,
        bridge: BridgeIdentity | None = None,
        access: AccessLog | None = None,
    ) -> None:
        self._metrics = metrics
        self._ip_mode = ip_mode
        self._hops = forwarded_hops
        self._bridge = bridge if bridge is not None else BridgeIdentity()
        self._access = access if access is not None else AccessLog(ACCESS_LOGGER, 1.0)

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method: str = handler_call_details.method
        inner: Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]
        if handler.unary_unary is not None:
            inner = handler.unary_unary  # type: ignore[assignment]
            wrap = grpc.unary_unary_rpc_method_handler
        elif handler.stream_stream is not None and method in BRIDGE_ONLY_METHODS:
            # The bridge's gathered stream: one line when it ends (its batches have theirs).
            inner = handler.stream_stream  # type: ignore[assignment]
            wrap = grpc.stream_stream_rpc_method_handler
        else:
            return handler
        level = logging.DEBUG if method.startswith(QUIET_PREFIXES) else logging.INFO
        bridge_only = method in BRIDGE_ONLY_METHODS
        quiet_when_ok = method in QUIET_WHEN_OK

        async def observed(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            started = time.perf_counter()
            # Who the call is, first: from here on call_metadata() holds only what is believed.
            caller = self._bridge.identify(context)
            known = current_identity.set(caller)
            metadata = caller.metadata
            token = current_request_id.set(accept_request_id(metadata.get(REQUEST_ID_HEADER)))
            response = None
            code = grpc.StatusCode.OK
            try:
                if bridge_only and not caller.bridge:
                    await self._bridge.refuse(context, method)
                response = await inner(request, context)
                return response
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED
                raise
            except Exception:
                code = grpc.StatusCode.UNKNOWN
                raise
            finally:
                code = context.code() or code  # set by abort(), or by the handler
                seconds = time.perf_counter() - started
                self._metrics.observe_rpc(method, code.name, seconds)
                ok = code is grpc.StatusCode.OK
                if self._access.wanted(
                    line := logging.DEBUG if quiet_when_ok and ok else level, ok
                ):
                    self._log(
                        line,
                        method,
                        code,
                        seconds=seconds,
                        request=request,
                        # A refused call returns an empty reply beside its status.
                        response=response if code is grpc.StatusCode.OK else None,
                        metadata=metadata,
                        context=context,
                    )
                current_request_id.reset(token)
                current_identity.reset(known)

        return wrap(
            observed,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _log(
        self,
        level: int,
        method: str,
        code: grpc.StatusCode,
        *,
        seconds: float,
        request: Any,
        response: Any,
        metadata: dict[str, str],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> None:
        if (events := getattr(request, "events", None)) is not None:
            count: int | None = len(events)
        else:
            count = call_events.get()  # CreateEvents reads raw bytes
        access_line(
            self._access,
            level,
            method,
            code,
            seconds=seconds,
            events=count,
            response=response,
            metadata=metadata,
            client=client_ip_for_log(
                client_ip(metadata, context.peer(), self._hops), self._ip_mode
            ),
        )


def access_line(
    access: AccessLog,
    level: int,
    method: str,
    code: grpc.StatusCode,
    *,
    seconds: float,
    events: int | None,
    response: Any,
    metadata: dict[str, str],
    client: str,
    **more: Any,
) -> None:
    """Write the access line of one call (or of one request a gathered call carried), which
    ``access.wanted`` chose."""
    fields: dict[str, Any] = {
        "method": method,
        "code": code.name,
        "duration_ms": round(seconds * 1000, 3),
        "client_ip": client,
    }
    if events is not None:
        fields["events"] = events
    if response is not None and hasattr(response, "accepted"):
        fields["accepted"] = response.accepted
        fields["duplicates"] = response.duplicates
    # Keyed and keyless traffic told apart (never the key itself).
    if MD_API_KEY in metadata:
        fields["auth"] = "key"
    elif MD_ORIGIN in metadata:
        fields["auth"] = "storefront"
        fields["origin"] = metadata[MD_ORIGIN][:200]
    fields.update(more)
    access.write(level, f"{method} {code.name}", fields)
