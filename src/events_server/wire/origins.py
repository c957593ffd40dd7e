"""Page origins (CORS): how they are written, and which a key may be used from."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit


@dataclass(frozen=True, slots=True)
class OriginDecision:
    """May a page from an origin call; and may the origin be echoed with credentials."""

    allowed: bool
    credentials: bool


REFUSED = OriginDecision(allowed=False, credentials=False)


def normalize_origin(value: str) -> str:
    """An origin as browsers send it (``scheme://host[:port]``, lower case, no default port,
    an international host name in punycode)."""
    parts = urlsplit(value.strip())
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"origin {value!r} has an invalid port") from None
    if (
        parts.scheme not in ("http", "https")
        or not parts.hostname
        or parts.username is not None
        or parts.path not in ("", "/")
        or parts.query
        or parts.fragment
    ):
        # "null" is refused too: sandboxed iframes and file:// pages all send it, so
        # allowing it would allow any of them.
        raise ValueError(
            f"origin {value!r} must look like https://shop.example or http://localhost:3000"
        )
    default = {"http": 80, "https": 443}[parts.scheme]
    host = parts.hostname
    if not host.isascii():
        # Browsers send an international name in its ASCII form (punycode): stored in
        # Unicode, it would never match what they send.
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            raise ValueError(
                f"origin {value!r} has a host name that is not a valid international domain name"
            ) from None
    host = host if ":" not in host else f"[{host}]"
    return f"{parts.scheme}://{host}" + (f":{port}" if port not in (None, default) else "")


def decide_origin(
    key_origins: Sequence[str], origin: str, fallback: Sequence[str]
) -> OriginDecision:
    """A key's own origin list rules; a key with none falls back to the global list."""
    listed = key_origins or fallback
    if origin in listed:
        return OriginDecision(allowed=True, credentials=True)
    if not key_origins and "*" in fallback and origin != "null":
        return OriginDecision(allowed=True, credentials=False)
    return REFUSED
