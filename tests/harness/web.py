"""HTTP to the bridge: keyed clients, bytes POSTed with exact headers, padded bodies, bombs,
the CORS headers of an answer."""

from __future__ import annotations

import gzip
from typing import Any

import httpx

URL = "/create-events"


def cors_headers(answer: httpx.Response) -> dict[str, str]:
    """The answer's CORS headers (and Vary)."""
    return {
        name: value
        for name, value in answer.headers.items()
        if name.startswith("access-control-") or name == "vary"
    }


def keyed_client(base_url: str, api_key: str) -> httpx.Client:
    """An HTTP client of ``base_url`` that sends ``api_key`` in the X-API-KEY header."""
    return httpx.Client(base_url=base_url, timeout=10, headers={"x-api-key": api_key})


def post(client: httpx.Client, body: bytes | str, **headers: str) -> httpx.Response:
    """POST raw bytes with these headers (underscores in names become dashes)."""
    sent = {name.replace("_", "-"): value for name, value in headers.items()}
    return client.post(URL, content=body, headers=sent)


def padded(size: int, body: bytes) -> bytes:
    """A valid body of exactly ``size`` bytes (JSON allows trailing whitespace)."""
    assert len(body) <= size
    return body + b" " * (size - len(body))


def bomb(size: int) -> bytes:
    """``size`` zero bytes, gzipped: about a thousandth of that on the wire."""
    return gzip.compress(b"\0" * size, compresslevel=9)


def nested(depth: int) -> bytes:
    """An event whose entity_identifiers value nests so that the body is ``depth`` deep."""
    inner = "[" * (depth - 3) + "]" * (depth - 3)
    return (
        '[{"tenant": "shop-b", "market": "us", "type": "click", "entity_identifiers": {"a": '
        + (inner or '"x"')
        + "}}]"
    ).encode()


def too_deep(limit: int) -> dict[str, Any]:
    """The 422 of a body nested past ``limit``."""
    return {
        "detail": [
            {
                "loc": ["body"],
                "msg": f"JSON is nested deeper than the limit of {limit} levels of arrays and"
                " objects (max_json_depth)",
                "type": "json_too_deep",
            }
        ]
    }
