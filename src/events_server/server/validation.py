"""A request's events, checked against the rules (``wire.validation``) before they are queued."""

from __future__ import annotations

from collections.abc import Sequence

from events_server.pb import events_pb2 as pb
from events_server.server.errors import InvalidEvents
from events_server.wire.codec import TYPE_NAMES
from events_server.wire.validation import Limits, event_violations
from events_server.wire.violations import FieldViolation


def validate_events(events: Sequence[pb.Event], limits: Limits) -> list[bytes]:
    """Each event serialized, once all pass; else raise InvalidEvents naming every violation.

    The size rules need each event's serialized length, and the caller needs the
    serialized events for the queue: serializing once serves both.
    """
    if len(events) > limits.max_events_per_request:
        # Refused before looking at any event: their number is the request's fault.
        raise InvalidEvents(
            [
                FieldViolation(
                    "events",
                    f"the request has {len(events)} events; at most"
                    f" {limits.max_events_per_request} are allowed (max_events_per_request)",
                    "too_many_events",
                )
            ]
        )
    serialized = [event.SerializeToString() for event in events]
    # The same rules as event_violations, as one cheap test per event (and one for
    # all the sizes): valid requests never pay for building violation reports, nor
    # for scanning strings when no event is large enough to hold a long one.
    unchecked = min(limits.max_event_bytes, limits.max_string_length)
    if not serialized or max(map(len, serialized)) <= unchecked:
        for event in events:
            if (
                not event.tenant
                or not event.market
                or event.type not in TYPE_NAMES
                or (not event.dsid and event.HasField("dsid"))
            ):
                break
        else:
            return serialized
    found = [
        violation
        for i, (event, data) in enumerate(zip(events, serialized, strict=True))
        for violation in event_violations(i, event, limits, len(data))
    ]
    if found:
        raise InvalidEvents(found)
    return serialized
