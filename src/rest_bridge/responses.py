"""The bridge's HTTP replies, written straight to ASGI (no Starlette Response objects).

Under uvicorn's httptools protocol (the bridge's, rest_bridge.connections) a whole reply
is written to the connection at once (``write_at_once``): the bytes uvicorn's ``send``
writes for the same two messages, by the same rules (its default headers first, a
``connection: close`` when the connection is not kept alive or a header closes it, the
response then complete), without two passes of its generic checks over every header.
The headers the bridge writes itself (content type and length) need no check; every
other one is checked by uvicorn's own patterns, and a header the direct write does not
handle, or a connection uvicorn must wait on, takes uvicorn's ``send`` as before.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from uvicorn.protocols.http.httptools_impl import (
    HEADER_RE,
    HEADER_VALUE_RE,
    STATUS_LINE,
    RequestResponseCycle,
)

from rest_bridge.writes import TurnWrites

_JSON_TYPE = b"content-type: application/json\r\n"
_NOT_DIRECT = frozenset({b"content-length", b"transfer-encoding"})


@dataclass(frozen=True, slots=True)
class Reply:
    """A whole HTTP response: status, extra headers, JSON body bytes."""

    status: int
    body: bytes
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)

    async def send(
        self,
        send: Any,
        extra: Sequence[tuple[bytes, bytes]] = (),
        last: tuple[bytes, bytes] | None = None,
    ) -> None:
        """Write it to an ASGI connection, with ``extra`` headers (CORS) if any, and
        ``last`` (the request id) after them."""
        headers = [*self.headers, *extra]
        cycle = getattr(send, "__self__", None)
        if type(cycle) is RequestResponseCycle and write_at_once(
            cycle, self.status, headers, self.body, last
        ):
            return
        if last is not None:
            headers.append(last)
        await send(
            {
                "type": "http.response.start",
                "status": self.status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(self.body)).encode()),
                    *headers,
                ],
            }
        )
        await send({"type": "http.response.body", "body": self.body})


def write_at_once(
    cycle: RequestResponseCycle,
    status: int,
    headers: Sequence[tuple[bytes, bytes]],
    body: bytes,
    last: tuple[bytes, bytes] | None = None,
) -> bool:
    """Write the whole response as uvicorn's ``send`` would; False (nothing done) when
    uvicorn's ``send`` must: its flow paused, the client gone, a response already started,
    its access log on, a HEAD request, a header it checks further or refuses.

    ``last`` is a header of the bridge's own making, written after the others as it is:
    the request id, whose value is a checked token and whose name is lowercase.
    """
    if (
        cycle.response_started
        or cycle.flow.write_paused
        or cycle.disconnected
        or cycle.access_log
        or cycle.scope["method"] == "HEAD"
    ):
        return False
    defaults = _defaults(cycle.default_headers)
    if defaults is None:
        return False
    keep_alive = cycle.keep_alive
    has_close = False
    head = [STATUS_LINE[status], defaults, _JSON_TYPE, b"content-length: %d\r\n" % len(body)]
    for given, value in headers:
        if HEADER_RE.search(given) or HEADER_VALUE_RE.search(value):
            return False  # uvicorn's send refuses it, as before
        name = given.lower()
        if name in _NOT_DIRECT:
            return False
        if name == b"connection" and b"close" in [t.lower().strip() for t in value.split(b",")]:
            keep_alive = False
            has_close = True
        head += (name, b": ", value, b"\r\n")
    if last is not None:
        head += (last[0], b": ", last[1], b"\r\n")
    if not keep_alive and not has_close:
        head.append(b"connection: close\r\n")
    head += (b"\r\n", body)
    cycle.response_started = True
    cycle.waiting_for_100_continue = False
    cycle.keep_alive = keep_alive
    transport: Any = cycle.transport  # the bridge's protocol gives its cycles a TurnWrites
    if type(transport) is TurnWrites:
        transport.write_whole(b"".join(head))
    else:
        transport.write(b"".join(head))
    cycle.response_complete = True
    cycle.message_event.set()
    if not keep_alive:
        cycle.transport.close()
    cycle.on_response()
    return True


_last_defaults: tuple[object, bytes | None] = (None, None)


def _defaults(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    """uvicorn's default headers (its Date, renewed each second: a new list) as written,
    made once per list; None when one of them takes uvicorn's send."""
    global _last_defaults  # noqa: PLW0603 (a cache of the last list: one per process)
    seen, written = _last_defaults
    if seen is headers:
        return written
    lines: list[bytes] = []
    for given, value in headers:
        name = given.lower()
        if (
            HEADER_RE.search(given)
            or HEADER_VALUE_RE.search(value)
            or name in _NOT_DIRECT
            or name == b"connection"
        ):
            _last_defaults = (headers, None)
            return None
        lines += (name, b": ", value, b"\r\n")
    written = b"".join(lines)
    _last_defaults = (headers, written)
    return written


def json_reply(status: int, data: Any, headers: dict[str, str] | None = None) -> Reply:
    """A JSON reply (compact UTF-8, as FastAPI's JSONResponse writes it)."""
    extra = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    return Reply(status, orjson.dumps(data), extra)
