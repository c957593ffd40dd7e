"""POST /create-events as a lean ASGI handler.

FastAPI documents the route (rest_bridge.app) but does not serve it: its generic
pipeline (middleware stack, dependency solving, stdlib JSON, Starlette responses)
cost more CPU than parsing, validating and forwarding the events themselves. This
handler keeps FastAPI's observable behaviour, 422 bodies included: the same
pydantic TypeAdapter validates the same Python values, and JSON that orjson
refuses is parsed again by the stdlib parser that FastAPI uses.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from http.cookies import SimpleCookie
from typing import Any
from urllib.parse import parse_qsl

import grpc
import orjson
from pydantic import TypeAdapter, ValidationError

from events_server.codec import event_from_dict
from events_server.pb import events_pb2 as pb
from events_server.pb import events_pb2_grpc
from rest_bridge.config import BridgeSettings
from rest_bridge.errors import (
    REQUEST_TOO_LARGE,
    grpc_error_response,
    invalid_body,
    unprocessable,
    validation_detail,
)
from rest_bridge.models import Event, unencodable_locations
from rest_bridge.rejected import RejectedReporter
from rest_bridge.responses import Reply, json_reply
from rest_bridge.upstream import forwarded_metadata

EVENTS: TypeAdapter[list[Event]] = TypeAdapter(list[Event])

STATUS_NAMES = {
    pb.EventResult.STATUS_ACCEPTED: "accepted",
    pb.EventResult.STATUS_DUPLICATE: "duplicate",
}

_UNSET = object()


def _is_json(content_type: str) -> bool:
    """FastAPI's rule: application/json or application/*+json (parameters ignored)."""
    mime = content_type.partition(";")[0].strip().lower()
    kind, _, subtype = mime.partition("/")
    return kind == "application" and (subtype == "json" or subtype.endswith("+json"))


def _parse_json(body: bytes) -> Any:
    """The body as Python values as FastAPI parses it, or a 422 Reply when it does not parse."""
    try:
        return json.loads(body)
    except json.JSONDecodeError as error:
        return invalid_body(["body", error.pos], "JSON decode error", "json_invalid")
    except UnicodeDecodeError as error:
        # FastAPI answers 400 "There was an error parsing the body"; JSON must be UTF-8.
        return invalid_body(
            ["body", error.start], "JSON decode error: invalid UTF-8", "json_invalid"
        )
    except RecursionError:
        return invalid_body(["body"], "JSON decode error: nested too deeply", "json_invalid")
    except ValueError as error:
        # Python refuses to convert integers of over 4300 digits (a guard against
        # quadratic parsing); FastAPI would answer 500.
        return invalid_body(["body"], f"JSON decode error: {error}", "json_invalid")


def validate_body(body: bytes, content_type: str | None) -> list[Event] | Reply:
    """The request body as Events, or the contract's 422 Reply."""
    is_json = bool(content_type) and _is_json(content_type or "")
    if body and is_json:
        try:
            return EVENTS.validate_json(body)
        except ValidationError:
            pass  # FastAPI's way below, for FastAPI's exact 422
    value: Any = _UNSET
    if body:
        if is_json:
            value = _parse_json(body)
            if isinstance(value, Reply):
                return value
        else:
            value = body  # as FastAPI: a non-JSON body is validated as raw bytes (and fails)
    if value is _UNSET:
        return invalid_body(["body"], "Field required", "missing")
    try:
        return EVENTS.validate_python(value, from_attributes=True)
    except ValidationError as exc:
        return unprocessable(
            [
                validation_detail(["body", *e["loc"]], e["msg"], e["type"])
                for e in exc.errors(include_url=False, include_context=False, include_input=False)
            ]
        )


def api_key(headers: dict[bytes, bytes], query_string: bytes) -> str | None:
    """The API key: the X-API-KEY header, else the api_key query parameter, else the cookie."""
    if key := headers.get(b"x-api-key"):
        return key.decode("latin-1")
    if query_string:
        for name, value in parse_qsl(query_string.decode("latin-1")):
            if name == "api_key" and value:
                return value
    if cookie := headers.get(b"cookie"):
        jar: SimpleCookie = SimpleCookie()
        jar.load(cookie.decode("latin-1"))
        if (morsel := jar.get("X-API-KEY")) and morsel.value:
            return morsel.value
    return None


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
        stub: Callable[[], events_pb2_grpc.EventsServiceAsyncStub],
        rejected: RejectedReporter | None = None,
    ) -> None:
        self._settings = settings
        self._stub = stub
        self._rejected = rejected

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        chunks = []
        more = True
        while more:
            message = await receive()
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        reply = await self.handle(scope, b"".join(chunks))
        await reply.send(send)

    async def handle(self, scope: dict[str, Any], body: bytes) -> Reply:
        """The reply to one request with its whole body."""
        headers = dict(scope["headers"])
        key = api_key(headers, scope.get("query_string", b""))
        content_type = headers.get(b"content-type")
        events = validate_body(body, content_type.decode("latin-1") if content_type else None)
        if isinstance(events, Reply):
            self._report_rejected(body, events, key)
            return events
        try:
            call = pb.CreateEventsRequest(events=[event_from_dict(vars(e)) for e in events])
        except UnicodeEncodeError:
            reply = unprocessable(
                [
                    validation_detail(
                        loc, "String should be valid UTF-8 (no lone surrogates)", "string_unicode"
                    )
                    for loc in unencodable_locations(events)
                ]
            )
            self._report_rejected(body, reply, key)
            return reply
        client = scope.get("client")
        metadata = forwarded_metadata(headers, client[0] if client else "", key)
        try:
            response = await self._stub().CreateEvents(
                call, timeout=self._settings.grpc_timeout_seconds, metadata=metadata
            )
        except grpc.aio.AioRpcError as error:
            reply = grpc_error_response(error, self._settings.retry_after_seconds)
            if reply.status == REQUEST_TOO_LARGE:
                # gRPC refused it before the server could record it: the bridge does.
                message = orjson.loads(reply.body)["detail"]
                detail = [validation_detail(["body"], message, "request_too_large")]
                self._report(body, detail, key)
            return reply
        return json_reply(200, response_body(response))

    def _report_rejected(self, body: bytes, reply: Reply, key: str | None) -> None:
        """File a request the bridge refused itself in the rejected record (in the background)."""
        self._report(body, orjson.loads(reply.body)["detail"], key)

    def _report(self, body: bytes, detail: list[dict[str, Any]], key: str | None) -> None:
        if self._rejected is not None:
            self._rejected.report(body, detail, key)
