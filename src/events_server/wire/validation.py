"""The rules every event must pass, for JSON and direct gRPC callers alike.

The server enforces them; the Python client checks dicts against the same rules
before sending.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from google.protobuf.descriptor import FieldDescriptor

from events_server.pb import events_pb2 as pb
from events_server.wire.codec import TYPE_NAMES
from events_server.wire.violations import FieldViolation


@dataclass(frozen=True, slots=True)
class Limits:
    """How big a request and its events may be (the server's ``max_*`` settings)."""

    max_events_per_request: int
    max_event_bytes: int
    max_string_length: int


def _is_string(field: FieldDescriptor) -> bool:
    return field.type == FieldDescriptor.TYPE_STRING


def _is_string_map(field: FieldDescriptor) -> bool:
    entry = field.message_type
    return (
        entry is not None
        and entry.GetOptions().map_entry
        and all(_is_string(f) for f in entry.fields)
    )


# Read from the descriptor, so a string field added to Event is limited too.
_FIELDS = pb.Event.DESCRIPTOR.fields
_SCALARS = tuple(f.name for f in _FIELDS if _is_string(f) and not f.is_repeated)
_LISTS = tuple(f.name for f in _FIELDS if _is_string(f) and f.is_repeated)
_MAPS = tuple(f.name for f in _FIELDS if _is_string_map(f))

_KEY_SHOWN = 40
"""Characters of a map key quoted in a description (the key may be the long string)."""


def _shown(key: str) -> str:
    return repr(key if len(key) <= _KEY_SHOWN else key[:_KEY_SHOWN] + "...")


def _long_strings(event: pb.Event, path: str, limit: int) -> Iterator[tuple[str, str]]:
    """(field path, what is too long) for each string of the event longer than ``limit``."""
    for name in _SCALARS:
        if len(value := getattr(event, name)) > limit:
            yield f"{path}.{name}", f"{name} is {len(value)} characters long"
    for name in _LISTS:
        for i, item in enumerate(getattr(event, name)):
            if len(item) > limit:
                yield f"{path}.{name}[{i}]", f"{name}[{i}] is {len(item)} characters long"
    for name in _MAPS:
        for key, value in getattr(event, name).items():
            if len(key) > limit:
                yield (
                    f"{path}.{name}",
                    f"a key of {name} ({_shown(key)}) is {len(key)} characters long",
                )
            if len(value) > limit:
                yield f"{path}.{name}", f"{name}[{_shown(key)}] is {len(value)} characters long"


def size_violations(
    index: int, size: int, limits: Limits, long_strings: Iterable[tuple[str, str]]
) -> list[FieldViolation]:
    """The size rules for event ``index``, ``size`` bytes as protobuf.

    ``long_strings`` gives (field path, what is too long) for each string of the event
    longer than ``limits.max_string_length``; it is read only when the event is large
    enough to hold one.
    """
    found: list[FieldViolation] = []
    if size > limits.max_event_bytes:
        found.append(
            FieldViolation(
                f"events[{index}]",
                f"the event is {size} bytes as protobuf; at most {limits.max_event_bytes} are"
                " allowed (max_event_bytes)",
                "event_too_large",
            )
        )
    # A string of n characters takes at least n UTF-8 bytes: a small event has no long one.
    if size > limits.max_string_length:
        for field, what in long_strings:
            found.append(
                FieldViolation(
                    field,
                    f"{what}; at most {limits.max_string_length} are allowed (max_string_length)",
                    "string_too_long",
                )
            )
    return found


def event_violations(
    index: int, event: pb.Event, limits: Limits | None = None, size: int | None = None
) -> list[FieldViolation]:
    """What is wrong with one event (empty when it is valid); ``limits`` adds the size rules.

    ``size`` is the event's serialized size when the caller has it (else it is computed).
    """
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
    if limits is None:
        return found
    size = event.ByteSize() if size is None else size
    long_strings = _long_strings(event, f"events[{index}]", limits.max_string_length)
    return found + size_violations(index, size, limits, long_strings)
