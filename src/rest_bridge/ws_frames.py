"""The frames of /ws/create-events: what Depict's browser client sends, and the answers.

A frame is ``{"id": "<random string>", "event": {<an Event>}}``; its answer is
``{"id": <the same>, "status": "ok" | "not-ok", ...}``. The client resends a frame
until it is answered and drops the event on ``not-ok``, so ``not-ok`` is said only of
an event that can never be accepted; trouble worth retrying leaves the frame
unanswered. A frame that cannot be read as one (not JSON, not an object, no string
id) gets ``{"status": "error", "detail": ...}``.

The event is validated as the body ``[event]`` of a one-event POST would be, by
rest_bridge.validation, so a ``not-ok`` carries the very 422 detail list a POST gets.
``Connection`` is one open socket's state: its frames in flight, its answers, its close.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import grpc
import orjson

from events_server.pb import events_pb2 as pb
from rest_bridge.errors import (
    REQUEST_TOO_LARGE,
    grpc_error_response,
    too_large_detail,
    validation_detail,
)
from rest_bridge.fastpath import quick_fields, request_of
from rest_bridge.responses import Reply
from rest_bridge.upstream import METADATA_SAFE

MAX_CLOSE_REASON_BYTES = 123
"""What a close frame can carry (RFC 6455)."""

MAX_ID_CHARS = 128
"""Longest frame id (Depict's are about 12 characters); it travels as gRPC metadata."""

# orjson reads integers past 64 bits (below -2**63, above 2**64 - 1) as floats, which
# would change the text a number is kept as (rest_bridge.models.Text); the standard
# parser keeps them whole. Nineteen digits in a row (in a string too, which costs only
# the slower parser) is where that can begin.
_LONG_NUMBER = re.compile(r"\d{19}")
_LONG_NUMBER_BYTES = re.compile(rb"\d{19}")

# PERMISSION_DENIED messages that name an event's tenant: "events[0].tenant: ...".
_TENANT_REFUSAL = re.compile(r"^events\[(\d+)\]\.tenant: ")

_NOT_A_FRAME = 'a frame is a JSON object {"id": "<string>", "event": {...}}'


class Frame:
    """A frame that names itself: its id, and its event as a one-event POST body.

    (A plain class, not a frozen dataclass: one is made for every frame, and a frozen
    dataclass sets each field through object.__setattr__.)"""

    __slots__ = ("_body", "_event", "has_event", "id", "request")

    def __init__(
        self,
        frame_id: str,
        body: bytes | None,
        has_event: bool = True,
        request: pb.CreateEventsRequest | None = None,
        event: Any = None,
    ) -> None:
        self.id = frame_id
        self._body = body
        self.has_event = has_event
        self.request = request
        """The request of the event, when it was clearly valid (rest_bridge.fastpath): else
        ``body`` is validated as a POST's."""
        self._event = event

    @property
    def body(self) -> bytes:
        """``[event]`` as JSON; ``[frame]`` when the frame holds no event (for the record).
        Written when asked for, from the parsed ``event``, when that was given instead:
        a clearly valid event needs it only if the server refuses it."""
        if self._body is None:
            self._body = orjson.dumps([self._event])
        return self._body


def id_metadata(frame_id: str) -> str:
    """The frame id as gRPC metadata (printable ASCII), on which the server deduplicates.

    Every character that is not printable ASCII, and ``%``, is percent-encoded as UTF-8:
    distinct ids stay distinct (``x€1`` is not ``x?1``, nor ``x%E2%82%AC1``).
    """
    if frame_id.isascii() and frame_id.isprintable() and "%" not in frame_id:
        return frame_id  # what quote() returns for it, at a fraction of its cost
    return quote(frame_id, safe=METADATA_SAFE)


def _id_field(frame: dict[str, Any]) -> dict[str, Any]:
    """The frame's id as the error answer repeats it (any JSON scalar), or nothing."""
    value = frame.get("id")
    if isinstance(value, str | int | float | bool):
        return {"id": value}
    return {}


def parse_frame(data: str | bytes) -> Frame | str:
    """The frame, or the text of its error answer."""
    try:
        frame = orjson.loads(data)
        if (quick := _quick_frame(frame)) is not None:
            return quick
        # Only a frame with a number that may have been read as a float (or a large
        # integer) is searched for a long one: the search costs more than the parse.
        if _large_numbers(frame):
            pattern = _LONG_NUMBER if isinstance(data, str) else _LONG_NUMBER_BYTES
            if pattern.search(data):  # type: ignore[arg-type]
                raise ValueError("long number: read it with the standard parser")
        dumps: Callable[[Any], bytes] = orjson.dumps
    except ValueError:  # orjson.JSONDecodeError too
        # What orjson refuses but a POST's parser reads (NaN, lone surrogates, long
        # integers) is read the same way here; it re-encodes the event the same way.
        try:
            frame = json.loads(data)
        except (ValueError, RecursionError) as error:
            return error_answer({}, f"the frame is not JSON: {error}"[:500])
        dumps = _stdlib_dumps
    if not isinstance(frame, dict):
        return error_answer({}, _NOT_A_FRAME)
    frame_id = frame.get("id")
    if not isinstance(frame_id, str) or not frame_id:
        return error_answer(_id_field(frame), f"{_NOT_A_FRAME}: its id must be a non-empty string")
    if len(frame_id) > MAX_ID_CHARS:
        return error_answer(
            _id_field(frame), f"the frame id is longer than {MAX_ID_CHARS} characters"
        )
    has_event = "event" in frame
    try:
        body = dumps([frame["event"] if has_event else frame])
    except (ValueError, TypeError, RecursionError) as error:  # not reached with parsed JSON
        return error_answer(_id_field(frame), f"the event cannot be re-encoded: {error}")
    return Frame(frame_id, body, has_event)


def _quick_frame(frame: Any) -> Frame | None:
    """The frame of the common shape, its event clearly valid: what parse_frame would make
    of it, its event built already (strings and exact integers only, which the standard
    parser would read the same: no search for long numbers)."""
    if type(frame) is not dict:
        return None
    frame_id = frame.get("id")
    if type(frame_id) is not str or not 0 < len(frame_id) <= MAX_ID_CHARS:
        return None
    item = frame.get("event")
    if (fields := quick_fields(item)) is None or (request := request_of([fields])) is None:
        return None
    return Frame(frame_id, None, True, request, item)


_LARGE = 10**18
"""Integers from 19 digits on: near where orjson stops reading them exactly."""


def _large_numbers(value: Any) -> bool:
    """Whether the parsed JSON holds a float or an integer of 19 digits or more."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, float) or (isinstance(item, int) and not -_LARGE < item < _LARGE):
            return True
    return False


def _stdlib_dumps(value: Any) -> bytes:
    return json.dumps(value).encode()


def ok_answer(frame_id: str) -> str:
    """The answer to a frame whose event is queued (or was already)."""
    return orjson.dumps({"id": frame_id, "status": "ok"}).decode()


def not_ok_answer(frame_id: str, detail: list[dict[str, Any]]) -> str:
    """The answer to a frame whose event can never be accepted: the client drops it."""
    return _dumps({"id": frame_id, "status": "not-ok", "detail": detail})


def error_answer(id_field: dict[str, Any], detail: str) -> str:
    """The answer to a frame that is not one."""
    return _dumps({**id_field, "status": "error", "detail": detail})


def _dumps(value: Any) -> str:
    try:
        return orjson.dumps(value).decode()
    except TypeError:  # lone surrogates or long integers in what is repeated
        return json.dumps(value)


def missing_event_detail() -> list[dict[str, Any]]:
    """A frame without an event, said as a POST's 422 of an event missing would be."""
    return [validation_detail(["body", 0], "Field required", "missing")]


def reply_detail(reply: Reply) -> list[dict[str, Any]]:
    """The detail list of one of the bridge's 422 replies."""
    detail: list[dict[str, Any]] = orjson.loads(reply.body)["detail"]
    return detail


def permission_detail(message: str) -> list[dict[str, Any]]:
    """A PERMISSION_DENIED said as a 422 detail: at the tenant when the server names it."""
    named = _TENANT_REFUSAL.match(message)
    loc: list[str | int] = ["body", int(named[1]), "tenant"] if named else ["body"]
    return [validation_detail(loc, message, "permission_denied")]


@dataclass(frozen=True, slots=True)
class Refusal:
    """What a failed CreateEvents call means for its frame."""

    detail: list[dict[str, Any]] | None
    """The not-ok detail when the event can never be accepted; None: retry later."""
    report: bool
    """Whether the bridge files it in the rejected record (the server did not)."""
    close_reason: str | None = None
    """Set when the connection's credentials are refused: close it."""


RETRY_LATER = Refusal(None, report=False)


def refusal(error: grpc.aio.AioRpcError) -> Refusal:
    """How a frame's failed call is answered. Anything not known to be final is retried."""
    code = error.code()
    message = error.details() or code.name
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return Refusal(None, report=False, close_reason=message)
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return Refusal(permission_detail(message), report=True)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        # The server has recorded it itself.
        return Refusal(reply_detail(grpc_error_response(error, 0)), report=False)
    if (
        code == grpc.StatusCode.RESOURCE_EXHAUSTED
        and grpc_error_response(error, 0).status == REQUEST_TOO_LARGE
    ):
        detail = too_large_detail(message)
        return Refusal([validation_detail(["body"], detail, "request_too_large")], report=True)
    return RETRY_LATER


# --- one open socket -------------------------------------------------------------------


def close_reason(reason: str) -> str:
    return reason.encode()[:MAX_CLOSE_REASON_BYTES].decode(errors="ignore")


class Connection:
    """One open socket: its frames in flight and the tally of its frames.

    ``credentials`` are the handshake's (API key, page origin), either may be None.
    """

    def __init__(
        self,
        send: Any,
        metadata: tuple[tuple[str, str], ...],
        credentials: tuple[str | None, str | None],
        limit: int,
    ) -> None:
        self.send = send
        self.metadata = metadata
        self.key, self.origin = credentials
        self.slots = asyncio.Semaphore(limit)
        self.in_flight: set[str] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.loop = asyncio.get_running_loop()
        self.last_active = self.loop.time()
        self.timer: asyncio.TimerHandle | None = None
        self.closer: asyncio.Task[None] | None = None
        self.closing = False
        self.close_code = 1005
        self.close_reason = ""
        self.counts: Counter[str] = Counter()
        self.spoke = False
        """Whether it has sent a frame."""
        self.counted = True
        """Whether it counts among the open sockets (not once closed to admit another)."""
        self.release: Callable[[int], None] = _held_nowhere
        """Says that the bytes of a frame taken are no longer held (rest_bridge.ws_protocol)."""

    def done(self, size: int) -> None:
        """A frame of ``size`` was dealt with at once: its bytes and its slot are free."""
        self.release(size)
        self.slots.release()

    def finished(self, task: asyncio.Task[None]) -> None:
        """A frame's task is done: its slot is free for the next frame."""
        self.tasks.discard(task)
        self.slots.release()

    async def answer(self, text: str) -> None:
        """Send an answer, unless the socket is closing or gone (then the client resends)."""
        if self.closing:
            return
        # uvicorn raises ClientDisconnected (an OSError) once the peer is gone, and
        # RuntimeError in the moment between its own close (1009, 1011) and that.
        with contextlib.suppress(OSError, RuntimeError):
            await self.send({"type": "websocket.send", "text": text})

    async def close(self, code: int, reason: str) -> None:
        """Close the socket (once); frames still arriving are left unanswered."""
        if self.closing:
            return
        self.closing = True
        self.close_code, self.close_reason = code, reason
        with contextlib.suppress(OSError, RuntimeError):
            await self.send(
                {"type": "websocket.close", "code": code, "reason": close_reason(reason)}
            )


def _held_nowhere(size: int) -> None:
    """Under a WebSocket protocol other than the bridge's, no bytes are counted."""
