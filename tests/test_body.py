"""What body the bridge takes, over real HTTP: media types, beacons, gzip, size and depth limits."""

from __future__ import annotations

import gzip
import json
import socket
import tracemalloc
from collections.abc import Iterator
from typing import Any

import httpx
import pydantic
import pytest
import redis

from events_server.queue.keys import KeySpace
from rest_bridge.body import BodyRefused, Inflater
from rest_bridge.config import MIN_JSON_DEPTH, BridgeSettings
from rest_bridge.models import Event
from tests.support import UvicornThread, queued
from tests.test_rejected import wait_for_records

URL = "/create-events"
EVENT = {"tenant": "shop-b", "market": "us", "type": "click", "user_id": "u-1"}
BODY = json.dumps([EVENT]).encode()
LIMIT = 2000  # max_body_bytes of the small bridge below


def padded(size: int, body: bytes = BODY) -> bytes:
    """A valid body of exactly ``size`` bytes (JSON allows trailing whitespace)."""
    assert len(body) <= size
    return body + b" " * (size - len(body))


@pytest.fixture(scope="module")
def small(bridge_settings: BridgeSettings) -> Iterator[str]:
    """A bridge of its own with a small body limit and the least JSON depth allowed."""
    settings = bridge_settings.model_copy(
        update={"max_body_bytes": LIMIT, "max_json_depth": MIN_JSON_DEPTH}
    )
    server = UvicornThread(settings)
    server.start()
    yield server.url
    server.stop()


@pytest.fixture
def small_http(small: str, api_key: str) -> Iterator[httpx.Client]:
    """A client of the small bridge that sends the session's key in the X-API-KEY header."""
    with httpx.Client(base_url=small, timeout=10, headers={"x-api-key": api_key}) as client:
        yield client


def post(client: httpx.Client, body: bytes, **headers: str) -> httpx.Response:
    """POST raw bytes with these headers (underscores in names become dashes)."""
    sent = {name.replace("_", "-"): value for name, value in headers.items()}
    return client.post(URL, content=body, headers=sent)


# --- media types -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "content_type",
    ["application/json", "application/json; charset=utf-8", "application/vnd.shop+json"],
)
def test_json_media_types_are_json(
    http: httpx.Client, rdb: redis.Redis, keys: KeySpace, content_type: str
) -> None:
    answer = post(http, BODY, content_type=content_type)
    assert answer.status_code == 200, answer.text
    assert len(queued(rdb, keys)) == 1


def test_a_beacon_with_the_key_in_the_query_is_json(
    bridge: str, api_key: str, rdb: redis.Redis, keys: KeySpace
) -> None:
    # What navigator.sendBeacon(url + "?api_key=...", JSON.stringify(events)) sends.
    answer = httpx.post(
        f"{bridge}{URL}",
        params={"api_key": api_key},
        content=BODY,
        headers={"content-type": "text/plain;charset=UTF-8"},
    )
    assert answer.status_code == 200, answer.text
    [(_, envelope)] = queued(rdb, keys)
    assert envelope.event.user_id == "u-1"


def test_text_plain_with_the_key_in_the_cookie_is_415(
    bridge: str, api_key: str, rdb: redis.Redis, keys: KeySpace
) -> None:
    # A page of any site can send text/plain without a preflight, with the visitor's
    # cookies. (With a key in the URL or a header, or none, it is JSON: test_beacons.)
    headers = {"content-type": "text/plain;charset=UTF-8"}
    with httpx.Client(base_url=bridge, timeout=10, cookies={"X-API-KEY": api_key}) as client:
        answer = client.post(URL, content=BODY, headers=headers)
    assert answer.status_code == 415
    detail = answer.json()["detail"]
    assert "Content-Type text/plain is not accepted with the key in the X-API-KEY cookie" in detail
    assert "application/json" in detail
    assert queued(rdb, keys) == []


@pytest.mark.parametrize(
    "content_type",
    [
        "multipart/form-data; boundary=xyz",
        "text/html",
        "application/xml",
        "application/jsonp",
    ],
)
def test_other_media_types_are_415_naming_the_type_and_what_is_accepted(
    http: httpx.Client, rdb: redis.Redis, keys: KeySpace, content_type: str
) -> None:
    answer = post(http, BODY, content_type=content_type)
    assert answer.status_code == 415
    assert answer.headers["accept-post"] == "application/json"
    assert answer.json() == {
        "detail": f"Content-Type {content_type!r} is not accepted: send application/json (or"
        " application/*+json); or, unless the key is in the X-API-KEY cookie, the JSON as"
        " text/plain or application/x-www-form-urlencoded (beacons)"
    }
    assert queued(rdb, keys) == []


def test_a_body_without_content_type_is_json_unless_the_key_is_a_cookie(
    bridge: str, api_key: str, rdb: redis.Redis, keys: KeySpace
) -> None:
    with httpx.Client(base_url=bridge, timeout=10) as client:
        # httpx sends no Content-Type for raw bytes.
        by_header = client.post(URL, content=BODY, headers={"x-api-key": api_key})
        by_query = client.post(URL, content=BODY, params={"api_key": api_key})
        client.cookies.set("X-API-KEY", api_key)
        by_cookie = client.post(URL, content=BODY)
    assert "content-type" not in by_header.request.headers
    assert (by_header.status_code, by_query.status_code) == (200, 200)
    assert by_cookie.status_code == 415
    assert (
        "without Content-Type is not accepted with the key in the X-API-KEY cookie"
        in (by_cookie.json()["detail"])
    )
    assert len(queued(rdb, keys)) == 2


# --- Content-Encoding --------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["gzip", "GZIP", "x-gzip", "identity, gzip"])
def test_gzip_bodies_are_inflated(
    http: httpx.Client, rdb: redis.Redis, keys: KeySpace, encoding: str
) -> None:
    answer = post(http, gzip.compress(BODY), content_type="application/json",
                  content_encoding=encoding)  # fmt: skip
    assert answer.status_code == 200, answer.text
    [(_, envelope)] = queued(rdb, keys)
    assert envelope.event.tenant == "shop-b"


def test_a_gzip_beacon_and_several_gzip_members_are_one_body(
    http: httpx.Client, rdb: redis.Redis, keys: KeySpace
) -> None:
    two = [EVENT, {**EVENT, "user_id": "u-2"}]
    text = json.dumps(two).encode()
    members = gzip.compress(text[:20]) + gzip.compress(text[20:])  # RFC 1952 allows this
    answer = post(http, members, content_type="application/json", content_encoding="gzip")
    assert answer.status_code == 200, answer.text
    assert sorted(e.event.user_id for _, e in queued(rdb, keys)) == ["u-1", "u-2"]


@pytest.mark.parametrize("encoding", ["identity", ""])
def test_identity_or_no_encoding_is_the_body_as_is(http: httpx.Client, encoding: str) -> None:
    answer = post(http, BODY, content_type="application/json", content_encoding=encoding)
    assert answer.status_code == 200


@pytest.mark.parametrize("encoding", ["br", "deflate", "zstd", "gzip, gzip", "gzip, br"])
def test_other_encodings_are_415_naming_them(
    http: httpx.Client, rdb: redis.Redis, keys: KeySpace, encoding: str
) -> None:
    answer = post(http, gzip.compress(BODY), content_type="application/json",
                  content_encoding=encoding)  # fmt: skip
    assert answer.status_code == 415
    assert answer.headers["accept-encoding"] == "gzip, identity"
    assert answer.json() == {
        "detail": f"Content-Encoding {encoding!r} is not supported: send gzip, identity or none"
    }
    assert queued(rdb, keys) == []


@pytest.mark.parametrize(
    ("body", "msg"),
    [
        (b"not gzip at all", "the body is not valid gzip (Error -3 while decompressing data:"
         " incorrect header check)"),
        (gzip.compress(BODY)[:-12], "the body ends before its gzip stream does (truncated or"
         " empty)"),
        (b"", "the body ends before its gzip stream does (truncated or empty)"),
        (gzip.compress(BODY)[:-4] + b"\0\0\0\0", "the body is not valid gzip (Error -3 while"
         " decompressing data: incorrect length check)"),
        (gzip.compress(BODY) + b"trailing", "the body is not valid gzip (Error -3 while"
         " decompressing data: incorrect header check)"),
    ],
    ids=["not-gzip", "truncated", "empty", "bad-length", "trailing-garbage"],
)  # fmt: skip
def test_corrupt_gzip_is_a_422_saying_so(
    http: httpx.Client, rdb: redis.Redis, keys: KeySpace, body: bytes, msg: str
) -> None:
    answer = post(http, body, content_type="application/json", content_encoding="gzip")
    assert answer.status_code == 422
    assert answer.json() == {
        "detail": [
            {"loc": ["body"], "msg": f"Content-Encoding gzip: {msg}", "type": "gzip_invalid"}
        ]
    }
    assert queued(rdb, keys) == []


def test_invalid_json_inside_gzip_gets_the_usual_422(http: httpx.Client) -> None:
    answer = post(http, gzip.compress(b"[{"), content_type="application/json",
                  content_encoding="gzip")  # fmt: skip
    assert answer.status_code == 422
    assert answer.json()["detail"] == [
        {
            "loc": ["body", 2],
            "msg": "JSON decode error",
            "type": "json_invalid",
            "input": {},
            "ctx": {"error": "Expecting property name enclosed in double quotes"},
        }
    ]


def bomb(size: int) -> bytes:
    """``size`` zero bytes, gzipped: about a thousandth of that on the wire."""
    return gzip.compress(b"\0" * size, compresslevel=9)


def test_a_gzip_bomb_is_413_and_never_reaches_the_rejected_record(
    http: httpx.Client, rdb: redis.Redis, keys: KeySpace
) -> None:
    payload = bomb(10 * 1024 * 1024)
    assert len(payload) < 20_000
    answer = post(http, payload, content_type="application/json", content_encoding="gzip")
    assert answer.status_code == 413
    assert answer.json() == {
        "detail": "request body is larger than the limit of 1048576 bytes (max_body_bytes)"
        " once decompressed"
    }
    # Reports go out in order: once a later 422 of the tenant is recorded, the bomb's would be.
    tenant_bomb = gzip.compress(b'[{"tenant": "shop-c", "x": "' + b"y" * 2_000_000 + b'"}]')
    assert post(http, tenant_bomb, content_type="application/json",
                content_encoding="gzip").status_code == 413  # fmt: skip
    invalid = [{"tenant": "shop-c", "market": "us", "type": "nope"}]
    zipped = gzip.compress(json.dumps(invalid).encode())
    answer = post(http, zipped, content_type="application/json", content_encoding="gzip")
    assert answer.status_code == 422
    [record] = wait_for_records(rdb, keys, "shop-c")
    # The record holds the inflated body, as the events were sent.
    assert json.loads(record[b"payload"]) == invalid
    assert int(record[b"payload_size"]) == len(json.dumps(invalid))


def inflate(payload: bytes, limit: int, piece: int = 16 * 1024) -> bytes:
    """Inflate in pieces, as a server receives a body."""
    inflater = Inflater(limit)
    for start in range(0, len(payload), piece):
        inflater.feed(payload[start : start + piece])
    return inflater.finish()


def test_inflating_a_bomb_never_holds_more_than_the_limit() -> None:
    limit = 1024 * 1024
    payload = bomb(50 * limit)
    tracemalloc.start()
    try:
        with pytest.raises(BodyRefused) as refused:
            inflate(payload, limit)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert refused.value.reply.status == 413
    # Inflating all of it would take 50 MiB; what is held stays near the limit.
    assert peak < limit * 3 // 2, f"peak {peak} bytes"


@pytest.mark.parametrize("piece", [1, 7, 1 << 20], ids=["byte-by-byte", "7-bytes", "whole"])
def test_inflating_in_any_pieces_gives_the_body_up_to_exactly_the_limit(piece: int) -> None:
    limit = 1024 * 1024
    # Zeros inflate ~1000x: one small piece of input yields many steps of output.
    assert inflate(bomb(limit), limit, piece) == b"\0" * limit
    with pytest.raises(BodyRefused) as refused:
        inflate(bomb(limit + 1), limit, piece)
    assert refused.value.reply.status == 413


def test_a_body_at_the_decompressed_limit_passes_and_one_byte_more_is_413(
    small_http: httpx.Client, rdb: redis.Redis, keys: KeySpace
) -> None:
    at_limit = post(small_http, gzip.compress(padded(LIMIT)), content_type="application/json",
                    content_encoding="gzip")  # fmt: skip
    assert at_limit.status_code == 200, at_limit.text
    over = post(small_http, gzip.compress(padded(LIMIT + 1)), content_type="application/json",
                content_encoding="gzip")  # fmt: skip
    assert over.status_code == 413
    assert over.json() == {
        "detail": f"request body is larger than the limit of {LIMIT} bytes (max_body_bytes)"
        " once decompressed"
    }
    assert len(queued(rdb, keys)) == 1


# --- max_body_bytes on the wire ----------------------------------------------------------


def test_a_body_of_exactly_the_limit_passes_and_one_byte_more_is_413(
    small_http: httpx.Client, rdb: redis.Redis, keys: KeySpace
) -> None:
    at_limit = post(small_http, padded(LIMIT), content_type="application/json")
    assert at_limit.status_code == 200, at_limit.text
    over = post(small_http, padded(LIMIT + 1), content_type="application/json")
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
    small_http: httpx.Client, rdb: redis.Redis, keys: KeySpace
) -> None:
    headers = {"content-type": "application/json"}
    at_limit = small_http.post(URL, content=chunks_of(padded(LIMIT)), headers=headers)
    assert at_limit.request.headers["transfer-encoding"] == "chunked"
    assert at_limit.status_code == 200, at_limit.text
    over = small_http.post(URL, content=chunks_of(padded(LIMIT + 1)), headers=headers)
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


def test_a_chunked_body_is_refused_as_soon_as_it_passes_the_limit(small: str, api_key: str) -> None:
    # The body is never finished: the answer comes while the client could still be sending.
    head = (
        f"POST {URL} HTTP/1.1\r\nHost: x\r\nX-API-KEY: {api_key}\r\n"
        "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    ).encode()
    piece = b"[" + b" " * 999
    body = b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for _ in range(3))  # 3000 > LIMIT
    answer = raw_exchange(small, head, body)
    assert answer.startswith(b"HTTP/1.1 413 ")
    assert b"(max_body_bytes)" in answer


def test_a_declared_length_over_the_limit_is_refused_before_the_body(
    small: str, api_key: str
) -> None:
    head = (
        f"POST {URL} HTTP/1.1\r\nHost: x\r\nX-API-KEY: {api_key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {LIMIT + 1}\r\n\r\n"
    ).encode()
    answer = raw_exchange(small, head)  # not one byte of the body sent
    assert answer.startswith(b"HTTP/1.1 413 ")


def test_the_default_limit_is_one_mib_on_the_wire(
    http: httpx.Client, rdb: redis.Redis, keys: KeySpace
) -> None:
    assert BridgeSettings.model_fields["max_body_bytes"].default == 1048576
    assert post(http, padded(1048576), content_type="application/json").status_code == 200
    over = post(http, padded(1048577), content_type="application/json")
    assert over.status_code == 413
    assert over.json()["detail"] == (
        "request body is larger than the limit of 1048576 bytes (max_body_bytes)"
    )
    assert len(queued(rdb, keys)) == 1


# --- max_json_depth -----------------------------------------------------------------------


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


def test_a_body_of_the_depth_limit_is_parsed_and_one_level_more_is_refused(
    http: httpx.Client,
) -> None:
    assert BridgeSettings.model_fields["max_json_depth"].default == 16
    at_limit = post(http, nested(16), content_type="application/json")
    # Parsed and validated: the error is the field's own.
    assert at_limit.status_code == 422
    assert at_limit.json()["detail"] == [
        {
            "loc": ["body", 0, "entity_identifiers", "a"],
            "msg": "Input should be a valid string",
            "type": "string_type",
            "input": json.loads("[" * 13 + "]" * 13),
        }
    ]
    over = post(http, nested(17), content_type="application/json")
    assert (over.status_code, over.json()) == (422, too_deep(16))


@pytest.mark.parametrize(
    "body",
    [b"[" * 1_048_576, b"[" * 500_000 + b"]" * 500_000, b'{"a":' * 150_000 + b"1" + b"}" * 150_000],
    ids=["1-MiB-of-open-brackets", "balanced-arrays", "balanced-objects"],
)
def test_bodies_nested_a_million_deep_are_refused_by_depth_without_crashing(
    http: httpx.Client, body: bytes
) -> None:
    answer = post(http, body[:1_048_576], content_type="application/json")
    assert (answer.status_code, answer.json()) == (422, too_deep(16))
    assert http.get("/healthz").status_code == 200


def schema_depth(schema: dict[str, Any], defs: dict[str, Any]) -> int:
    """How deep JSON valid under ``schema`` can nest arrays and objects."""
    if "$ref" in schema:
        return schema_depth(defs[schema["$ref"].rsplit("/", 1)[-1]], defs)
    branches = [*schema.get("anyOf", ()), *schema.get("allOf", ())]
    if branches:
        return max(schema_depth(branch, defs) for branch in branches)
    kind = schema.get("type")
    if kind == "array":
        return 1 + schema_depth(schema.get("items", {}), defs)
    if kind == "object":
        children = [*schema.get("properties", {}).values()]
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            children.append(extra)
        return 1 + max((schema_depth(c, defs) for c in children), default=0)
    return 0


def test_a_valid_body_nests_exactly_the_minimum_depth() -> None:
    # Why depth is only checked when validation fails: what validates is this shallow.
    schema = pydantic.TypeAdapter(list[Event]).json_schema()
    assert schema_depth(schema, schema.get("$defs", {})) == MIN_JSON_DEPTH == 3


def test_the_least_depth_allowed_still_takes_the_deepest_valid_body(
    small_http: httpx.Client, rdb: redis.Redis, keys: KeySpace
) -> None:
    deepest = [{**EVENT, "entity_identifiers": {"sku": "1"}, "variant_ids": ["a", "b"]}]
    answer = small_http.post(URL, json=deepest)
    assert answer.status_code == 200, answer.text
    over = post(small_http, nested(MIN_JSON_DEPTH + 1), content_type="application/json")
    assert (over.status_code, over.json()) == (422, too_deep(MIN_JSON_DEPTH))
    assert len(queued(rdb, keys)) == 1


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("max_json_depth", MIN_JSON_DEPTH - 1),
        ("max_json_depth", 257),
        ("max_body_bytes", 0),
        ("max_body_bytes", 2 * 1024 * 1024 + 1),
        ("cors_cache_seconds", -1),
    ],
)
def test_limits_out_of_range_are_refused_at_start_up(setting: str, value: int) -> None:
    with pytest.raises(pydantic.ValidationError, match=setting):
        BridgeSettings.model_validate({setting: value})
