"""Where a request's API key is: the X-API-KEY header, the api_key query parameter, the cookie."""

from __future__ import annotations

from enum import StrEnum
from http.cookies import CookieError, SimpleCookie
from urllib.parse import parse_qsl


class KeySource(StrEnum):
    """Where the key came from: it decides which bodies a request may send (rest_bridge.body)."""

    HEADER = "header"
    QUERY = "query"
    COOKIE = "cookie"


def api_key(
    headers: dict[bytes, bytes], query_string: bytes
) -> tuple[str, KeySource] | tuple[None, None]:
    """The API key and its source: the header, else the query parameter, else the cookie."""
    if key := headers.get(b"x-api-key"):
        return key.decode("latin-1"), KeySource.HEADER
    if query_string:
        for name, value in parse_qsl(query_string.decode("latin-1")):
            if name == "api_key" and value:
                return value, KeySource.QUERY
    if cookie := headers.get(b"cookie"):
        jar: SimpleCookie = SimpleCookie()
        try:
            jar.load(cookie.decode("latin-1"))
        except CookieError:
            # A malformed cookie header must not fail the request; it just holds no key.
            return None, None
        if (morsel := jar.get("X-API-KEY")) and morsel.value:
            return morsel.value, KeySource.COOKIE
    return None, None
