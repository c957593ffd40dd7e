"""``EventsClient``: CreateEvents for internal Python services, with the safe choices made.

- Events are typed ``pb.Event`` messages or contract dicts (``{"type": "page_view", ...}``).
- Every event without a ``deduplication_id`` gets a uuid4 before the first attempt,
  so a retry can never queue it twice.
- ``track`` sends Depict's v2 events (``pb.Purchase``, ``pb.TransactionMapping``,
  ``pb.ProductUnavailable``, or a ``pb.TrackedEvent`` holding one): a purchase and a
  mapping are queued once per transaction_id; a ProductUnavailable without a
  ``deduplication_id`` gets a uuid4, as an event does.
- UNAVAILABLE (server down, Redis down, connection lost) is retried with
  exponential backoff and full jitter, within one deadline for the whole call.
- Failures are exceptions with the status code, the request id (as in the
  server's logs) and, for INVALID_ARGUMENT, the field violations.
- ``Batcher`` gathers single events into calls (``add``; ``track`` for v2 events, in
  calls of their own): when ``max_events`` are waiting, or ``max_delay_seconds`` after
  the first of a batch arrived.

``SyncEventsClient`` is the same for code without an event loop.
"""

from events_server.client.aio import EventsClient
from events_server.client.batcher import Batcher
from events_server.client.errors import (
    EventsError,
    InvalidEventsError,
    PermissionDeniedError,
    UnauthenticatedError,
    UnavailableError,
    error_from_rpc,
)
from events_server.client.options import (
    ClientOptions,
    EventLike,
    Options,
    TrackedLike,
    build_request,
    build_track_request,
)
from events_server.client.sync import SyncBatcher, SyncEventsClient
from events_server.wire.violations import FieldViolation

__all__ = [
    "Batcher",
    "ClientOptions",
    "EventLike",
    "EventsClient",
    "EventsError",
    "FieldViolation",
    "InvalidEventsError",
    "Options",
    "PermissionDeniedError",
    "SyncBatcher",
    "SyncEventsClient",
    "TrackedLike",
    "UnauthenticatedError",
    "UnavailableError",
    "build_request",
    "build_track_request",
    "error_from_rpc",
]
