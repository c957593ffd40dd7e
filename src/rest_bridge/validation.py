"""The v1 contract's request body (a JSON array of ``Event``) validated as FastAPI validates it.

FastAPI documents POST /create-events (rest_bridge.app) but does not serve it
(rest_bridge.routes.v1): its generic pipeline cost more CPU than parsing, validating and
forwarding the events themselves. This module keeps FastAPI's observable behaviour, 422
bodies included (``input`` and ``ctx`` too): a body pydantic's JSON validation refuses is
parsed again by the stdlib parser FastAPI uses (rest_bridge.jsonbody), and validated as
FastAPI validates it (the same TypeAdapter, ``validate_python(from_attributes=True)``),
with two bounds FastAPI lacks: a body of more than ``max_events_per_request`` items is
refused before any is validated, and a 422 lists at most MAX_LISTED_ERRORS errors (the
others counted, not built). rest_bridge.offload decides where it runs (on the event loop,
or in a worker process when that would hold the loop). The WebSocket path validates its
frames' events with ``validate_body``.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import islice
from typing import Annotated, Any

from pydantic import FailFast, TypeAdapter, ValidationError
from pydantic_core import ErrorDetails

from events_server.pb import events_pb2 as pb
from events_server.wire.codec import event_from_dict
from events_server.wire.rejected import tenants_of
from rest_bridge.errors import (
    MAX_LISTED_ERRORS,
    body_errors,
    missing_body,
    unprocessable,
    validation_detail,
)
from rest_bridge.fastpath import quick_request
from rest_bridge.jsonbody import nests_deeper, parse_json, too_deep, too_many_events
from rest_bridge.models import Event, String, unencodable_locations
from rest_bridge.responses import Reply

EVENTS: TypeAdapter[list[Event]] = TypeAdapter(list[Event])
UNTIL_INVALID: TypeAdapter[list[Event]] = TypeAdapter(Annotated[list[Event], FailFast()])


def _checked_json(body: bytes, max_depth: int, max_events: int | None) -> Any:
    """The body parsed as FastAPI parses it, or the 422 Reply of: JSON that does not
    parse, more than ``max_events`` events (counted first: a count is cheap, the rest is
    not), nesting past ``max_depth``."""
    value = parse_json(body, max_depth)
    if isinstance(value, Reply):
        return value
    if max_events is not None and isinstance(value, list) and len(value) > max_events:
        return too_many_events(len(value), max_events)
    if nests_deeper(value, max_depth):
        return too_deep(max_depth)
    return value


@dataclass(frozen=True, slots=True)
class Unprocessable:
    """Why events are refused: the detail of the 422 (the contract's HTTPValidationError),
    and how many more errors were found past those listed."""

    detail: list[dict[str, Any]]
    more: int = 0


def _as_protobuf(events: list[Event]) -> list[pb.Event] | Unprocessable:
    try:
        return [event_from_dict(vars(e)) for e in events]
    except UnicodeEncodeError:
        return Unprocessable(
            [
                validation_detail(
                    loc, "String should be valid UTF-8 (no lone surrogates)", "string_unicode"
                )
                for loc in unencodable_locations(events)
            ]
        )


EVENT: TypeAdapter[Event] = TypeAdapter(Event)
_VARIANT_IDS: TypeAdapter[list[str]] = TypeAdapter(list[String])
_IDENTIFIERS: TypeAdapter[dict[str, str]] = TypeAdapter(dict[str, String])
_FIELDS = frozenset(Event.model_fields)


def _prefix_with_errors(adapter: TypeAdapter[Any], value: Any, need: int) -> Any:
    """The shortest prefix of list or dict ``value`` (tried in growing sizes) holding
    ``need`` errors for ``adapter``, else all of it: the errors of its items, in order."""
    size = need
    while True:
        part = value[:size] if isinstance(value, list) else dict(islice(value.items(), size))
        if size >= len(value):
            return part
        try:
            adapter.validate_python(part)
        except ValidationError as error:
            if error.error_count() >= need:
                return part
        size *= 4


def _first_errors(item: dict[Any, Any], need: int) -> list[ErrorDetails]:
    """The first ``need`` errors of event ``item`` as pydantic lists them, without building
    the others (an event can hold 300,000 bad variant ids: pydantic's error dicts for them
    take a second).

    pydantic lists a model's errors field by field in the model's order, each list or
    dict item in order, then the unknown keys in the input's order: a copy of ``item``
    cut to a prefix of each holding ``need`` errors starts with the same errors.
    """
    cut: dict[Any, Any] = {}
    unknown = 0
    for key, value in item.items():
        kept = value
        if key not in _FIELDS:
            unknown += 1
            if unknown > need:
                continue
        elif key == "variant_ids" and isinstance(value, list) and len(value) > need:
            kept = _prefix_with_errors(_VARIANT_IDS, value, need)
        elif key == "entity_identifiers" and isinstance(value, dict) and len(value) > need:
            kept = _prefix_with_errors(_IDENTIFIERS, value, need)
        cut[key] = kept
    try:
        EVENT.validate_python(cut, from_attributes=True)
    except ValidationError as error:
        return error.errors(include_url=False)[:need]
    return []  # (a cut of an invalid event is invalid: not reached)


def validate_events(value: Any) -> list[pb.Event] | Unprocessable:
    """A parsed request body (the JSON array of events) as protobuf Events, or why not.

    ``value`` is the JSON as json.loads gives it. The refusal is FastAPI's 422 for
    the contract's body, error for error (``loc`` under ``body``, with ``input`` and
    ``ctx``), up to MAX_LISTED_ERRORS: past them only the count of the others is
    taken (rest_bridge.errors.unprocessable says it). Strings JSON allows but UTF-8
    does not (lone surrogates) are refused after it, as ``string_unicode``.
    """
    if not isinstance(value, list):
        try:
            EVENTS.validate_python(value, from_attributes=True)
        except ValidationError as error:
            return Unprocessable(body_errors(error))
    # Event by event: FastAPI's list errors are each event's, in order, under its index.
    events: list[Event] = []
    detail: list[dict[str, Any]] = []
    more = 0
    for index, item in enumerate(value):
        try:
            events.append(EVENT.validate_python(item, from_attributes=True))
        except ValidationError as error:
            room = MAX_LISTED_ERRORS - len(detail)
            count = error.error_count()
            more += max(0, count - room)
            if room <= 0:
                continue
            errors: list[ErrorDetails]
            if count <= room:
                errors = error.errors(include_url=False)
            elif isinstance(item, dict):
                errors = _first_errors(item, room)
            else:
                errors = error.errors(include_url=False)[:room]
            detail.extend({**e, "loc": ["body", index, *e["loc"]]} for e in errors)
    if detail:
        return Unprocessable(detail, more)
    return _as_protobuf(events)


def _refused(result: list[pb.Event] | Unprocessable) -> list[pb.Event] | Reply:
    if isinstance(result, Unprocessable):
        return unprocessable(result.detail, result.more)
    return result


def valid_events(body: bytes) -> list[Event] | None:
    """The events of a valid JSON body; None when it is not valid.

    pydantic's JSON validation, stopped at the first invalid event (FailFast): a refusal
    costs that event's errors and a parse of the body, never every event's errors.
    """
    try:
        return UNTIL_INVALID.validate_json(body)
    except ValidationError:
        return None


def quick_events(body: bytes, max_events: int) -> pb.CreateEventsRequest | Reply | None:
    """The request of ``body`` when it is clearly valid (rest_bridge.fastpath) or pydantic's
    JSON validation takes it (stopped at the first invalid event: a bounded cost), else
    None."""
    if (request := quick_request(body, max_events)) is not None:
        return request
    events = valid_events(body)
    return None if events is None else _request(accepted_events(events, max_events))


def accepted_events(events: list[Event], max_events: int | None) -> list[pb.Event] | Reply:
    """Valid events as protobuf, or the 422 of too many of them (or of lone surrogates)."""
    if max_events is not None and len(events) > max_events:
        return too_many_events(len(events), max_events)
    return _refused(_as_protobuf(events))


def validate_body(
    body: bytes, max_depth: int, max_events: int | None = None
) -> list[pb.Event] | Reply:
    """A JSON request body as protobuf Events, or its 422 Reply (FastAPI's, but for the
    bridge's own refusals: nesting past ``max_depth``, more than ``max_events`` events,
    invalid UTF-8, lone surrogates, errors past MAX_LISTED_ERRORS).

    For small bodies (see rest_bridge.offload): the cost of a refusal grows with the
    errors found, ~8 µs per comma at worst. validate_large_body takes any body.
    A body clearly valid takes one quick pass (rest_bridge.fastpath), any other the full
    validation (validate_body_fully).
    """
    if (request := quick_request(body, max_events)) is not None:
        return list(request.events)
    return validate_body_fully(body, max_depth, max_events)


def validate_request(
    body: bytes, max_depth: int, max_events: int | None = None
) -> pb.CreateEventsRequest | Reply:
    """validate_body's events as the CreateEventsRequest of them (what POST /create-events
    sends), built at once when the body is clearly valid."""
    if (request := quick_request(body, max_events)) is not None:
        return request
    return _request(validate_body_fully(body, max_depth, max_events))


def _request(result: list[pb.Event] | Reply) -> pb.CreateEventsRequest | Reply:
    return result if isinstance(result, Reply) else pb.CreateEventsRequest(events=result)


def validate_body_fully(
    body: bytes, max_depth: int, max_events: int | None = None
) -> list[pb.Event] | Reply:
    """validate_body by the models alone (FastAPI's way), with no quick pass."""
    if not body:
        return unprocessable(missing_body())
    # Success implies a shallow body: list[Event] nests MIN_JSON_DEPTH deep at
    # most, and max_depth is at least that. So depth is checked on failure only.
    if (events := valid_events(body)) is not None:
        return accepted_events(events, max_events)
    # FastAPI's way, for FastAPI's exact 422: the stdlib parser, then the same
    # model on its Python values (pydantic's JSON errors differ in places).
    value = _checked_json(body, max_depth, max_events)
    if isinstance(value, Reply):
        return value
    return _refused(validate_events(value))


WORKER_FIRST_TRY_COMMAS = 65_536
"""validate_large_body tries pydantic's JSON validation first on bodies of at most this
many commas: faster when the body is valid; when it is not, a parse and one event's
errors lost (at most ~100 ms, in a worker process)."""


def validate_large_body(
    body: bytes, max_depth: int, max_events: int
) -> tuple[list[pb.Event] | Reply, list[str]]:
    """validate_body for any body, and the tenants it names (for a refusal's record).

    Its events are counted before anything else is looked at, and a refusal costs about
    one validation of the body, however many errors it holds. A body refused gets
    validate_body's answer (FastAPI's way: the stdlib parser, then the model on its values).
    """
    if not body:
        return unprocessable(missing_body()), []
    if body.count(b",") <= WORKER_FIRST_TRY_COMMAS and (events := valid_events(body)) is not None:
        tenants = tenants_of(e.tenant for e in islice(events, max_events))
        return accepted_events(events, max_events), tenants
    value = parse_json(body, max_depth)
    if isinstance(value, Reply):
        return value, []
    tenants = []
    if isinstance(value, list):
        # Those of the first events only: a record names 4 at most.
        tenants = tenants_of(e.get("tenant") for e in islice(value, max_events) if type(e) is dict)
        if len(value) > max_events:
            return too_many_events(len(value), max_events), tenants
    result = validate_events(value)
    # Valid events nest MIN_JSON_DEPTH deep at most: only a refusal needs the (costly) walk.
    if isinstance(result, Unprocessable) and nests_deeper(value, max_depth):
        return too_deep(max_depth), tenants
    return _refused(result), tenants


def events_in_worker(
    body: bytes, max_depth: int, max_events: int
) -> bytes | tuple[Reply, list[str]]:
    """In a worker process: the body's events as a serialized CreateEventsRequest, or the
    reply refusing it and the tenants it names (for its rejected-request record)."""
    result, tenants = validate_large_body(body, max_depth, max_events)
    if isinstance(result, Reply):
        return result, tenants
    return pb.CreateEventsRequest(events=result).SerializeToString()


def decode_events(raw: bytes) -> pb.CreateEventsRequest:
    """What events_in_worker serialized, as the request again."""
    return pb.CreateEventsRequest.FromString(raw)
