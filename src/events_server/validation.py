"""The rules every event must pass, for JSON and direct gRPC callers alike."""

from __future__ import annotations

from collections.abc import Sequence

from events_server.codec import TYPE_NAMES
from events_server.errors import FieldViolation, InvalidEvents
from events_server.pb import events_pb2 as pb


def event_violations(index: int, event: pb.Event) -> list[FieldViolation]:
    """What is wrong with one event (empty when it is valid)."""
    found: list[FieldViolation] = []

    def bad(field: str, description: str, reason: str) -> None:
        found.append(FieldViolation(f"events[{index}].{field}", description, reason))

    if not event.tenant:
        bad("tenant", "tenant must not be empty", "string_too_short")
    if not event.market:
        bad("market", "market must not be empty", "string_too_short")
    if event.type == pb.EVENT_TYPE_UNSPECIFIED:
        bad("type", "type is required (EVENT_TYPE_UNSPECIFIED is not a type)", "missing")
    elif event.type not in TYPE_NAMES:
        bad("type", f"type {event.type} is not a known EventType", "enum")
    if event.HasField("dsid") and not event.dsid:
        bad("dsid", "dsid must not be empty when set", "string_too_short")
    return found


def validate_events(events: Sequence[pb.Event]) -> None:
    """Raise InvalidEvents naming every violation in the request, if there is any."""
    # The same rules as event_violations, as one cheap test per event: valid
    # requests (nearly all of them) never pay for building violation reports.
    for event in events:
        if (
            not event.tenant
            or not event.market
            or event.type not in TYPE_NAMES
            or (not event.dsid and event.HasField("dsid"))
        ):
            break
    else:
        return
    raise InvalidEvents([v for i, event in enumerate(events) for v in event_violations(i, event)])
