"""The failures a CreateEvents call can end in. Transports map them to status codes.

A duplicate is not here: it is a normal per-event result.
"""

from __future__ import annotations

from events_server.wire.violations import FieldViolation


class IngestError(Exception):
    """Base of every error a call reports to its client."""


class InvalidEvents(IngestError):
    """The request has invalid events; nothing from it was queued."""

    def __init__(self, violations: list[FieldViolation]) -> None:
        self.violations = violations
        noun = "violation" if len(violations) == 1 else "violations"
        first = violations[0]
        super().__init__(
            f"{len(violations)} field {noun}, first: {first.field}: {first.description}"
        )


class StoreUnavailable(IngestError):
    """Redis could not be reached or refused the write; safe to retry."""


class StoreFull(IngestError):
    """Redis is out of memory and refuses writes; refused batches queued nothing. Retry later."""


class RequestTooLarge(IngestError):
    """A request over max_request_bytes: refused unread, as gRPC refuses a message too large
    (RESOURCE_EXHAUSTED, with gRPC's own words, which the bridge answers 413)."""

    def __init__(self, size: int, most: int) -> None:
        super().__init__(f"Received message larger than max ({size} vs. {most})")


class RateLimited(IngestError):
    """The caller is over its rate limit or its share of calls in flight; nothing was queued.

    ``retryable`` is False only for a request that could never fit (larger than the burst).
    """

    def __init__(self, message: str, *, retry_after_seconds: float, retryable: bool = True) -> None:
        super().__init__(message)
        self.retry_after_seconds = retry_after_seconds
        self.retryable = retryable


class AuthError(IngestError):
    """A refused API key; ``kind`` is its metrics label (metrics.AUTH_FAILURE_KINDS)."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


class Unauthenticated(AuthError):
    """No API key, or one that is unknown or revoked."""


class PermissionDenied(AuthError):
    """The key may not do this: a tenant it does not cover, or a page origin it does not allow.

    Nothing from the request was queued.
    """
