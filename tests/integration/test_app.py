"""The REST bridge over real HTTP: the contract's examples, its 422 bodies, forwarding, errors."""

from __future__ import annotations

import json
import re
from typing import Any

import httpx
import pytest
import redis

from events_server.queue.keys import KeySpace
from events_server.server.settings import Settings
from events_server.wire.codec import event_to_dict
from tests.harness.data import contract_examples, event_of_size
from tests.harness.processes import tail
from tests.harness.servers import LoopThread, bridged, lonely_bridge, serving
from tests.harness.streams import queued
from tests.harness.waiting import eventually
from tests.harness.web import keyed_client, post


@pytest.mark.usefixtures("rdb")
def test_every_contract_example_is_accepted_and_queued_intact(
    http: httpx.Client, settings: Settings
) -> None:
    examples = contract_examples()
    for example in examples:
        answer = http.post("/create-events", json=example)
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert (body["accepted"], body["duplicates"]) == (1, 0)
        [result] = body["results"]
        assert result["status"] == "accepted"
        assert re.fullmatch(r"\d+-\d+", result["entry_id"])
        assert 0 <= result["partition"] < settings.partitions

    lines = tail(settings)
    assert sorted((line["event"] for line in lines), key=json.dumps) == sorted(
        (example[0] for example in examples), key=json.dumps
    )
    [newest] = tail(settings, "--count", "1")
    assert newest["event"] == examples[-1][0]
    assert newest["client_ip"] == "127.0.0.1"
    assert newest["user_agent"].startswith("python-httpx/")


def test_duplicates_are_reported_per_event(
    http: httpx.Client, rdb: redis.Redis, keys: KeySpace
) -> None:
    event = {"tenant": "my_store", "market": "us", "type": "purchase", "deduplication_id": "o-1"}
    first = http.post("/create-events", json=[event, event]).json()
    second = http.post("/create-events", json=[event]).json()
    assert [r["status"] for r in first["results"]] == ["accepted", "duplicate"]
    assert (first["accepted"], first["duplicates"]) == (1, 1)
    assert second["results"][0] == first["results"][0] | {"status": "duplicate"}
    assert len(queued(rdb, keys)) == 1


def test_headers_are_forwarded_and_the_peer_is_the_client(
    http: httpx.Client, rdb: redis.Redis, keys: KeySpace
) -> None:
    answer = http.post(
        "/create-events",
        json=[{"tenant": "t", "market": "m", "type": "click"}],
        headers={
            "User-Agent": "Mozilla/5.0 (X11)",
            "Referer": "https://shop.example/cart",
            # Sent by the client itself: it must not become the client IP.
            "X-Forwarded-For": "6.6.6.6",
            "X-Forwarded-Host": "shop.example",
        },
    )
    assert answer.status_code == 200
    [(_, envelope)] = queued(rdb, keys)
    assert envelope.user_agent == "Mozilla/5.0 (X11)"
    assert envelope.referer == "https://shop.example/cart"
    assert envelope.client_ip == "127.0.0.1"
    assert envelope.forwarded_host == "shop.example"


# --- 422: the contract's HTTPValidationError, whole bodies ---------------------------


EVENT = {"tenant": "t", "market": "m", "type": "click"}


def test_json_content_types_with_parameters_are_json(http: httpx.Client) -> None:
    answer = post(http, json.dumps([EVENT]), content_type="application/json; charset=utf-8")
    assert answer.status_code == 200


TYPES = (
    "'page_view', 'click', 'add_to_cart', 'purchase', 'element_visible', 'ws_click'"
    " or 'recommendations_inserted'"
)


ONE_CHARACTER = "String should have at least 1 character"
UTF8 = "String should be valid UTF-8 (no lone surrogates)"


def error(loc: list[str | int], msg: str, kind: str) -> dict[str, Any]:
    """One item of a 422's detail, as the contract's ValidationError has it."""
    return {"loc": loc, "msg": msg, "type": kind}


@pytest.mark.parametrize(
    ("content", "detail"),
    [
        pytest.param(
            "[{",
            [
                {
                    "loc": ["body", 2],
                    "msg": "JSON decode error",
                    "type": "json_invalid",
                    "input": {},
                    "ctx": {"error": "Expecting property name enclosed in double quotes"},
                }
            ],
            id="invalid-json",
        ),
        pytest.param(
            "",
            [{"loc": ["body"], "msg": "Field required", "type": "missing", "input": None}],
            id="empty-body",
        ),
        pytest.param(
            json.dumps(EVENT),
            [
                {
                    "loc": ["body"],
                    "msg": "Input should be a valid list",
                    "type": "list_type",
                    "input": EVENT,
                }
            ],
            id="not-an-array",
        ),
        pytest.param(
            "[1]",
            [
                {
                    "loc": ["body", 0],
                    "msg": "Input should be a valid dictionary or object to extract fields from",
                    "type": "model_attributes_type",
                    "input": 1,
                }
            ],
            id="not-an-object",
        ),
        pytest.param(
            json.dumps([{"tenant": "t"}]),
            [
                {
                    "loc": ["body", 0, "market"],
                    "msg": "Field required",
                    "type": "missing",
                    "input": {"tenant": "t"},
                },
                {
                    "loc": ["body", 0, "type"],
                    "msg": "Field required",
                    "type": "missing",
                    "input": {"tenant": "t"},
                },
            ],
            id="missing-fields",
        ),
        pytest.param(
            json.dumps([EVENT, {**EVENT, "colour": "red"}]),
            [
                {
                    "loc": ["body", 1, "colour"],
                    "msg": "Extra inputs are not permitted",
                    "type": "extra_forbidden",
                    "input": "red",
                }
            ],
            id="extra-field",
        ),
        pytest.param(
            json.dumps(
                [{**EVENT, "tenant": True, "variant_ids": "v1", "entity_identifiers": {"a": True}}]
            ),
            [
                {
                    "loc": ["body", 0, "tenant"],
                    "msg": "Input should be a valid string",
                    "type": "string_type",
                    "input": True,
                },
                {
                    "loc": ["body", 0, "variant_ids"],
                    "msg": "Input should be a valid list",
                    "type": "list_type",
                    "input": "v1",
                },
                {
                    "loc": ["body", 0, "entity_identifiers", "a"],
                    "msg": "Input should be a valid string",
                    "type": "string_type",
                    "input": True,
                },
            ],
            id="mistyped-fields",
        ),
        pytest.param(
            json.dumps([{**EVENT, "type": "refund"}]),
            [
                {
                    "loc": ["body", 0, "type"],
                    "msg": "Input should be 'page_view', 'click', 'add_to_cart', 'purchase',"
                    " 'element_visible', 'ws_click' or 'recommendations_inserted'",
                    "type": "enum",
                    "input": "refund",
                    "ctx": {
                        "expected": "'page_view', 'click', 'add_to_cart', 'purchase',"
                        " 'element_visible', 'ws_click' or 'recommendations_inserted'"
                    },
                }
            ],
            id="unknown-type",
        ),
        pytest.param(
            json.dumps([{**EVENT, "dsid": ""}]),
            [
                {
                    "loc": ["body", 0, "dsid"],
                    "msg": "String should have at least 1 character",
                    "type": "string_too_short",
                    "input": "",
                    "ctx": {"min_length": 1},
                }
            ],
            id="empty-dsid",
        ),
        pytest.param(
            json.dumps([EVENT, {**EVENT, "tenant": ""}]),
            [error(["body", 1, "tenant"], "tenant must not be empty", "string_too_short")],
            id="empty-tenant-server-rule",
        ),
        pytest.param(
            '[{"tenant": "t", "market": "m", "type": "click", "user_id": "\\ud800",'
            ' "variant_ids": ["ok", "\\udfff"]}]',
            [
                error(["body", 0, "user_id"], UTF8, "string_unicode"),
                error(["body", 0, "variant_ids", 1], UTF8, "string_unicode"),
            ],
            id="lone-surrogates",
        ),
        pytest.param(
            b'[{"tenant": "caf\xe9"}]',
            # At the byte offset of \xe9.
            [error(["body", 16], "JSON decode error: invalid UTF-8", "json_invalid")],
            id="invalid-utf8",
        ),
        pytest.param(
            "[" * 100_000,
            [
                error(
                    ["body"],
                    "JSON is nested deeper than the limit of 16 levels of arrays and"
                    " objects (max_json_depth)",
                    "json_too_deep",
                )
            ],
            id="nested-too-deeply",
        ),
        pytest.param(
            '[{"tenant": "t", "market": "m", "type": "click", "user_id": NaN}]',
            [
                {
                    "loc": ["body", 0, "user_id"],
                    "msg": "Input should be a valid string",
                    "type": "string_type",
                    "input": None,  # JSON has no NaN
                }
            ],
            id="nan",
        ),
        pytest.param(
            '[{"tenant": "t", "market": "m", "type": "click", "\\ud800": 1}]',
            [
                {
                    "loc": ["body", 0],
                    "msg": "Input should be a valid string, unable to parse raw data as a unicode"
                    " string",
                    "type": "string_unicode",
                    "input": "\\ud800",  # the key, escaped: UTF-8 cannot hold it
                }
            ],
            id="lone-surrogate-key",
        ),
    ],
)
def test_bad_bodies_get_the_contracts_422(
    http: httpx.Client, rdb: redis.Redis, keys: KeySpace, content: str, detail: list[dict[str, Any]]
) -> None:
    answer = post(http, content, content_type="application/json")
    assert answer.status_code == 422
    assert answer.headers["content-type"] == "application/json"
    assert answer.json() == {"detail": detail}
    assert queued(rdb, keys) == []


# --- errors from the gRPC side -------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "detail"),
    [
        ({}, "missing API key: send it as x-api-key metadata (HTTP: the X-API-KEY header,"),
        ({"X-API-KEY": "evk_not-a-key"}, "unknown or revoked API key"),
        # A Cookie header Python's parser refuses holds no key; it is no crash either.
        ({"Cookie": "s,=1; X-API-KEY=evk_x"}, "missing API key"),
    ],
    ids=["no-key", "unknown-key", "malformed-cookie"],
)
def test_a_missing_or_unknown_key_is_401_with_a_challenge(
    bridge: str, rdb: redis.Redis, keys: KeySpace, headers: dict[str, str], detail: str
) -> None:
    answer = httpx.post(f"{bridge}/create-events", json=[EVENT], headers=headers, timeout=10)
    assert answer.status_code == 401
    # RFC 9110 wants a challenge with every 401; "APIKey" opens no browser dialog.
    assert answer.headers["www-authenticate"] == "APIKey"
    assert answer.json()["detail"].startswith(detail)
    assert queued(rdb, keys) == []


def test_a_tenant_the_key_does_not_cover_is_403_naming_it(
    http: httpx.Client, rdb: redis.Redis, keys: KeySpace
) -> None:
    answer = http.post("/create-events", json=[EVENT, {**EVENT, "tenant": "someone_else"}])
    assert answer.status_code == 403
    assert "www-authenticate" not in answer.headers
    detail = answer.json()["detail"]
    assert detail.startswith("events[1].tenant: key ")
    assert "may not write to tenant 'someone_else'" in detail
    assert detail.endswith("nothing was queued")
    assert queued(rdb, keys) == []


def test_no_grpc_server_means_503_with_retry_after_and_not_ready(
    api_key: str,
) -> None:
    with lonely_bridge() as url, keyed_client(url, api_key) as client:
        answer = client.post("/create-events", json=[EVENT])
        assert answer.status_code == 503
        assert answer.headers["retry-after"] == "1"
        assert answer.json()["detail"]
        assert client.get("/healthz").status_code == 200
        assert client.get("/readyz").status_code == 503


def test_health_endpoints(http: httpx.Client) -> None:
    assert http.get("/healthz").json() == {"status": "ok"}
    ready = http.get("/readyz")
    assert (ready.status_code, ready.json()) == (200, {"status": "SERVING"})


# --- limits --------------------------------------------------------------------------


def only_detail(answer: httpx.Response) -> dict[str, Any]:
    """The one item of a 422's detail."""
    assert answer.status_code == 422, answer.text
    [item] = answer.json()["detail"]
    assert set(item) == {"loc", "msg", "type"}  # the contract's ValidationError, no more
    return dict(item)


def test_over_max_events_per_request_is_a_422_for_the_whole_body(
    http: httpx.Client, rdb: redis.Redis, keys: KeySpace, settings: Settings
) -> None:
    most = settings.max_events_per_request
    assert http.post("/create-events", json=[EVENT] * most).status_code == 200
    item = only_detail(http.post("/create-events", json=[EVENT] * (most + 1)))
    assert item["loc"] == ["body"]
    assert item["type"] == "too_many_events"
    assert "501 events; at most 500" in item["msg"]
    assert "max_events_per_request" in item["msg"]
    assert len(queued(rdb, keys)) == most


def test_an_event_over_max_event_bytes_is_a_422_at_its_index(
    http: httpx.Client, rdb: redis.Redis, keys: KeySpace, settings: Settings
) -> None:
    size, longest = settings.max_event_bytes, settings.max_string_length
    largest = event_to_dict(event_of_size(size, longest))
    assert http.post("/create-events", json=[largest]).status_code == 200
    too_large = event_to_dict(event_of_size(size + 1, longest))
    item = only_detail(http.post("/create-events", json=[EVENT, too_large]))
    assert item["loc"] == ["body", 1]
    assert item["type"] == "event_too_large"
    assert "32769 bytes" in item["msg"]
    assert "at most 32768" in item["msg"]
    assert "max_event_bytes" in item["msg"]
    assert [e.event.variant_ids for _, e in queued(rdb, keys)] == [largest["variant_ids"]]


@pytest.mark.parametrize(
    ("fields", "loc"),
    [
        ({"url": "x" * 8193}, ["body", 0, "url"]),
        ({"variant_ids": ["a", "x" * 8193]}, ["body", 0, "variant_ids", 1]),
        ({"entity_identifiers": {"sku": "x" * 8193}}, ["body", 0, "entity_identifiers"]),
        ({"entity_identifiers": {"x" * 8193: "1"}}, ["body", 0, "entity_identifiers"]),
    ],
)
def test_a_string_over_max_string_length_is_a_422_at_its_field(
    http: httpx.Client, rdb: redis.Redis, keys: KeySpace, fields: dict[str, Any], loc: list[Any]
) -> None:
    # One character less in the same place is fine.
    fitting = json.loads(json.dumps(fields).replace("x" * 8193, "x" * 8192))
    assert http.post("/create-events", json=[{**EVENT, **fitting}]).status_code == 200
    item = only_detail(http.post("/create-events", json=[{**EVENT, **fields}]))
    assert item["loc"] == loc
    assert item["type"] == "string_too_long"
    assert "8193 characters long; at most 8192" in item["msg"]
    assert "max_string_length" in item["msg"]
    assert len(queued(rdb, keys)) == 1


def test_a_body_over_max_request_bytes_is_a_413_not_a_429_and_is_recorded(
    loop: LoopThread, settings: Settings, api_key: str, rdb: redis.Redis, keys: KeySpace
) -> None:
    # Two events of 32764 bytes, each framed by 4: a 65536-byte request.
    fitting = [event_to_dict(event_of_size(32_764, 8_192, tenant="shop-big"))] * 2
    over = [fitting[0], event_to_dict(event_of_size(32_765, 8_192, tenant="shop-big"))]
    with (
        serving(loop, settings, max_request_bytes=65_536) as (_, target),
        bridged(target) as url,
        keyed_client(url, api_key) as client,
    ):
        assert client.post("/create-events", json=fitting).status_code == 200
        answer = client.post("/create-events", json=over)
    # Retrying never helps: not the 429 + Retry-After of backpressure.
    assert answer.status_code == 413
    assert "retry-after" not in answer.headers
    detail = answer.json()["detail"]
    assert "65537 vs. 65536" in detail
    assert "max_request_bytes" in detail
    assert len(queued(rdb, keys)) == 2
    # gRPC refused it before the server's code saw it: the bridge files the record.
    eventually(lambda: rdb.xlen(keys.rejected("shop-big")) == 1)
    entries: Any = rdb.xrange(keys.rejected("shop-big"))
    [(_, record)] = entries
    assert record[b"source"] == b"http"
    [error] = json.loads(record[b"errors"])
    assert (error["field"], error["reason"]) == ("body", "request_too_large")
