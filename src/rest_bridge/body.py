"""The request body before parsing: its media type, its Content-Encoding, its size.

Nothing past ``max_body_bytes`` is ever held in memory: a declared Content-Length
over it is refused before reading, a chunked body as soon as it passes it, and a
gzipped one is inflated as it arrives, never to more than the limit (a gzip bomb
of 10 KB that would inflate to 10 MB holds about 1 MiB at most).
"""

from __future__ import annotations

import zlib
from typing import Any

from rest_bridge.credentials import KeySource
from rest_bridge.errors import invalid_body
from rest_bridge.responses import Reply, json_reply

ACCEPTED_TYPES = (
    "application/json (or application/*+json); or, unless the key is in the X-API-KEY"
    " cookie, the JSON as text/plain or application/x-www-form-urlencoded (beacons)"
)

# What a 415 echoes of the client's header: enough to recognise it.
MAX_SHOWN_CHARS = 100

_GZIP = frozenset({b"gzip", b"x-gzip"})  # x-gzip: the old name (RFC 9110, 8.4.1.3)
_GZIP_WBITS = 31  # zlib's "gzip header and trailer" mode
INFLATE_STEP = 64 * 1024


class BodyRefused(Exception):
    """The body cannot be taken; ``reply`` says why."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(reply.status)
        self.reply = reply


def _shown(value: bytes) -> str:
    return value.decode("latin-1")[:MAX_SHOWN_CHARS]


def _unsupported(why: str, header: tuple[str, str]) -> BodyRefused:
    return BodyRefused(json_reply(415, {"detail": why}, dict([header])))


def _media_refused(why: str) -> BodyRefused:
    return _unsupported(f"{why}: send {ACCEPTED_TYPES}", ("Accept-Post", "application/json"))


# What navigator.sendBeacon sends a string or a Blob of JSON as: Depict's client
# sends Blob([json], {type: "application/json"}) and falls back to the same JSON
# typed application/x-www-form-urlencoded; a string goes as text/plain.
BEACON_TYPES = frozenset({b"text/plain", b"application/x-www-form-urlencoded"})


def check_media_type(content_type: bytes | None, key_source: KeySource | None) -> None:
    """Raise BodyRefused (415) unless the body is to be read as JSON.

    text/plain and application/x-www-form-urlencoded are what beacons send; they
    are also what a page of any other site may send without a CORS preflight, with
    the victim's cookies. So they are JSON unless the key came in the X-API-KEY
    cookie: a key in the query or a header is one the sending page holds itself (a
    header also makes the browser ask first), and a keyless request is let in by its
    Origin, which a browser never lets a page forge. Either body holds the JSON
    itself, not form fields. A body without a Content-Type is JSON too, with the
    same exception: a typeless Blob is sent cross-site without a preflight as well.
    """
    mime = (content_type or b"").partition(b";")[0].strip().lower()
    kind, _, subtype = mime.partition(b"/")
    if kind == b"application" and (subtype == b"json" or subtype.endswith(b"+json")):
        return
    if content_type and mime not in BEACON_TYPES:
        raise _media_refused(f"Content-Type {_shown(content_type)!r} is not accepted")
    if key_source is KeySource.COOKIE:
        what = f"Content-Type {_shown(mime)}" if content_type else "a body without Content-Type"
        raise _media_refused(
            f"{what} is not accepted with the key in the X-API-KEY cookie (a page of any"
            " site can send one with the cookie, and without a preflight)"
        )


def is_gzipped(content_encoding: bytes | None) -> bool:
    """Whether the body is gzipped; raise BodyRefused (415) for any other coding but identity."""
    if not content_encoding:
        return False
    codings = [c.strip().lower() for c in content_encoding.split(b",")]
    codings = [c for c in codings if c and c != b"identity"]
    if not codings:
        return False
    if len(codings) == 1 and codings[0] in _GZIP:
        return True
    raise _unsupported(
        f"Content-Encoding {_shown(content_encoding)!r} is not supported: send gzip,"
        " identity or none",
        ("Accept-Encoding", "gzip, identity"),
    )


def too_large(limit: int, decompressed: bool = False) -> BodyRefused:
    """The 413 naming the limit."""
    where = " once decompressed" if decompressed else ""
    return BodyRefused(
        json_reply(
            413,
            {
                "detail": f"request body is larger than the limit of {limit} bytes"
                f" (max_body_bytes){where}"
            },
            # The rest of the body is not read: the connection cannot be reused.
            {"Connection": "close"},
        )
    )


class Inflater:
    """A gzip body, inflated as its chunks arrive, never to more than ``limit`` bytes."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._zlib = zlib.decompressobj(wbits=_GZIP_WBITS)
        self._body = bytearray()

    def feed(self, data: bytes) -> None:
        """Inflate one chunk; BodyRefused when it is not gzip or inflates past the limit."""
        while data:
            if self._zlib.eof:
                self._zlib = zlib.decompressobj(wbits=_GZIP_WBITS)  # RFC 1952: members follow
            # Small steps, and at most one byte past the limit: zlib's own buffers for a
            # step stay small, and one byte more is enough to know the limit was passed.
            room = min(INFLATE_STEP, self._limit + 1 - len(self._body))
            try:
                out = self._zlib.decompress(data, room)
            except zlib.error as error:
                raise _corrupt(f"the body is not valid gzip ({error})") from None
            self._body += out
            if len(self._body) > self._limit:
                raise too_large(self._limit, decompressed=True)
            # Output zlib still holds when a step ends comes out with the next input; the
            # gzip trailer cannot be taken before it, so finish() never sees it missing.
            data = self._zlib.unused_data if self._zlib.eof else self._zlib.unconsumed_tail

    def finish(self) -> bytes:
        """The whole inflated body; BodyRefused when the gzip stream was cut short."""
        if not self._zlib.eof:
            raise _corrupt("the body ends before its gzip stream does (truncated or empty)")
        return bytes(self._body)


def _corrupt(why: str) -> BodyRefused:
    return BodyRefused(invalid_body(["body"], f"Content-Encoding gzip: {why}", "gzip_invalid"))


def declared_length(content_length: bytes | None) -> int:
    """The Content-Length a request declares (0 when it declares none)."""
    try:
        return int(content_length) if content_length else 0
    except ValueError:
        return 0  # the server's HTTP parser refuses these anyway; counting still applies


def body_arrived(receive: Any) -> bool:
    """Whether the whole body is in already, so that reading it cannot wait (and needs no
    timer): uvicorn's request cycle, whose ``receive`` this is, says so once the request
    is complete (as a beacon's is, its body in the packet of its headers). Anything else
    (another server, a body still on its way) is read under the body timeout."""
    return getattr(getattr(receive, "__self__", None), "more_body", True) is False


def arrived_body(
    message: dict[str, Any], receive: Any, content_length: bytes | None, limit: int
) -> bytes:
    """read_body of a body that is not gzipped and has arrived whole (body_arrived: the one
    ``receive`` message holds it all), taken without a coroutine more."""
    if declared_length(content_length) > limit:
        raise too_large(limit)
    if message["type"] == "http.disconnect":
        message = _sent_before_leaving(receive)
    body: bytes = message.get("body", b"")
    if len(body) > limit:
        raise too_large(limit)
    return body


def _sent_before_leaving(receive: Any) -> dict[str, Any]:
    """The rest of the body of a client gone since, as a ``receive`` message, when it sent
    all of it before it left; else BodyRefused (499).

    A beacon sent as a page closes, or any client that does not wait for its answer, has
    sent a whole request: it is served (and its answer dropped), however long the steps
    before its body took. uvicorn's ``receive`` answers only ``http.disconnect`` once the
    connection is gone, even with the whole body in its cycle.
    """
    cycle: Any = getattr(receive, "__self__", None)
    if not body_arrived(receive) or not hasattr(cycle, "body"):
        # Nobody will read the answer; 499 (nginx's "client closed request") is for the log.
        raise BodyRefused(
            json_reply(499, {"detail": "the client left before sending the whole body"})
        )
    rest = bytes(cycle.body)
    cycle.body = bytearray()  # taken, as uvicorn's receive takes it
    return {"type": "http.request", "body": rest, "more_body": False}


async def read_body(receive: Any, content_length: bytes | None, gzipped: bool, limit: int) -> bytes:
    """The whole body (inflated when gzipped), or BodyRefused as soon as it passes ``limit``."""
    if declared_length(content_length) > limit:
        raise too_large(limit)
    inflater = Inflater(limit) if gzipped else None
    chunks: list[bytes] = []
    size = 0
    more = True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            message = _sent_before_leaving(receive)
        chunk: bytes = message.get("body", b"")
        more = message.get("more_body", False)
        size += len(chunk)
        if size > limit:
            raise too_large(limit)
        if inflater is None:
            chunks.append(chunk)
        else:
            inflater.feed(chunk)
    if inflater is not None:
        return inflater.finish()
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)
