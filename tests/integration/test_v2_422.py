"""Depict's v2 422s, checked against a plain FastAPI app written from its spec.

The bridge serves POST /v2/create-events and /v2/track without FastAPI's pipeline
(rest_bridge.routes.v2), yet must answer every bad body as a FastAPI app written from
contract/create-events-v2.openapi.yaml would: union errors (pydantic names the anyOf member
in ``loc``), the currency pattern as published, ``minItems``, ``minimum``, the enum, extra
fields, wrong types, empty strings, nulls. This module holds that app, its models written by
hand from the spec (not the bridge's), and compares both apps' answers to the same bodies on
both paths, status and parsed JSON, ``input`` and ``ctx`` included.

Outside the comparison, as the bridge's own: too many events (counted before validation),
nesting past the limit, NaN and the infinities (not JSON), quantities past uint64, lone
surrogates. And a 422 past 50 errors lists the first 50 and counts the others.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterator
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

import httpx
import pytest
import redis
import yaml
from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field

from events_server.queue.keys import KeySpace
from rest_bridge.routes.v2 import PATHS
from rest_bridge.validation_v2 import validate_track_body
from tests.harness.reference import schema_shape, serving
from tests.harness.streams import queued

# --- the reference: a plain FastAPI app written from the spec ------------------------

CONTRACT_V2 = Path(__file__).parents[2] / "contract" / "create-events-v2.openapi.yaml"

CURRENCY = yaml.safe_load(CONTRACT_V2.read_text())["components"]["schemas"]["PurchaseEvent"][
    "properties"
]["currency"]["pattern"]

Id = Annotated[str, Field(min_length=1)]


class EUnavailabilityType(StrEnum):
    out_of_stock = "out_of_stock"
    missing = "missing"


class UserTransactionMappingEvent(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user_id: Id | None = None
    session_id: Id | None = None
    dsid: Id | None = None
    transaction_id: Id
    event_type: Literal["transaction_mapping"] | None = None


class PurchasedProduct(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sku: Id
    price: Annotated[float, Field(ge=0)] | str
    quantity: Annotated[int, Field(ge=1)]


class PurchaseEvent(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user_id: Id | None = None
    session_id: Id | None = None
    dsid: Id | None = None
    transaction_id: Id
    event_type: Literal["purchase"] | None = None
    currency: Annotated[str, Field(pattern=CURRENCY)]
    products: Annotated[list[PurchasedProduct], Field(min_length=1)]


class ProductUnavailableEvent(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user_id: Id | None = None
    session_id: Id | None = None
    dsid: Id | None = None
    event_type: Literal["product_unavailable"]
    product_id: Id
    unavailability_type: EUnavailabilityType


class TrackV2Request(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tenant: Id
    market: Id
    events: list[UserTransactionMappingEvent | PurchaseEvent | ProductUnavailableEvent]


reference = FastAPI()


@reference.post("/v2/create-events")
async def create_events_v2(request: TrackV2Request) -> dict[str, Any]:
    return request.model_dump(mode="json")


@reference.post("/v2/track")
async def track_v2(request: TrackV2Request) -> dict[str, Any]:
    return request.model_dump(mode="json")


@pytest.fixture(scope="module")
def plain() -> Iterator[httpx.Client]:
    """A client of the reference app, served by uvicorn on loopback as the bridge is."""
    with serving(reference) as client:
        yield client


def _shape(schema: Any) -> Any:
    """A JSON schema without its words (titles, descriptions); allOf [$ref] as $ref; a
    const without the `type: string` pydantic adds to it."""
    return schema_shape(schema, {"title", "description"}, untyped_consts=True)


def test_the_reference_app_is_the_spec(plain: httpx.Client) -> None:
    spec = yaml.safe_load(CONTRACT_V2.read_text())
    ours = plain.get("/openapi.json").json()
    for name in (
        "TrackV2Request",
        "UserTransactionMappingEvent",
        "PurchaseEvent",
        "PurchasedProduct",
        "ProductUnavailableEvent",
        "EUnavailabilityType",
    ):
        assert _shape(ours["components"]["schemas"][name]) == _shape(
            spec["components"]["schemas"][name]
        ), name


# --- bad bodies: both apps answer the same -------------------------------------------

PRODUCT = {"sku": "white-socks-xl", "price": 89.9, "quantity": 12}
PURCHASE = {"event_type": "purchase", "transaction_id": "T-1", "currency": "SEK",
            "products": [PRODUCT]}  # fmt: skip
MAPPING = {"event_type": "transaction_mapping", "transaction_id": "T-1", "dsid": "d-1"}
UNAVAILABLE = {"event_type": "product_unavailable", "product_id": "p-1",
               "unavailability_type": "out_of_stock"}  # fmt: skip


def _body(*events: Any, **top: Any) -> bytes:
    return json.dumps({"tenant": "t", "market": "m", "events": list(events), **top}).encode()


def _purchase(**fields: Any) -> dict[str, Any]:
    return {**PURCHASE, **fields}


def _product(**fields: Any) -> dict[str, Any]:
    return _purchase(products=[{**PRODUCT, **fields}])


BAD_BODIES: dict[str, bytes] = {
    # not JSON, or not an object
    "empty body": b"",
    "invalid JSON": b'{"tenant": "t",',
    "an array (a v1 body)": json.dumps([{"tenant": "t", "market": "m", "type": "click"}]).encode(),
    "a string": b'"events"',
    "a number": b"5",
    "null": b"null",
    # the request's fields
    "no tenant": json.dumps({"market": "m", "events": []}).encode(),
    "no market and no events": json.dumps({"tenant": "t"}).encode(),
    "an empty tenant": _body(tenant=""),
    "an empty market": _body(MAPPING, market=""),
    "a numeric tenant": _body(tenant=7),
    "a null market": _body(market=None),
    "an extra top-level field": _body(MAPPING, page="thank-you"),
    "events an object": json.dumps({"tenant": "t", "market": "m", "events": MAPPING}).encode(),
    "events a string": json.dumps({"tenant": "t", "market": "m", "events": "x"}).encode(),
    "events null": json.dumps({"tenant": "t", "market": "m", "events": None}).encode(),
    # the union: no member takes it, each member's errors named
    "an empty event": _body({}),
    "a null event": _body(None),
    "an event a string": _body("purchase"),
    "an unknown event_type": _body({"event_type": "refund", "transaction_id": "T-1"}),
    "a purchase's event_type on a mapping": _body(
        {"event_type": "purchase", "transaction_id": "T"}
    ),
    "a purchase without currency": _body({k: v for k, v in PURCHASE.items() if k != "currency"}),
    "an unavailable product without a type": _body({**UNAVAILABLE, "unavailability_type": None}),
    "an unavailable product without event_type": _body(
        {k: v for k, v in UNAVAILABLE.items() if k != "event_type"}
    ),
    # the enum
    "an unknown unavailability_type": _body({**UNAVAILABLE, "unavailability_type": "gone"}),
    "unavailability_type in capitals": _body({**UNAVAILABLE, "unavailability_type": "MISSING"}),
    # the currency pattern, as published
    "a currency in lower case": _body(_purchase(currency="sek")),
    "an empty currency": _body(_purchase(currency="")),
    "a currency of two letters": _body(_purchase(currency="SE")),
    "a numeric currency": _body(_purchase(currency=752)),
    "a null currency": _body(_purchase(currency=None)),
    # minItems, and products of the wrong shape
    "no products": _body(_purchase(products=[])),
    "products an object": _body(_purchase(products=PRODUCT)),
    "a null product": _body(_purchase(products=[None])),
    # minimum (ge)
    "a negative price": _body(_product(price=-0.01)),
    "a quantity of 0": _body(_product(quantity=0)),
    "a negative quantity": _body(_product(quantity=-3)),
    # wrong types
    "a fractional quantity": _body(_product(quantity=1.5)),
    "a quantity in words": _body(_product(quantity="two")),
    "a null price": _body(_product(price=None)),
    "a price object": _body(_product(price={"amount": 89.9})),
    "a price list": _body(_product(price=[89.9])),
    "a numeric sku": _body(_product(sku=123)),
    "a numeric transaction_id": _body({**MAPPING, "transaction_id": 1001}),
    "a numeric user_id": _body({**MAPPING, "user_id": 7}),
    "a boolean product_id": _body({**UNAVAILABLE, "product_id": True}),
    # empty strings
    "an empty sku": _body(_product(sku="")),
    "an empty transaction_id": _body({**MAPPING, "transaction_id": ""}),
    "an empty dsid": _body({**MAPPING, "dsid": ""}),
    "an empty session_id": _body(_purchase(session_id="")),
    "an empty product_id": _body({**UNAVAILABLE, "product_id": ""}),
    # extra fields
    "an extra field in a purchase": _body(_purchase(coupon="SUMMER")),
    "an extra field in a product": _body(_product(colour="white")),
    "an extra field in a mapping": _body({**MAPPING, "order_total": 100}),
    # several at once; encodings; duplicate keys
    "errors in several events": _body(MAPPING, _purchase(currency="kr"), {**UNAVAILABLE, "x": 1}),
    "non-ASCII everywhere": _body({"transaction_id": "ø", "køb": "✓"}, tenant="bütik"),
    "a UTF-8 byte order mark": codecs.BOM_UTF8 + _body(_purchase(currency="sek")),
    "duplicate keys": b'{"tenant": "t", "market": "m", "events": [], "tenant": ""}',
}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", list(BAD_BODIES))
def test_a_bad_body_gets_what_fastapi_answers(  # noqa: PLR0917
    http: httpx.Client,
    plain: httpx.Client,
    rdb: redis.Redis,
    keys: KeySpace,
    name: str,
    path: str,
) -> None:
    body = BAD_BODIES[name]
    headers = {"content-type": "application/json"}
    expected = plain.post(path, content=body, headers=headers)
    answer = http.post(path, content=body, headers=headers)
    assert expected.status_code == 422, expected.text  # a bad body for FastAPI too
    assert (answer.status_code, answer.json()) == (422, expected.json())
    assert answer.headers["content-type"] == "application/json"
    assert queued(rdb, keys) == []


def test_union_errors_name_each_member_in_loc(http: httpx.Client) -> None:
    answer = http.post("/v2/create-events", content=_body(_purchase(currency="sek")))
    locs = [item["loc"] for item in answer.json()["detail"]]
    assert locs == [
        ["body", "events", 0, "UserTransactionMappingEvent", "event_type"],
        ["body", "events", 0, "UserTransactionMappingEvent", "currency"],
        ["body", "events", 0, "UserTransactionMappingEvent", "products"],
        ["body", "events", 0, "PurchaseEvent", "currency"],
        ["body", "events", 0, "ProductUnavailableEvent", "event_type"],
        ["body", "events", 0, "ProductUnavailableEvent", "product_id"],
        ["body", "events", 0, "ProductUnavailableEvent", "unavailability_type"],
        ["body", "events", 0, "ProductUnavailableEvent", "transaction_id"],
        ["body", "events", 0, "ProductUnavailableEvent", "currency"],
        ["body", "events", 0, "ProductUnavailableEvent", "products"],
    ]


@pytest.mark.parametrize(
    "body",
    [
        _body(_purchase(currency="xSEKx")),  # the published pattern's `^`/`$` bind loosely
        _body(_product(price="19,50 kr"), _product(price=0), _product(quantity=3.0)),
        _body(MAPPING, {"transaction_id": "T-2"}, UNAVAILABLE, PURCHASE),
        _body(),
    ],
    ids=["a currency the pattern lets through", "prices and quantities", "every kind", "none"],
)
def test_a_body_fastapi_takes_is_valid_for_the_bridge(plain: httpx.Client, body: bytes) -> None:
    answer = plain.post("/v2/track", content=body, headers={"content-type": "application/json"})
    assert answer.status_code == 200, answer.text
    result, tenants = validate_track_body(body, 16, 500)
    assert result.__class__.__name__ == "TrackRequest", result
    assert tenants == ["t"]


# --- the bridge's own refusals --------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "item"),
    [
        (_body(*[MAPPING] * 501),
         {"loc": ["body", "events"], "type": "too_many_events",
          "msg": "the request has 501 events; at most 500 are allowed (max_events_per_request)"}),
        (b'{"tenant": "t", "market": "m", "events": [], "x": ' + b"[" * 17 + b"]" * 17 + b"}",
         {"loc": ["body"], "type": "json_too_deep",
          "msg": "JSON is nested deeper than the limit of 16 levels of arrays and objects"
                 " (max_json_depth)"}),
        (_body(_product(price=float("nan"))),
         {"loc": ["body"], "type": "json_invalid",
          "msg": "JSON decode error: NaN is not a JSON number"}),
        (_body(_product(quantity=2**64)),
         {"loc": ["body", "events", 0, "products", 0, "quantity"], "type": "less_than_equal",
          "msg": "Input should be less than or equal to 18446744073709551615",
          "ctx": {"le": 2**64 - 1}}),
    ],
    ids=["501 events", "too deep", "a NaN price", "a quantity past uint64"],
)  # fmt: skip
def test_the_bridges_own_refusals_name_what_is_wrong(
    http: httpx.Client, rdb: redis.Redis, keys: KeySpace, body: bytes, item: dict[str, Any]
) -> None:
    answer = http.post("/v2/create-events", content=body)
    assert (answer.status_code, answer.json()) == (422, {"detail": [item]})
    assert queued(rdb, keys) == []


def test_a_422_of_many_errors_lists_the_first_fifty_as_fastapi_orders_them(
    plain: httpx.Client, http: httpx.Client
) -> None:
    body = _body(_purchase(products=[{}] * 2000))
    json_type = {"content-type": "application/json"}
    expected = plain.post("/v2/track", content=body, headers=json_type).json()["detail"]
    answer = http.post("/v2/track", content=body)
    listed = answer.json()["detail"]
    assert answer.status_code == 422
    # The first member's 3 errors, 3 per product, the third member's 6.
    assert len(expected) == 3 + 3 * 2000 + 6
    # FastAPI's first 50, without the echoes of objects and lists a cut 422 leaves out.
    assert listed[:50] == [
        {k: v for k, v in e.items() if k != "input" or not isinstance(v, dict | list)}
        for e in expected[:50]
    ]
    assert listed[50] == {
        "loc": ["body"],
        "msg": f"{len(expected) - 50} more errors not listed: a 422 lists the first 50",
        "type": "too_many_errors",
    }


def test_a_lone_surrogate_is_refused_and_written_escaped(
    http: httpx.Client, rdb: redis.Redis, keys: KeySpace
) -> None:
    # JSON allows "\ud800", UTF-8 does not: pydantic refuses it (FastAPI would then fail to
    # write its own 422, a 500); the bridge writes the echo escaped, as a 422's loc is.
    sent = b'{"tenant": "t", "market": "m", "events": [{"transaction_id": "\\ud800"}]}'
    answer = http.post("/v2/track", content=sent)
    assert answer.status_code == 422
    assert answer.json()["detail"][0] == {
        "type": "string_unicode",
        "loc": ["body", "events", 0, "UserTransactionMappingEvent", "transaction_id"],
        "msg": "Input should be a valid string, unable to parse raw data as a unicode string",
        "input": "\\ud800",
    }
    assert queued(rdb, keys) == []
