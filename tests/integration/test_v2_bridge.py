"""POST /v2/create-events and /v2/track through the real bridge over HTTP, against the real
server and Valkey: what Depict's client sends (keyless beacons from a storefront, in the
three content types), keys, CORS, gzip, limits, one purchase per transaction, the record of
a refused body."""

from __future__ import annotations

import gzip
import json
import uuid
from typing import Any

import httpx
import pytest
import redis

from events_server.pb import events_pb2 as pb
from events_server.pb import events_pb2_grpc
from events_server.queue.keys import KeySpace
from events_server.server.settings import Settings
from events_server.wire.rejected import PAYLOAD_LIMIT
from rest_bridge.config import BridgeSettings
from rest_bridge.routes.v2 import PATHS
from tests.harness.keys import create_key, register_storefront
from tests.harness.rpc import track
from tests.harness.servers import LoopThread, bridge_settings_for, serving, serving_bridge
from tests.harness.streams import queued, wait_for_records
from tests.harness.web import cors_headers

TENANT = "shop-b"

# Depict's client's purchase, as the issue quotes it (price a number, as JSON.stringify wrote it).
PURCHASE = {
    "event_type": "purchase",
    "dsid": "3n0kq7c1x9s",
    "transaction_id": "T-1001",
    "currency": "SEK",
    "products": [{"sku": "white-socks-xl", "price": 89.9, "quantity": 12}],
}
# utilishared's send_transaction_id_to_depict and send_product_unavailable_to_depict.
MAPPING = {"event_type": "transaction_mapping", "transaction_id": "T-1001", "dsid": "3n0kq7c1x9s"}
UNAVAILABLE = {
    "event_type": "product_unavailable",
    "product_id": "SKU-9",
    "unavailability_type": "out_of_stock",
    "user_id": "user-7",
    "dsid": "3n0kq7c1x9s",
}

BEACON_TYPES = {
    "Blob application/json": "application/json",
    "Blob application/x-www-form-urlencoded": "application/x-www-form-urlencoded",
    "string": "text/plain;charset=UTF-8",
}


def body(*events: dict[str, Any], tenant: str = TENANT) -> bytes:
    """A TrackV2Request as the client writes it: events, then tenant and market."""
    return json.dumps({"events": list(events), "tenant": tenant, "market": "se"}).encode()


def kinds(rdb: redis.Redis, keys: KeySpace) -> list[str]:
    return [envelope.WhichOneof("tracked") or "event" for _, envelope in queued(rdb, keys)]


@pytest.fixture
def storefront(settings: Settings, rdb: redis.Redis) -> str:
    """An origin of its own, registered for TENANT (after ``rdb`` cleared the last test's)."""
    origin = f"https://{uuid.uuid4().hex[:12]}.shop.example"
    register_storefront(settings, TENANT, origin)
    return origin


# --- keyless beacons from a storefront ----------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("content_type", list(BEACON_TYPES.values()), ids=list(BEACON_TYPES))
def test_a_keyless_beacon_from_a_registered_origin_is_queued(  # noqa: PLR0917
    keyless: httpx.Client,
    storefront: str,
    rdb: redis.Redis,
    keys: KeySpace,
    content_type: str,
    path: str,
) -> None:
    sent = body(PURCHASE, MAPPING, UNAVAILABLE)
    answer = keyless.post(path, content=sent, headers={"content-type": content_type,
                                                        "origin": storefront})  # fmt: skip
    assert answer.status_code == 200, answer.text
    assert answer.json()["accepted"] == 3
    assert [r["status"] for r in answer.json()["results"]] == ["accepted"] * 3
    assert cors_headers(answer) == {
        "access-control-allow-origin": storefront,
        "access-control-allow-credentials": "true",
        "access-control-expose-headers": "Retry-After, X-Request-Id",
        "vary": "Origin",
    }
    envelopes = [envelope for _, envelope in queued(rdb, keys)]
    assert sorted(e.WhichOneof("tracked") or "" for e in envelopes) == [
        "product_unavailable",
        "purchase",
        "transaction_mapping",
    ]
    for envelope in envelopes:
        assert envelope.storefront_origin == storefront
        assert envelope.api_key_id == ""
    [purchase] = [e.purchase for e in envelopes if e.HasField("purchase")]
    assert (purchase.tenant, purchase.market, purchase.currency) == (TENANT, "se", "SEK")
    [product] = purchase.products
    assert (product.sku, product.price_number, product.quantity) == ("white-socks-xl", "89.9", 12)
    [unavailable] = [e.product_unavailable for e in envelopes if e.HasField("product_unavailable")]
    assert unavailable.unavailability_type == pb.UNAVAILABILITY_TYPE_OUT_OF_STOCK
    assert unavailable.user_id == "user-7"


@pytest.mark.parametrize("path", PATHS)
def test_a_keyless_beacon_from_an_unregistered_origin_is_403(
    keyless: httpx.Client, rdb: redis.Redis, keys: KeySpace, path: str
) -> None:
    origin = f"https://{uuid.uuid4().hex[:12]}.elsewhere.example"
    answer = keyless.post(path, content=body(PURCHASE), headers={"content-type": "text/plain",
                                                                  "origin": origin})  # fmt: skip
    assert answer.status_code == 403, answer.text
    assert repr(origin) in answer.json()["detail"]
    assert cors_headers(answer) == {}  # a refused page reads nothing
    assert queued(rdb, keys) == []


@pytest.mark.parametrize("path", PATHS)
def test_a_key_for_another_tenant_is_403_and_nothing_is_queued(
    bridge: str, settings: Settings, rdb: redis.Redis, keys: KeySpace, path: str
) -> None:
    other = create_key(settings.redis_url, settings.key_prefix, ["shop-c"], label="other")
    headers = {"x-api-key": other, "content-type": "application/json"}
    answer = httpx.post(f"{bridge}{path}", content=body(PURCHASE, MAPPING), headers=headers)
    assert answer.status_code == 403, answer.text
    assert TENANT in answer.json()["detail"]
    assert queued(rdb, keys) == []


@pytest.mark.parametrize("where", ["query", "header", "cookie"])
def test_the_key_may_be_in_the_query_a_header_or_the_cookie(
    bridge: str, api_key: str, rdb: redis.Redis, keys: KeySpace, where: str
) -> None:
    params = {"api_key": api_key} if where == "query" else {}
    headers = {"content-type": "application/json"}
    if where == "header":
        headers["x-api-key"] = api_key
    cookies = {"X-API-KEY": api_key} if where == "cookie" else {}
    with httpx.Client(base_url=bridge, timeout=10, cookies=cookies) as client:
        answer = client.post("/v2/track", params=params, content=body(MAPPING), headers=headers)
    assert answer.status_code == 200, answer.text
    assert kinds(rdb, keys) == ["transaction_mapping"]


def test_a_beacon_type_with_the_key_in_the_cookie_is_415(
    bridge: str, api_key: str, rdb: redis.Redis, keys: KeySpace
) -> None:
    with httpx.Client(base_url=bridge, timeout=10, cookies={"X-API-KEY": api_key}) as client:
        answer = client.post("/v2/create-events", content=body(PURCHASE),
                             headers={"content-type": "text/plain"})  # fmt: skip
    assert answer.status_code == 415
    assert queued(rdb, keys) == []


# --- one purchase per transaction -----------------------------------------------------------


def test_a_purchase_sent_three_times_over_both_paths_and_over_grpc_is_queued_once(  # noqa: PLR0917
    keyless: httpx.Client,
    storefront: str,
    http: httpx.Client,
    stub: events_pb2_grpc.EventsServiceStub,
    rdb: redis.Redis,
    keys: KeySpace,
) -> None:
    headers = {"content-type": "application/json", "origin": storefront}
    first = keyless.post("/v2/create-events", content=body(PURCHASE), headers=headers)
    again = keyless.post("/v2/create-events", content=body(PURCHASE), headers=headers)
    tracked = http.post("/v2/track", content=body(PURCHASE))  # keyed, the deprecated path
    assert [a.status_code for a in (first, again, tracked)] == [200, 200, 200]
    assert [a.json()["results"][0]["status"] for a in (first, again, tracked)] == [
        "accepted",
        "duplicate",
        "duplicate",
    ]
    # The entry id the duplicates name is the one queued.
    assert again.json()["results"][0]["entry_id"] == first.json()["results"][0]["entry_id"]
    over_grpc = pb.TrackedEvent(
        purchase=pb.Purchase(
            tenant=TENANT,
            market="se",
            dsid="3n0kq7c1x9s",  # a resend names the same shopper (their partition)
            transaction_id="T-1001",
            currency="SEK",
            products=[pb.PurchasedProduct(sku="white-socks-xl", price_number="89.9", quantity=12)],
        )
    )
    assert [r.status for r in track(stub, over_grpc).results] == [pb.EventResult.STATUS_DUPLICATE]
    assert kinds(rdb, keys) == ["purchase"]
    # Another tenant's equal transaction id is its own.
    other = http.post("/v2/create-events", content=body(PURCHASE, tenant="shop-c"))
    assert other.json()["results"][0]["status"] == "accepted"
    assert kinds(rdb, keys) == ["purchase", "purchase"]


def test_a_bridge_the_server_does_not_recognise_sends_plain_track_calls(  # noqa: PLR0917
    loop: LoopThread,
    settings: Settings,
    api_key: str,
    rdb: redis.Redis,
    keys: KeySpace,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A server that wants a bridge token this bridge lacks refuses its gathered calls; the
    # bridge then sends each request alone, a /v2/ body as a Track call.
    token = {"bridge_token": "a-bridge-token-of-16+-chars"}
    with (
        serving(loop, Settings(**{**settings.model_dump(), **token})) as (_, target),
        serving_bridge(bridge_settings_for(target)) as url,
    ):
        headers = {"x-api-key": api_key, "content-type": "application/json"}
        first = httpx.post(f"{url}/v2/track", content=body(MAPPING), headers=headers)
        again = httpx.post(f"{url}/v2/create-events", content=body(MAPPING, PURCHASE),
                           headers=headers)  # fmt: skip
    assert first.status_code == again.status_code == 200, (first.text, again.text)
    statuses = [r["status"] for r in (*first.json()["results"], *again.json()["results"])]
    assert statuses == ["accepted", "duplicate", "accepted"]
    assert sorted(kinds(rdb, keys)) == ["purchase", "transaction_mapping"]
    assert "does not take this process for the REST bridge" in caplog.text  # the direct path


# --- the body: gzip, limits before validation ------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
def test_a_gzipped_body_is_queued(
    http: httpx.Client, rdb: redis.Redis, keys: KeySpace, path: str
) -> None:
    headers = {"content-encoding": "gzip", "content-type": "application/json"}
    answer = http.post(path, content=gzip.compress(body(PURCHASE)), headers=headers)
    assert answer.status_code == 200, answer.text
    assert kinds(rdb, keys) == ["purchase"]


def test_a_body_too_large_is_413_before_it_is_read_as_json(
    http: httpx.Client, bridge_settings: BridgeSettings, rdb: redis.Redis, keys: KeySpace
) -> None:
    limit = bridge_settings.max_body_bytes
    invalid = b"{" + b" " * limit + b"}"  # not even a valid body: never looked at
    answer = http.post("/v2/create-events", content=invalid)
    assert answer.status_code == 413
    assert answer.json()["detail"] == (
        f"request body is larger than the limit of {limit} bytes (max_body_bytes)"
    )
    assert queued(rdb, keys) == []


def test_too_many_events_are_refused_whole_before_any_is_validated(
    http: httpx.Client, bridge_settings: BridgeSettings, rdb: redis.Redis, keys: KeySpace
) -> None:
    most = bridge_settings.max_events_per_request
    answer = http.post("/v2/track", content=body(*[{}] * (most + 1)))  # every one invalid
    assert answer.status_code == 422
    assert answer.json() == {
        "detail": [
            {
                "loc": ["body", "events"],
                "msg": f"the request has {most + 1} events; at most {most} are allowed"
                " (max_events_per_request)",
                "type": "too_many_events",
            }
        ]
    }
    assert queued(rdb, keys) == []


def test_a_large_body_is_validated_in_a_worker_process_as_a_small_one(
    http: httpx.Client, rdb: redis.Redis, keys: KeySpace
) -> None:
    # Past 64 KiB: parsed off the event loop, with the same answer.
    products = [{"sku": f"sku-{i}", "price": f"{i},50 kr", "quantity": 1} for i in range(10)]
    purchases = [{**PURCHASE, "transaction_id": f"T-{n}", "products": products} for n in range(300)]
    sent = body(*purchases)
    assert len(sent) > 64 * 1024
    answer = http.post("/v2/create-events", content=sent)
    assert answer.status_code == 200, answer.text
    assert answer.json()["accepted"] == 300
    queued_purchases = [envelope.purchase for _, envelope in queued(rdb, keys)]
    assert sorted(p.transaction_id for p in queued_purchases) == sorted(
        f"T-{n}" for n in range(300)
    )
    for purchase in queued_purchases:
        assert [p.price_text for p in purchase.products] == [p["price"] for p in products]
    bad = http.post("/v2/create-events", content=sent.replace(b'"T-299"', b'""'))
    assert bad.status_code == 422
    assert ["body", "events", 299, "PurchaseEvent", "transaction_id"] in [
        e["loc"] for e in bad.json()["detail"]
    ]


def test_the_servers_own_refusal_names_the_field_as_it_is_in_the_body(
    http: httpx.Client, rdb: redis.Redis, keys: KeySpace
) -> None:
    # The spec bounds no string; the server does (max_string_length).
    sent = body({**PURCHASE, "products": [{"sku": "s" * 100_000, "price": 1, "quantity": 1}]})
    answer = http.post("/v2/create-events", content=sent)
    assert answer.status_code == 422, answer.text
    locs = [item["loc"] for item in answer.json()["detail"]]
    assert ["body", "events", 0, "products", 0, "sku"] in locs, locs
    assert queued(rdb, keys) == []


# --- CORS preflight --------------------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
def test_a_preflight_from_a_registered_origin_is_answered(
    keyless: httpx.Client, storefront: str, path: str
) -> None:
    asked = {
        "access-control-request-method": "POST",
        "access-control-request-headers": "content-type",
    }
    answer = keyless.options(path, headers={"origin": storefront, **asked})
    assert answer.status_code == 204
    assert cors_headers(answer) == {
        "access-control-allow-origin": storefront,
        "access-control-allow-credentials": "true",
        "access-control-allow-methods": "POST",
        "access-control-allow-headers": "Content-Type, Content-Encoding, X-API-KEY, X-Request-Id",
        "access-control-max-age": "600",
        "vary": "Origin",
    }


@pytest.mark.parametrize("path", PATHS)
def test_a_preflight_from_an_unregistered_origin_is_403(keyless: httpx.Client, path: str) -> None:
    origin = f"https://{uuid.uuid4().hex[:12]}.elsewhere.example"
    answer = keyless.options(path, headers={"origin": origin,
                                            "access-control-request-method": "POST"})  # fmt: skip
    assert answer.status_code == 403
    assert cors_headers(answer) == {}


# --- the rejected record, metrics, access lines -------------------------------------------------


def test_a_bad_v2_body_leaves_a_record_for_its_tenant(
    http: httpx.Client, rdb: redis.Redis, keys: KeySpace
) -> None:
    sent = body({**PURCHASE, "currency": "sek"}, tenant="shop-dl")
    answer = http.post("/v2/create-events", content=sent)
    assert answer.status_code == 422
    [record] = wait_for_records(rdb, keys, "shop-dl")
    assert record[b"source"] == b"http"
    fields = [error["field"] for error in json.loads(record[b"errors"])]
    assert "body.events.0.PurchaseEvent.currency" in fields
    assert record[b"payload"] == sent[:PAYLOAD_LIMIT]


def test_metrics_count_each_v2_path_as_its_own_route(http: httpx.Client, bridge: str) -> None:
    for path in PATHS:
        http.post(path, content=b"{}")
    scraped = httpx.get(f"{bridge}/metrics").text
    for path in PATHS:
        assert f'events_http_requests_total{{method="POST",route="{path}",status="422"}}' in (
            scraped
        ), path
