"""What body the bridge takes, over real HTTP: media types, beacons, gzip, default limits."""

from __future__ import annotations

import gzip
import json

import httpx
import pytest
import redis

from events_server.queue.keys import KeySpace
from rest_bridge.config import BridgeSettings
from tests.harness.streams import queued, wait_for_records
from tests.harness.web import URL, bomb, nested, padded, post, too_deep

EVENT = {"tenant": "shop-b", "market": "us", "type": "click", "user_id": "u-1"}


BODY = json.dumps([EVENT]).encode()


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


# --- the default limits: max_body_bytes, max_json_depth -----------------------------------


def test_the_default_limit_is_one_mib_on_the_wire(
    http: httpx.Client, rdb: redis.Redis, keys: KeySpace
) -> None:
    assert BridgeSettings.model_fields["max_body_bytes"].default == 1048576
    assert post(http, padded(1048576, BODY), content_type="application/json").status_code == 200
    over = post(http, padded(1048577, BODY), content_type="application/json")
    assert over.status_code == 413
    assert over.json()["detail"] == (
        "request body is larger than the limit of 1048576 bytes (max_body_bytes)"
    )
    assert len(queued(rdb, keys)) == 1


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
