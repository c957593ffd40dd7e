"""The parameters both clients take, declared once."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

from events_server.client.errors import InvalidEventsError
from events_server.pb import events_pb2 as pb
from events_server.wire.codec import fill_event
from events_server.wire.tracked import PRODUCT_UNAVAILABLE, PURCHASE, TRANSACTION_MAPPING
from events_server.wire.violations import FieldViolation

EventLike = pb.Event | Mapping[str, Any]
"""What the client takes: a typed Event, or a dict in the contract's JSON form."""

TrackedLike = pb.TrackedEvent | pb.Purchase | pb.TransactionMapping | pb.ProductUnavailable
"""What ``track`` takes: a TrackedEvent, or the message of one of Depict's v2 kinds."""

_KIND_OF: dict[type[Any], str] = {
    pb.Purchase: PURCHASE,
    pb.TransactionMapping: TRANSACTION_MAPPING,
    pb.ProductUnavailable: PRODUCT_UNAVAILABLE,
}


class ClientOptions(TypedDict, total=False):
    """Keyword arguments of ``EventsClient`` and ``SyncEventsClient`` (see ``Options``)."""

    api_key: str | None
    deadline_seconds: float
    initial_backoff_seconds: float
    max_backoff_seconds: float
    backoff_multiplier: float
    tls: bool
    tls_ca_file: str | Path | None
    tls_cert_file: str | Path | None
    tls_key_file: str | Path | None
    tls_server_name: str | None


@dataclass(frozen=True, slots=True)
class Options:
    """How a client calls: its key, how long and how often it retries UNAVAILABLE, and TLS."""

    api_key: str | None = None
    deadline_seconds: float = 10.0
    """The whole call, retries included."""
    initial_backoff_seconds: float = 0.05
    max_backoff_seconds: float = 2.0
    backoff_multiplier: float = 2.0
    tls: bool = False
    """Connect with TLS (implied by any tls_* file): the server's certificate is verified
    against ``tls_ca_file``, or gRPC's default roots without one."""
    tls_ca_file: str | Path | None = None
    """PEM file of the CA(s) the server's certificate must chain to."""
    tls_cert_file: str | Path | None = None
    """PEM client certificate (chain) to present, for a server that requires one (mTLS)."""
    tls_key_file: str | Path | None = None
    """The client certificate's PEM private key."""
    tls_server_name: str | None = None
    """The name the server's certificate must hold, when it is not the target's host."""

    @property
    def secure(self) -> bool:
        """Whether the channel uses TLS."""
        return bool(self.tls or self.tls_ca_file or self.tls_cert_file or self.tls_key_file)


def with_dedup_id(event: pb.Event) -> pb.Event:
    # Fixed before the first attempt: every retry then carries the same id.
    if not event.HasField("deduplication_id"):
        event.deduplication_id = str(uuid.uuid4())
    return event


def tracked_copy(item: object, path: str) -> pb.TrackedEvent:
    """A TrackedEvent of ``item`` (a copy), its retry identity fixed: a product_unavailable
    without a deduplication_id gets a uuid4 (a purchase's and a mapping's is their
    transaction_id). InvalidEventsError naming ``path`` when it is none of TrackedLike."""
    event = pb.TrackedEvent()
    if isinstance(item, pb.TrackedEvent):
        event.CopyFrom(item)
    elif (kind := _KIND_OF.get(type(item))) is not None:
        getattr(event, kind).CopyFrom(item)
    else:
        found = [
            FieldViolation(
                path,
                "a v2 event is a pb.TrackedEvent, pb.Purchase, pb.TransactionMapping or"
                f" pb.ProductUnavailable, not {type(item).__name__}",
                "type",
            )
        ]
        raise InvalidEventsError(f"invalid event: {path}", found, None)
    if event.HasField(PRODUCT_UNAVAILABLE):
        report = event.product_unavailable
        if not report.HasField("deduplication_id"):
            # Fixed before the first attempt, as an Event's: every retry carries the same id.
            report.deduplication_id = str(uuid.uuid4())
    return event


def build_track_request(events: Iterable[TrackedLike]) -> pb.TrackRequest:
    """The Track request for ``events`` (copies, ids filled in); InvalidEventsError for an item
    that is no v2 event."""
    return pb.TrackRequest(
        events=[tracked_copy(item, f"events[{index}]") for index, item in enumerate(events)]
    )


def build_request(events: Iterable[EventLike]) -> pb.CreateEventsRequest:
    """The request for ``events`` (copies, ids filled in); InvalidEventsError for a bad dict."""
    request = pb.CreateEventsRequest()
    found: list[FieldViolation] = []
    for index, item in enumerate(events):
        event = request.events.add()
        if isinstance(item, pb.Event):
            event.CopyFrom(item)
        else:
            found.extend(fill_event(event, f"events[{index}]", item))
        with_dedup_id(event)
    if found:
        message = f"{len(found)} invalid field(s), first: {found[0].field}"
        raise InvalidEventsError(message, found, None)
    return request
