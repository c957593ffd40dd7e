"""The gRPC side of every call: its text metadata, and IngestError -> status (the one mapping)."""

from __future__ import annotations

import math
from contextvars import ContextVar
from typing import Any, NoReturn

import grpc

from events_server.server import identity
from events_server.server.errors import (
    IngestError,
    InvalidEvents,
    PermissionDenied,
    RateLimited,
    RequestTooLarge,
    StoreFull,
    StoreUnavailable,
    Unauthenticated,
)
from events_server.wire.metadata import MD_RETRY_AFTER
from events_server.wire.violations import STATUS_DETAILS_KEY, pack_invalid_argument

# Refusals that are the client's business, not the operator's: not logged as warnings.
QUIET_CODES = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
    }
)


Trailers = tuple[tuple[str, bytes | str], ...]

call_events: ContextVar[int | None] = ContextVar("call_events", default=None)
"""Events in the call being handled, once its request is parsed (for the access line)."""


def call_metadata(context: grpc.aio.ServicerContext[Any, Any]) -> dict[str, str]:
    """The call's text metadata (binary ``-bin`` entries left out), as far as it is believed:
    the client context the REST bridge forwards is dropped from any other caller (see
    ``identity``)."""
    return identity.call_metadata(context)


def grpc_status(error: IngestError) -> tuple[grpc.StatusCode, str, Trailers]:
    """(code, message, trailing metadata) for an error: the single error-to-code mapping."""
    if isinstance(error, InvalidEvents):
        details = pack_invalid_argument(str(error), error.violations)
        return grpc.StatusCode.INVALID_ARGUMENT, str(error), ((STATUS_DETAILS_KEY, details),)
    if isinstance(error, Unauthenticated):
        return grpc.StatusCode.UNAUTHENTICATED, str(error), ()
    if isinstance(error, PermissionDenied):
        return grpc.StatusCode.PERMISSION_DENIED, str(error), ()
    if isinstance(error, StoreUnavailable):
        return grpc.StatusCode.UNAVAILABLE, str(error), ()
    if isinstance(error, RequestTooLarge):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(error), ()
    if isinstance(error, StoreFull):
        # Backpressure, grpc-gateway maps it to 429: retry later, as for UNAVAILABLE.
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(error), ()
    if isinstance(error, RateLimited):
        # Whole seconds, rounded up, as HTTP's Retry-After; the bridge passes it on.
        after = str(max(1, math.ceil(error.retry_after_seconds)))
        code = (
            grpc.StatusCode.RESOURCE_EXHAUSTED
            if error.retryable
            else grpc.StatusCode.INVALID_ARGUMENT
        )
        return code, str(error), ((MD_RETRY_AFTER, after),)
    return grpc.StatusCode.INTERNAL, str(error), ()


def refuse(
    context: grpc.aio.ServicerContext[Any, Any],
    code: grpc.StatusCode,
    message: str,
    trailers: Trailers,
) -> None:
    """End the call with this status once the handler returns (an empty reply: a client
    never sees the message that comes with a status other than OK).

    Set, not ``context.abort()``: abort raises, and its exception ties the call's state,
    the handler's frames and its traceback in a reference cycle that only a full garbage
    collection frees. Under a flood of refusals those piled up in the oldest generation,
    and each full collection stalled every caller's call for 40-60 ms.
    """
    context.set_code(code)
    context.set_details(message)
    context.set_trailing_metadata(trailers)


async def abort(context: grpc.aio.ServicerContext[Any, Any], error: IngestError) -> NoReturn:
    """End the call with the error's status, message and trailers."""
    code, message, trailers = grpc_status(error)
    await context.abort(code, message, trailers)
    raise error  # not reached (abort() raises); this keeps type checkers honest
