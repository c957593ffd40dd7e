"""gRPC status -> HTTP response: the bridge's one error mapping (grpc-gateway's table)."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from typing import Any

import grpc
import orjson
from pydantic import ValidationError

from events_server.wire.metadata import MD_RETRY_AFTER
from events_server.wire.violations import unpack_violations
from rest_bridge.responses import Reply, json_reply

HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    # grpc-gateway says 400; the contract answers every invalid event with 422.
    grpc.StatusCode.INVALID_ARGUMENT: 422,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
    grpc.StatusCode.UNAUTHENTICATED: 401,
}

# Codes a client should simply retry later: they get Retry-After.
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})

# RFC 9110 requires a challenge with every 401. API keys have no registered scheme;
# "APIKey" is FastAPI's (fastapi.security.APIKeyHeader), and unlike "Basic" it makes
# no browser pop up a password dialog.
WWW_AUTHENTICATE = "APIKey"

# gRPC's own RESOURCE_EXHAUSTED for a message over the server's max_request_bytes
# ("SERVER: Received message larger than max (N vs. M)"): not backpressure, so not a
# 429 to retry, but grpc-gateway's 413.
_TOO_LARGE = re.compile(r"message larger than max", re.IGNORECASE)
REQUEST_TOO_LARGE = 413

# events (the request), events[3] (an event), events[3].url, events[3].variant_ids[1]
_FIELD_PATH = re.compile(r"^events(?:\[(\d+)\](?:\.(\w+)(?:\[(\d+)\])?)?)?$")


def _printable(part: str | int) -> str | int:
    # A lone surrogate (JSON allows "\\ud800" in a key) cannot be written as UTF-8.
    if isinstance(part, str) and not part.isascii():
        return part.encode("utf-8", "backslashreplace").decode()
    return part


def validation_detail(loc: list[str | int], msg: str, kind: str) -> dict[str, Any]:
    """One item of a 422 body, exactly the contract's ValidationError: the bridge's own."""
    return {"loc": [_printable(p) for p in loc], "msg": msg, "type": kind}


def body_errors(error: ValidationError) -> list[dict[str, Any]]:
    """FastAPI's 422 detail for a request body that failed validation.

    Every error as pydantic gives it, its ``input`` and ``ctx`` included, located
    under ``body``: what FastAPI's request_validation_exception_handler answers.
    """
    return [{**e, "loc": ["body", *e["loc"]]} for e in error.errors(include_url=False)]


def missing_body() -> list[dict[str, Any]]:
    """FastAPI's 422 detail for an empty body."""
    return [{"type": "missing", "loc": ["body"], "msg": "Field required", "input": None}]


def json_invalid(position: int, why: str) -> list[dict[str, Any]]:
    """FastAPI's 422 detail for a body the stdlib JSON parser refuses (JSONDecodeError)."""
    return [
        {
            "type": "json_invalid",
            "loc": ["body", position],
            "msg": "JSON decode error",
            "input": {},
            "ctx": {"error": why},
        }
    ]


def _writable(value: Any) -> Any:
    """``value`` with what JSON text cannot hold made so: lone surrogates, NaN, infinities."""
    if isinstance(value, str):
        return value if value.isascii() else _printable(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None  # as orjson writes them
    if isinstance(value, dict):
        return {_writable(k): _writable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_writable(v) for v in value]
    return value


MAX_LISTED_ERRORS = 50
"""Errors a 422 lists; past them, one more item says how many were left out."""

MAX_422_BYTES = 64 * 1024
"""Largest 422 body: FastAPI's echoes (``input``) of a 1 MiB body could fill megabytes."""

TOO_MANY_ERRORS = "too_many_errors"

# In a bounded 422: the longest string kept of a location part, a message or an echo.
_MAX_SHOWN_CHARS = 128


def _encode(data: Any) -> bytes:
    try:
        return orjson.dumps(data)
    except orjson.JSONEncodeError:
        # An echoed input holds a lone surrogate ("\ud800" is valid JSON; UTF-8 has no
        # such character) or an integer past 64 bits, which orjson does not write.
        # (FastAPI answers 500 for the first, and for NaN, which orjson writes as null.)
        text = json.dumps(_writable(data), ensure_ascii=False, separators=(",", ":"), default=str)
        return text.encode()


def _clip(part: Any, most: int = _MAX_SHOWN_CHARS) -> Any:
    return f"{part[:most]}..." if isinstance(part, str) and len(part) > most else part


def _bounded_item(item: dict[str, Any]) -> dict[str, Any]:
    """An error item cut to a bounded size: long location parts and messages clipped, and
    an ``input`` echo left out when it is an object, an array or a long string."""
    shown = {k: v for k, v in item.items() if k not in {"input", "ctx"}}
    shown["loc"] = [_clip(part) for part in item.get("loc", [])]
    shown["msg"] = _clip(item.get("msg", ""), 4 * _MAX_SHOWN_CHARS)
    echo = item.get("input")
    long_text = isinstance(echo, str) and len(echo) > _MAX_SHOWN_CHARS
    if "input" in item and not isinstance(echo, dict | list) and not long_text:
        shown["input"] = echo
    if isinstance(ctx := item.get("ctx"), dict):
        shown["ctx"] = {k: _clip(v, 4 * _MAX_SHOWN_CHARS) for k, v in ctx.items()}
    return shown


def _left_out(count: int) -> dict[str, Any]:
    return validation_detail(
        ["body"],
        f"{count} more errors not listed: a 422 lists the first {MAX_LISTED_ERRORS}",
        TOO_MANY_ERRORS,
    )


def unprocessable(detail: list[dict[str, Any]], more: int = 0) -> Reply:
    """A 422 with the contract's HTTPValidationError body.

    ``more``: errors found past those in ``detail`` (which the caller did not list).
    Up to MAX_LISTED_ERRORS errors, in at most MAX_422_BYTES, the body is ``detail``
    whole (FastAPI's). Past either bound it lists the first errors, cut to size (no
    object, array or long-string ``input`` echoes; long location parts and messages
    clipped), then one ``too_many_errors`` item saying how many were left out.
    """
    if len(detail) > MAX_LISTED_ERRORS:
        more += len(detail) - MAX_LISTED_ERRORS
        detail = detail[:MAX_LISTED_ERRORS]
    if not more:
        body = _encode({"detail": detail})
        if len(body) <= MAX_422_BYTES:
            return Reply(422, body)
    items = [_bounded_item(item) for item in detail]
    while True:
        body = _encode({"detail": [*items, _left_out(more)] if more else items})
        if len(body) <= MAX_422_BYTES or not items:
            return Reply(422, body)
        items.pop()  # still too large (many long keys): list fewer
        more += 1


def invalid_body(loc: list[str | int], msg: str, kind: str) -> Reply:
    """A 422 naming one thing wrong with the body."""
    return unprocessable([validation_detail(loc, msg, kind)])


def v1_field_loc(path: str) -> list[str | int]:
    """``events[3].tenant`` -> ``["body", 3, "tenant"]``: where it was in the JSON body (v1:
    the body is the events array)."""
    match = _FIELD_PATH.match(path)
    if match is None:
        return ["body", path]
    event, field, item = match.groups()
    loc: list[str | int] = ["body"]
    if event is not None:
        loc.append(int(event))
    if field is not None:
        loc.append(field)
    if item is not None:
        loc.append(int(item))
    return loc


# events[0].purchase.products[1].price_number: names, each with an optional index.
_TRACK_PATH = re.compile(r"^events(\[\d+\])?(\.\w+(\[\d+\])?)*$")
_TRACK_PART = re.compile(r"(\w+)|\[(\d+)\]")
_PRICE_FIELDS = frozenset({"price_number", "price_text"})


def v2_field_loc(path: str) -> list[str | int]:
    """``events[0].purchase.products[1].price_number`` -> ``["body", "events", 0, "products",
    1, "price"]``: where it was in a v2 JSON body (no kind around an event; one ``price``)."""
    if _TRACK_PATH.match(path) is None:
        return ["body", path]
    parts: list[str | int] = [
        int(index) if index else name for name, index in _TRACK_PART.findall(path)
    ]
    if len(parts) > 2 and parts[2] in {"purchase", "transaction_mapping", "product_unavailable"}:
        del parts[2]  # the TrackedEvent's oneof: the JSON event is the kind itself
    return ["body", *("price" if part in _PRICE_FIELDS else part for part in parts)]


FieldLoc = Callable[[str], list[str | int]]


def _violations(error: grpc.aio.AioRpcError, locate: FieldLoc) -> list[dict[str, Any]]:
    return [
        validation_detail(locate(v.field), v.description, v.reason or "value_error")
        for v in unpack_violations(error.trailing_metadata())  # type: ignore[arg-type]
    ]


def too_large_detail(message: str) -> str:
    """The 413's detail: what gRPC said, and what to do about it."""
    return (
        f"request too large for the events server ({message}); it accepts at most"
        " max_request_bytes of protobuf per request: send fewer or smaller events"
    )


def grpc_error_response(
    error: grpc.aio.AioRpcError, retry_after_seconds: int, locate: FieldLoc = v1_field_loc
) -> Reply:
    """The HTTP response for a failed CreateEvents (or Track) call; ``locate``: where a field
    the server names was in the request's JSON body."""
    code = error.code()
    http_status = HTTP_STATUS.get(code, 500)
    message = error.details() or code.name
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return unprocessable(
            _violations(error, locate) or [validation_detail(["body"], message, "value_error")]
        )
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and _TOO_LARGE.search(message):
        return json_reply(REQUEST_TOO_LARGE, {"detail": too_large_detail(message)})
    headers: dict[str, str] = {}
    if code in RETRYABLE:
        # The server's own figure (a rate limit's wait) where it gave one.
        headers["Retry-After"] = _server_retry_after(error) or str(retry_after_seconds)
    elif code == grpc.StatusCode.UNAUTHENTICATED:
        headers["WWW-Authenticate"] = WWW_AUTHENTICATE
    return json_reply(http_status, {"detail": message}, headers)


def _server_retry_after(error: grpc.aio.AioRpcError) -> str | None:
    for key, value in error.trailing_metadata() or ():
        if key == MD_RETRY_AFTER and isinstance(value, str) and value.isdigit():
            return value
    return None
