"""POST /create-events as a lean ASGI handler.

FastAPI documents the route (rest_bridge.app) but does not serve it: its generic
pipeline (middleware stack, dependency solving, stdlib JSON, Starlette responses)
cost more CPU than parsing, validating and forwarding the events themselves. This
handler keeps FastAPI's observable behaviour, 422 bodies included (``input`` and
``ctx`` too): a body pydantic's JSON validation refuses is parsed again by the
stdlib parser FastAPI uses, and validated as FastAPI validates it (the same
TypeAdapter, ``validate_python(from_attributes=True)``), with two bounds FastAPI
lacks: a body of more than ``max_events_per_request`` items is refused before any is
validated, and a 422 lists at most MAX_LISTED_ERRORS errors (the others counted, not
built). Before any of that, rest_bridge.body takes the body: media type, gzip, size
limits; rest_bridge.offload decides where it is parsed (on the event loop, or in a
worker process when that would hold the loop). The WebSocket path validates its
frames' events with ``validate_body``.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from itertools import islice
from typing import Annotated, Any

import grpc
import orjson
from pydantic import FailFast, TypeAdapter, ValidationError
from pydantic_core import ErrorDetails

from events_server.pb import events_pb2 as pb
from events_server.wire.codec import event_from_dict
from events_server.wire.rejected import tenants_of
from rest_bridge.admission import Admission
from rest_bridge.body import BodyRefused, check_media_type, is_gzipped, read_body
from rest_bridge.config import BridgeSettings
from rest_bridge.cors import Cors
from rest_bridge.credentials import api_key
from rest_bridge.errors import (
    MAX_LISTED_ERRORS,
    REQUEST_TOO_LARGE,
    body_errors,
    grpc_error_response,
    invalid_body,
    json_invalid,
    missing_body,
    unprocessable,
    validation_detail,
)
from rest_bridge.gather import Gatherer
from rest_bridge.models import Event, String, unencodable_locations
from rest_bridge.rejected import RejectedReporter
from rest_bridge.responses import Reply, json_reply
from rest_bridge.upstream import forwarded_metadata

EVENTS: TypeAdapter[list[Event]] = TypeAdapter(list[Event])
UNTIL_INVALID: TypeAdapter[list[Event]] = TypeAdapter(Annotated[list[Event], FailFast()])

UNPROCESSABLE = 422

STATUS_NAMES = {
    pb.EventResult.STATUS_ACCEPTED: "accepted",
    pb.EventResult.STATUS_DUPLICATE: "duplicate",
}


def _parse_json(body: bytes, max_depth: int) -> Any:
    """The body as Python values as FastAPI parses it, or a 422 Reply when it does not parse
    (its depth is left to the caller: see _checked_json)."""
    try:
        value = json.loads(body)
    except json.JSONDecodeError as error:
        return unprocessable(json_invalid(error.pos, error.msg))
    except UnicodeDecodeError as error:
        # FastAPI answers 400 "There was an error parsing the body", a status the
        # contract does not have, naming nothing. JSON must be UTF-8: say where it is not.
        return invalid_body(
            ["body", error.start], "JSON decode error: invalid UTF-8", "json_invalid"
        )
    except RecursionError:
        # The parser gives up near 1000 levels, far past any allowed max_depth.
        return _too_deep(max_depth)
    except ValueError as error:
        # Python refuses to convert integers of over 4300 digits (a guard against
        # quadratic parsing); FastAPI would answer that 400 too.
        return invalid_body(["body"], f"JSON decode error: {error}", "json_invalid")
    return value


def _checked_json(body: bytes, max_depth: int, max_events: int | None) -> Any:
    """The body parsed as FastAPI parses it, or the 422 Reply of: JSON that does not
    parse, more than ``max_events`` events (counted first: a count is cheap, the rest is
    not), nesting past ``max_depth``."""
    value = _parse_json(body, max_depth)
    if isinstance(value, Reply):
        return value
    if max_events is not None and isinstance(value, list) and len(value) > max_events:
        return too_many_events(len(value), max_events)
    if nests_deeper(value, max_depth):
        return _too_deep(max_depth)
    return value


def _too_deep(max_depth: int) -> Reply:
    return invalid_body(
        ["body"],
        f"JSON is nested deeper than the limit of {max_depth} levels of arrays and objects"
        " (max_json_depth)",
        "json_too_deep",
    )


def nests_deeper(value: Any, limit: int) -> bool:
    """Whether arrays and objects nest more than ``limit`` deep (a loop: no recursion)."""
    stack = [(value, 1)] if isinstance(value, list | dict) else []
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        children = item.values() if isinstance(item, dict) else item
        stack.extend((child, depth + 1) for child in children if isinstance(child, list | dict))
    return False


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


def too_many_events(count: int, max_events: int) -> Reply:
    """The server's own refusal of a request of more than ``max_events`` events."""
    return invalid_body(
        ["body"],
        f"the request has {count} events; at most {max_events} are allowed"
        " (max_events_per_request)",
        "too_many_events",
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
    """
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
    value = _parse_json(body, max_depth)
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
        return _too_deep(max_depth), tenants
    return _refused(result), tenants


def response_body(reply: pb.CreateEventsResponse) -> dict[str, Any]:
    """JSON body of a 200: the counts, then one result per event in request order."""
    return {
        "accepted": reply.accepted,
        "duplicates": reply.duplicates,
        "results": [
            {
                "status": STATUS_NAMES.get(r.status, "unknown"),
                "entry_id": r.entry_id,
                "partition": r.partition,
            }
            for r in reply.results
        ],
    }


class CreateEvents:
    """The ASGI app of POST /create-events."""

    def __init__(
        self,
        settings: BridgeSettings,
        gatherer: Gatherer,
        cors: Cors,
        rejected: RejectedReporter | None,
        admission: Admission,
    ) -> None:
        # (rest_bridge.offload runs this module's validation in its worker processes.)
        from rest_bridge.offload import BodyParser  # noqa: PLC0415

        self._settings = settings
        self._gatherer = gatherer
        self._cors = cors
        self._rejected = rejected
        self._admission = admission
        self._parser = BodyParser(settings)

    def close(self) -> None:
        """Stop the body-parsing processes (at shutdown)."""
        self._parser.close()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        headers = dict(scope["headers"])
        key, source = api_key(headers, scope.get("query_string", b""))
        cors: list[tuple[bytes, bytes]] = []
        if (origin := headers.get(b"origin")) is not None:  # browsers only: not the hot path
            try:
                decision = await self._cors.decide(origin.decode("latin-1"), key)
            except grpc.aio.AioRpcError as error:
                await grpc_error_response(error, self._settings.retry_after_seconds).send(send)
                return
            # On every answer, the bridge's own 413/415/422 too: the page can read them.
            cors = self._cors.response_headers(origin, decision)
        try:
            check_media_type(headers.get(b"content-type"), source)
            gzipped = is_gzipped(headers.get(b"content-encoding"))
            if (denied := await self._admission.before_body(scope, headers, key)) is not None:
                raise BodyRefused(denied)  # unread: nothing costly before the caller is known
            async with asyncio.timeout(self._settings.body_timeout_seconds):
                body = await read_body(
                    receive, headers.get(b"content-length"), gzipped, self._settings.max_body_bytes
                )
        except BodyRefused as refused:
            reply = refused.reply
        except TimeoutError:
            reply = _body_timed_out(self._settings.body_timeout_seconds)
        else:
            reply = await self.handle(scope, headers, key, body)
        await reply.send(send, cors)

    async def handle(
        self, scope: dict[str, Any], headers: dict[bytes, bytes], key: str | None, body: bytes
    ) -> Reply:
        """The reply to one request with its whole (inflated) JSON body."""
        events, tenants = await self._parser.parse(body)
        if isinstance(events, Reply):
            if events.status == UNPROCESSABLE:
                self._report(body, orjson.loads(events.body)["detail"], key, headers, tenants)
            return events
        call = pb.CreateEventsRequest(events=events)
        client = scope.get("client")
        metadata = forwarded_metadata(headers, client[0] if client else "", key)
        try:
            response = await self._gatherer.create_events(call, metadata)
        except grpc.aio.AioRpcError as error:
            reply = grpc_error_response(error, self._settings.retry_after_seconds)
            if reply.status == REQUEST_TOO_LARGE:
                # gRPC refused it before the server could record it: the bridge does.
                message = orjson.loads(reply.body)["detail"]
                detail = [validation_detail(["body"], message, "request_too_large")]
                self._report(body, detail, key, headers, tenants_of(e.tenant for e in events))
            return reply
        return json_reply(200, response_body(response))

    def _report(
        self,
        body: bytes,
        detail: list[dict[str, Any]],
        key: str | None,
        headers: dict[bytes, bytes],
        tenants: list[str] | None,
    ) -> None:
        """Report ``body`` (the inflated one, at most max_body_bytes, never a gzip bomb) in
        the background; ``tenants``: those it names, when known (else read from it)."""
        if self._rejected is not None:
            origin = headers.get(b"origin")
            page = origin.decode("latin-1") if origin else None
            self._rejected.report(body, detail, key, page, tenants)


def _body_timed_out(seconds: float) -> Reply:
    return json_reply(
        408,
        {"detail": f"the body did not arrive within {seconds:g} seconds (body_timeout_seconds)"},
        # The rest of the body is not read: the connection cannot be reused.
        {"Connection": "close"},
    )
