"""The client's exceptions, and the one mapping from a failed call's status to them."""

from __future__ import annotations

import grpc

from events_server.wire.violations import FieldViolation, unpack_violations


class EventsError(Exception):
    """A CreateEvents call failed; nothing of it is known to be queued unless said otherwise."""

    def __init__(self, message: str, code: grpc.StatusCode, request_id: str | None) -> None:
        super().__init__(f"{code.name}: {message}" + (f" [{request_id}]" if request_id else ""))
        self.code = code
        self.details = message
        self.request_id = request_id
        """Names the call in the server's logs (None when it failed before being sent)."""


class InvalidEventsError(EventsError):
    """INVALID_ARGUMENT: ``violations`` name each bad field (``events[3].tenant``)."""

    def __init__(
        self, message: str, violations: list[FieldViolation], request_id: str | None
    ) -> None:
        super().__init__(message, grpc.StatusCode.INVALID_ARGUMENT, request_id)
        self.violations = violations


class UnauthenticatedError(EventsError):
    """UNAUTHENTICATED: the API key is missing or unknown."""


class PermissionDeniedError(EventsError):
    """PERMISSION_DENIED: the API key may not send for this tenant."""


class UnavailableError(EventsError):
    """Still UNAVAILABLE (or out of time) when the deadline passed; resending the same events
    is safe, as they carry their deduplication_ids."""


def error_from_rpc(error: grpc.aio.AioRpcError, request_id: str | None) -> EventsError:
    """The client's exception for a failed call: the single status-to-exception mapping."""
    code = error.code()
    message = error.details() or code.name
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        trailers = error.trailing_metadata()
        return InvalidEventsError(message, unpack_violations(trailers), request_id)  # type: ignore[arg-type]
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return UnauthenticatedError(message, code, request_id)
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return PermissionDeniedError(message, code, request_id)
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return UnavailableError(message, code, request_id)
    return EventsError(message, code, request_id)
