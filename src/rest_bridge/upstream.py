"""What the bridge tells the gRPC server about an HTTP request: metadata, grpc-gateway style."""

from __future__ import annotations

from urllib.parse import quote

from events_server.ops.logs import request_id
from events_server.wire.metadata import (
    MD_API_KEY,
    MD_FORWARDED_FOR,
    MD_FORWARDED_HOST,
    MD_ORIGIN,
    MD_REFERER,
    MD_USER_AGENT,
    REQUEST_ID_HEADER,
    new_request_id,
)

# Forwarded header values are cut to this many characters: gRPC refuses calls
# whose metadata passes 8 KiB, and no real user agent or referer is this long.
MAX_FORWARDED_CHARS = 2048

# Printable ASCII but "%": what may pass into gRPC metadata unescaped.
METADATA_SAFE = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "%")


def metadata_value(value: str, limit: int = MAX_FORWARDED_CHARS) -> str:
    """A header value fit for gRPC metadata: printable ASCII, else percent-encoded bytes."""
    value = value[:limit]
    if value.isascii() and value.isprintable():
        return value
    # Header bytes are decoded as latin-1, so this recovers the raw bytes.
    return quote(value.encode("latin-1", "replace"), safe=METADATA_SAFE)[:limit]


def forwarded_metadata(
    headers: dict[bytes, bytes], peer: str, api_key: str | None
) -> tuple[tuple[str, str], ...]:
    """The gRPC metadata for a call made on behalf of one HTTP request."""
    # Set by AccessMiddleware; the server logs its lines under the same id.
    metadata = [(REQUEST_ID_HEADER, request_id.get() or new_request_id())]
    if api_key:
        metadata.append((MD_API_KEY, metadata_value(api_key)))
    if (user_agent := headers.get(b"user-agent")) is not None:
        metadata.append((MD_USER_AGENT, metadata_value(user_agent.decode("latin-1"))))
    if (referer := headers.get(b"referer")) is not None:
        metadata.append((MD_REFERER, metadata_value(referer.decode("latin-1"))))
    if (origin := headers.get(b"origin")) is not None:  # the server checks it against the key
        metadata.append((MD_ORIGIN, metadata_value(origin.decode("latin-1"))))
    chain = headers.get(b"x-forwarded-for", b"").decode("latin-1")
    # The peer goes last; cut from the left so that the right end, the part
    # written by proxies we trust, survives.
    forwarded_for = f"{chain}, {peer}" if chain else peer
    metadata.append((MD_FORWARDED_FOR, metadata_value(forwarded_for[-MAX_FORWARDED_CHARS:])))
    forwarded_host = headers.get(b"x-forwarded-host") or headers.get(b"host")
    if forwarded_host:
        metadata.append((MD_FORWARDED_HOST, metadata_value(forwarded_host.decode("latin-1"))))
    return tuple(metadata)
