"""A request's events, checked against the rules (``wire.validation``) before they are queued."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

from google.protobuf.message import DecodeError

from events_server.pb import events_pb2 as pb
from events_server.server.errors import InvalidEvents
from events_server.wire.codec import TYPE_NAMES
from events_server.wire.validation import Limits, event_violations
from events_server.wire.violations import FieldViolation


def too_many(count: int, limits: Limits, *, counted_up_to: bool = False) -> InvalidEvents:
    """The refusal of a request with more events than allowed: ``count`` of them, or, when
    ``counted_up_to``, more than ``count`` (counting stopped there)."""
    held = f"more than {count}" if counted_up_to else str(count)
    return InvalidEvents(
        [
            FieldViolation(
                "events",
                f"the request has {held} events; at most"
                f" {limits.max_events_per_request} are allowed (max_events_per_request)",
                "too_many_events",
            )
        ]
    )


PARSED_MULTIPLE = 4
"""A request of up to this many times max_events_per_request is parsed before it is
refused for its count (so the refusal names the count and the tenants); a larger one
is refused from the wire format alone."""

MAX_OTHER_FIELDS = 64
"""Top-level fields other than events a request may carry (unknown ones, dropped)."""


def event_spans(
    raw: bytes, most: int, request: str = "CreateEventsRequest"
) -> list[tuple[int, int]] | None:
    """Where each event of a serialized ``request`` (a CreateEventsRequest or a TrackRequest:
    events are field 1 of both) lies, from its wire format alone; None once there are more
    than ``most`` (so the walk stops there: at most ``most`` steps).

    Raises InvalidEvents when the bytes are not a protobuf message.
    """
    spans: list[tuple[int, int]] = []
    pos, end, others = 0, len(raw), 0
    try:
        while pos < end:
            tag, pos = _varint(raw, pos)
            kind = tag & 7
            if kind == 2:
                length, pos = _varint(raw, pos)
                if tag >> 3 == 1:
                    if len(spans) == most:
                        return None
                    spans.append((pos, pos + length))
                    pos += length
                    continue
                pos += length
            elif kind == 0:
                _, pos = _varint(raw, pos)
            elif kind in (1, 5):
                pos += 8 if kind == 1 else 4
            else:
                raise ValueError(f"wire type {kind}")
            others += 1
            if others > MAX_OTHER_FIELDS:
                raise ValueError(f"more than {MAX_OTHER_FIELDS} fields besides events")
        if pos != end:
            raise ValueError("truncated")
    except (ValueError, IndexError) as error:
        raise _not_protobuf("events", request, str(error)) from None
    return spans


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def parse_request(raw: bytes, limits: Limits) -> pb.CreateEventsRequest:
    """A CreateEventsRequest from its bytes, its events counted before any is built.

    gRPC would build every message of a request before the handler runs: 4 MiB of
    empty events is two million objects (~700 MB). Walking the wire format first
    costs at most max_events_per_request steps, whatever the request holds. Fields
    Event does not have are dropped: the queue holds only what the contract defines.
    """
    return parse(raw, limits, pb.CreateEventsRequest, pb.Event)


Request = TypeVar("Request", pb.CreateEventsRequest, pb.TrackRequest)


def parse(
    raw: bytes, limits: Limits, kind: type[Request], item: type[pb.Event | pb.TrackedEvent]
) -> Request:
    """A request of ``kind`` (its events of type ``item``) from its bytes, as parse_request."""
    # Up to a few times the limit the request is parsed, and refused as usual (naming
    # its count, recorded by tenant); past that it is refused unparsed.
    ceiling = PARSED_MULTIPLE * limits.max_events_per_request
    spans = event_spans(raw, ceiling, kind.DESCRIPTOR.name)
    if spans is None:
        raise too_many(ceiling, limits, counted_up_to=True)
    try:
        request = kind.FromString(raw)
    except DecodeError:
        # Name the events that do not parse (invalid UTF-8 in a string, say).
        bad = []
        for index, (start, stop) in enumerate(spans):
            try:
                item.FromString(raw[start:stop])
            except DecodeError as error:
                name = item.DESCRIPTOR.name
                bad.append(_not_protobuf(f"events[{index}]", name, _why(error)).violations[0])
        if not bad:
            bad = _not_protobuf("events", kind.DESCRIPTOR.name, "it does not parse").violations
        raise InvalidEvents(bad) from None
    request.DiscardUnknownFields()
    return request


def _why(error: DecodeError) -> str:
    return str(error).rpartition(": ")[2]


def _not_protobuf(field: str, kind: str, why: str) -> InvalidEvents:
    return InvalidEvents([FieldViolation(field, f"not a valid {kind}: {why}", "protobuf_invalid")])


def validate_events(events: Sequence[pb.Event], limits: Limits) -> list[bytes]:
    """Each event serialized, once all pass; else raise InvalidEvents naming every violation.

    The size rules need each event's serialized length, and the caller needs the
    serialized events for the queue: serializing once serves both.
    """
    if len(events) > limits.max_events_per_request:
        # Refused before looking at any event: their number is the request's fault.
        raise too_many(len(events), limits)
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
