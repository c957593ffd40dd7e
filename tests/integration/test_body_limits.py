"""The body limits at their edges, over real HTTP: size on the wire and inflated, depth."""

from __future__ import annotations

import gzip
import json
import socket
from collections.abc import Iterator

import httpx
import pytest
import redis

from events_server.queue.keys import KeySpace
from rest_bridge.config import MIN_JSON_DEPTH, BridgeSettings
from tests.harness.servers import serving_bridge
from tests.harness.streams import queued
from tests.harness.web import URL, nested, padded, post, too_deep

EVENT = {"tenant": "shop-b", "market": "us", "type": "click", "user_id": "u-1"}


BODY = json.dumps([EVENT]).encode()


LIMIT = 2000  # max_body_bytes of this module's bridge


@pytest.fixture(scope="module")
def bridge(bridge_settings: BridgeSettings) -> Iterator[str]:
    """This module's bridge: a small body limit, the least JSON depth allowed (``http`` too)."""
    settings = bridge_settings.model_copy(
        update={"max_body_bytes": LIMIT, "max_json_depth": MIN_JSON_DEPTH}
    )
    with serving_bridge(settings) as url:
        yield url


def test_a_body_at_the_decompressed_limit_passes_and_one_byte_more_is_413(
    http: httpx.Client, rdb: redis.Redis, keys: KeySpace
) -> None:
    at_limit = post(http, gzip.compress(padded(LIMIT, BODY)), content_type="application/json",
                    content_encoding="gzip")  # fmt: skip
    assert at_limit.status_code == 200, at_limit.text
    over = post(http, gzip.compress(padded(LIMIT + 1, BODY)), content_type="application/json",
                content_encoding="gzip")  # fmt: skip
    assert over.status_code == 413
    assert over.json() == {
        "detail": f"request body is larger than the limit of {LIMIT} bytes (max_body_bytes)"
        " once decompressed"
    }
    assert len(queued(rdb, keys)) == 1


# --- max_body_bytes on the wire ----------------------------------------------------------


def test_a_body_of_exactly_the_limit_passes_and_one_byte_more_is_413(
    http: httpx.Client, rdb: redis.Redis, keys: KeySpace
) -> None:
    at_limit = post(http, padded(LIMIT, BODY), content_type="application/json")
    assert at_limit.status_code == 200, at_limit.text
    over = post(http, padded(LIMIT + 1, BODY), content_type="application/json")
    assert over.status_code == 413
    assert over.headers["connection"] == "close"
    assert over.json() == {
        "detail": f"request body is larger than the limit of {LIMIT} bytes (max_body_bytes)"
    }
    assert len(queued(rdb, keys)) == 1


def chunks_of(body: bytes, size: int = 300) -> Iterator[bytes]:
    """The body in pieces: httpx sends a generator chunked, without a Content-Length."""
    for start in range(0, len(body), size):
        yield body[start : start + size]


def test_a_chunked_body_of_the_limit_passes_and_one_byte_more_is_413(
    http: httpx.Client, rdb: redis.Redis, keys: KeySpace
) -> None:
    headers = {"content-type": "application/json"}
    at_limit = http.post(URL, content=chunks_of(padded(LIMIT, BODY)), headers=headers)
    assert at_limit.request.headers["transfer-encoding"] == "chunked"
    assert at_limit.status_code == 200, at_limit.text
    over = http.post(URL, content=chunks_of(padded(LIMIT + 1, BODY)), headers=headers)
    assert over.status_code == 413
    assert len(queued(rdb, keys)) == 1


def raw_exchange(base: str, head: bytes, body: bytes = b"") -> bytes:
    """Send a request head and part of a body on a socket; read the answer until the close."""
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(head + body)
        answer = b""
        while data := sock.recv(65536):  # the server closes after a 413
            answer += data
    return answer


def test_a_chunked_body_is_refused_as_soon_as_it_passes_the_limit(
    bridge: str, api_key: str
) -> None:
    # The body is never finished: the answer comes while the client could still be sending.
    head = (
        f"POST {URL} HTTP/1.1\r\nHost: x\r\nX-API-KEY: {api_key}\r\n"
        "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    ).encode()
    piece = b"[" + b" " * 999
    body = b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for _ in range(3))  # 3000 > LIMIT
    answer = raw_exchange(bridge, head, body)
    assert answer.startswith(b"HTTP/1.1 413 ")
    assert b"(max_body_bytes)" in answer


def test_a_declared_length_over_the_limit_is_refused_before_the_body(
    bridge: str, api_key: str
) -> None:
    head = (
        f"POST {URL} HTTP/1.1\r\nHost: x\r\nX-API-KEY: {api_key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {LIMIT + 1}\r\n\r\n"
    ).encode()
    answer = raw_exchange(bridge, head)  # not one byte of the body sent
    assert answer.startswith(b"HTTP/1.1 413 ")


# --- max_json_depth -----------------------------------------------------------------------


def test_the_least_depth_allowed_still_takes_the_deepest_valid_body(
    http: httpx.Client, rdb: redis.Redis, keys: KeySpace
) -> None:
    deepest = [{**EVENT, "entity_identifiers": {"sku": "1"}, "variant_ids": ["a", "b"]}]
    answer = http.post(URL, json=deepest)
    assert answer.status_code == 200, answer.text
    over = post(http, nested(MIN_JSON_DEPTH + 1), content_type="application/json")
    assert (over.status_code, over.json()) == (422, too_deep(MIN_JSON_DEPTH))
    assert len(queued(rdb, keys)) == 1
