"""POST /create-events as a lean ASGI handler.

FastAPI documents the route (rest_bridge.app) but does not serve it: its generic
pipeline (middleware stack, dependency solving, stdlib JSON, Starlette responses)
cost more CPU than parsing, validating and forwarding the events themselves. This
handler keeps FastAPI's observable behaviour, 422 bodies included (``input`` and
``ctx`` too): a body pydantic's JSON validation refuses is parsed again by the
stdlib parser FastAPI uses, and validated as FastAPI validates it (the same
TypeAdapter, ``validate_python(from_attributes=True)``). Before any of that,
rest_bridge.body takes the body: media type, gzip, size limits. The WebSocket
path validates its frames' events with ``validate_events``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import grpc
import orjson
from pydantic import TypeAdapter, ValidationError

from events_server.pb import events_pb2 as pb
from events_server.wire.codec import event_from_dict
from rest_bridge.body import BodyRefused, check_media_type, is_gzipped, read_body
from rest_bridge.config import BridgeSettings
from rest_bridge.cors import Cors
from rest_bridge.credentials import api_key
from rest_bridge.errors import (
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
from rest_bridge.models import Event, unencodable_locations
from rest_bridge.rejected import RejectedReporter
from rest_bridge.responses import Reply, json_reply
from rest_bridge.upstream import forwarded_metadata

EVENTS: TypeAdapter[list[Event]] = TypeAdapter(list[Event])

STATUS_NAMES = {
    pb.EventResult.STATUS_ACCEPTED: "accepted",
    pb.EventResult.STATUS_DUPLICATE: "duplicate",
}


def _parse_json(body: bytes, max_depth: int) -> Any:
    """The body as Python values as FastAPI parses it, or a 422 Reply when it does not parse."""
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
    """Why events are refused: the detail of the 422 (the contract's HTTPValidationError)."""

    detail: list[dict[str, Any]]


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


def validate_events(value: Any) -> list[pb.Event] | Unprocessable:
    """A parsed request body (the JSON array of events) as protobuf Events, or why not.

    ``value`` is the JSON as json.loads gives it. The refusal is FastAPI's 422 for
    the contract's body, error for error (``loc`` under ``body``, with ``input`` and
    ``ctx``); strings JSON allows but UTF-8 does not (lone surrogates) are refused
    after it, as ``string_unicode``.
    """
    try:
        events = EVENTS.validate_python(value, from_attributes=True)
    except ValidationError as error:
        return Unprocessable(body_errors(error))
    return _as_protobuf(events)


def validate_body(body: bytes, max_depth: int) -> list[pb.Event] | Reply:
    """A JSON request body as protobuf Events, or its 422 Reply (FastAPI's, but for the
    bridge's own refusals: nesting past ``max_depth``, invalid UTF-8, lone surrogates)."""
    if not body:
        return unprocessable(missing_body())
    try:
        # Success implies a shallow body: list[Event] nests MIN_JSON_DEPTH deep at
        # most, and max_depth is at least that. So depth is checked on failure only.
        events = EVENTS.validate_json(body)
    except ValidationError:
        # FastAPI's way, for FastAPI's exact 422: the stdlib parser, then the same
        # model on its Python values (pydantic's JSON errors differ in places).
        value = _parse_json(body, max_depth)
        if isinstance(value, Reply):
            return value
        result = validate_events(value)
    else:
        result = _as_protobuf(events)
    return unprocessable(result.detail) if isinstance(result, Unprocessable) else result


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
        rejected: RejectedReporter | None = None,
    ) -> None:
        self._settings = settings
        self._gatherer = gatherer
        self._cors = cors
        self._rejected = rejected

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
            body = await read_body(
                receive, headers.get(b"content-length"), gzipped, self._settings.max_body_bytes
            )
        except BodyRefused as refused:
            reply = refused.reply
        else:
            reply = await self.handle(scope, headers, key, body)
        await reply.send(send, cors)

    async def handle(
        self, scope: dict[str, Any], headers: dict[bytes, bytes], key: str | None, body: bytes
    ) -> Reply:
        """The reply to one request with its whole (inflated) JSON body."""
        events = validate_body(body, self._settings.max_json_depth)
        if isinstance(events, Reply):
            self._report_rejected(body, events, key, headers)
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
                self._report(body, detail, key, headers)
            return reply
        return json_reply(200, response_body(response))

    def _report_rejected(
        self, body: bytes, reply: Reply, key: str | None, headers: dict[bytes, bytes]
    ) -> None:
        """File a request the bridge refused itself in the rejected record (in the background)."""
        self._report(body, orjson.loads(reply.body)["detail"], key, headers)

    def _report(
        self,
        body: bytes,
        detail: list[dict[str, Any]],
        key: str | None,
        headers: dict[bytes, bytes],
    ) -> None:
        """Report ``body``: the inflated one, at most max_body_bytes, never a gzip bomb."""
        if self._rejected is not None:
            origin = headers.get(b"origin")
            page = origin.decode("latin-1") if origin else None
            self._rejected.report(body, detail, key, page)
