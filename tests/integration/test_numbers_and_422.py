"""The contract's 422s, checked against a plain FastAPI app written from the contract.

The bridge does not run FastAPI's pipeline for POST /create-events (see
rest_bridge.routes.v1), yet it must answer every bad body as FastAPI would. So this
module holds a reference: a minimal FastAPI app whose pydantic models are written
by hand from contract/create-events.openapi.yaml, with the one rule the contract's
schema cannot say (a JSON number where a string goes is taken as its text, as
Depict's storefront client needs), and compares both apps' answers to the same
bodies, status and parsed JSON, ``input`` and ``ctx`` included.

Outside the comparison, as the bridge's own (tested in test_app and test_body):
413, 415, nesting past max_json_depth, corrupt gzip, lone surrogates (protobuf
strings are UTF-8), the server's own rules (an empty tenant), and bodies FastAPI
cannot answer (a NaN or a lone surrogate echoed as ``input`` makes its
JSONResponse raise: a 500) or answers 400 without naming anything (not UTF-8).
"""

from __future__ import annotations

import codecs
import json
import math
from collections.abc import Iterator
from enum import StrEnum
from typing import Annotated, Any

import httpx
import pytest
import redis
import yaml
from fastapi import FastAPI
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, TypeAdapter, ValidationError

from events_server.queue.keys import KeySpace
from events_server.server.settings import Settings
from events_server.wire.codec import OPTIONAL_STRING_FIELDS, event_to_dict
from rest_bridge.models import Event as BridgeEvent
from rest_bridge.responses import Reply
from rest_bridge.validation import validate_body
from tests.harness.data import CONTRACT
from tests.harness.keys import create_key
from tests.harness.reference import schema_shape, serving
from tests.harness.streams import queued

# --- the reference: a plain FastAPI app written from the contract -------------------


def number_as_text(value: Any) -> Any:
    """The number rule: a finite JSON number where the contract has a string is its text."""
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return str(value)
    return value


Str = Annotated[str, BeforeValidator(number_as_text)]


class EEventType(StrEnum):
    page_view = "page_view"
    click = "click"
    add_to_cart = "add_to_cart"
    purchase = "purchase"
    element_visible = "element_visible"
    ws_click = "ws_click"
    recommendations_inserted = "recommendations_inserted"


class Event(BaseModel):
    model_config = ConfigDict(extra="forbid")  # additionalProperties: false

    tenant: Str
    market: Str
    deduplication_id: Str | None = None
    type: EEventType
    user_id: Str | None = None
    session_id: Str | None = None
    dsid: Annotated[str, Field(min_length=1), BeforeValidator(number_as_text)] | None = None
    ab_test_group: Str | None = None
    product_id: Str | None = None
    variant_ids: list[Str] | None = None
    entity_identifiers: dict[str, Str] | None = None
    url: Str | None = None
    entity_price: Str | None = None
    currency: Str | None = None
    document_referrer: Str | None = None
    document_width: Str | None = None
    attribution_id: Str | None = None
    recommendation_id: Str | None = None
    search_result_id: Str | None = None
    product_listing_result_id: Str | None = None
    click_location: Str | None = None
    page_url: Str | None = None
    recommendation_type: Str | None = None


reference = FastAPI()


@reference.post("/create-events")
async def create_events(request: list[Event]) -> list[dict[str, Any]]:
    """The events as validated: what the number rule made of them."""
    return [event.model_dump(mode="json", exclude_none=True) for event in request]


@pytest.fixture(scope="module")
def plain() -> Iterator[httpx.Client]:
    """A client of the reference app, served by uvicorn on loopback as the bridge is."""
    with serving(reference) as client:
        yield client


def _shape(schema: Any) -> Any:
    """A JSON schema without its words (titles, descriptions, defaults); allOf [$ref] as $ref."""
    return schema_shape(schema, {"title", "description", "default"})


def test_the_reference_app_is_the_contract(plain: httpx.Client) -> None:
    contract = yaml.safe_load(CONTRACT.read_text())
    ours = plain.get("/openapi.json").json()
    for name in ("Event", "EEventType"):
        assert _shape(ours["components"]["schemas"][name]) == _shape(
            contract["components"]["schemas"][name]
        )
    body = ours["paths"]["/create-events"]["post"]["requestBody"]
    assert _shape(body) == _shape(contract["paths"]["/create-events"]["post"]["requestBody"])


# --- bad bodies: both apps answer the same -------------------------------------------

EVENT = {"tenant": "t", "market": "m", "type": "click"}


def _json(*events: Any) -> bytes:
    return json.dumps(list(events)).encode()


BAD_BODIES: dict[str, bytes] = {
    # not JSON
    "invalid JSON": b"[{",
    "trailing comma": b'[{"tenant": "t",}]',
    "single quotes": b"[{'tenant': 't'}]",
    "truncated": _json(EVENT)[:-3],
    "not JSON at all": b"hello",
    "only whitespace": b"   ",
    "two documents": _json(EVENT) + b" []",
    "empty body": b"",
    # not an array of objects
    "an object": json.dumps(EVENT).encode(),
    "a string": b'"events"',
    "a number": b"5",
    "null": b"null",
    "true": b"true",
    "an array of numbers": b"[1, 2.5]",
    "an array of null": b"[null]",
    "an array of strings": b'["x"]',
    "an array of arrays": b"[[]]",
    # fields missing, extra
    "an empty event": b"[{}]",
    "missing market and type": _json({"tenant": "t"}),
    "an extra field": _json(EVENT, {**EVENT, "colour": "red"}),
    "extra fields and missing ones": _json({"tenant": "t", "colour": 1, "size": [2]}),
    # the type
    "an unknown type": _json({**EVENT, "type": "refund"}),
    "a type in capitals": _json({**EVENT, "type": "PAGE_VIEW"}),
    "a numeric type": _json({**EVENT, "type": 1}),
    "a type over 64 bits": _json({**EVENT, "type": 10**30}),
    "a null type": _json({**EVENT, "type": None}),
    # null where not allowed
    "a null tenant": _json({**EVENT, "tenant": None}),
    "a null market and variant id": _json({**EVENT, "market": None, "variant_ids": [None]}),
    "a null identifier": _json({**EVENT, "entity_identifiers": {"sku": None}}),
    # booleans, arrays and objects in string fields (numbers are fine: see below)
    "a boolean tenant": _json({**EVENT, "tenant": True}),
    "a boolean document_width": _json({**EVENT, "document_width": False}),
    "an array url": _json({**EVENT, "url": ["https://shop.example"]}),
    "an object price": _json({**EVENT, "entity_price": {"amount": 100}}),
    "a boolean variant id": _json({**EVENT, "variant_ids": ["a", True, 3]}),
    "a boolean identifier": _json({**EVENT, "entity_identifiers": {"sku": True, "ean": 4006}}),
    "a nested identifier": _json({**EVENT, "entity_identifiers": {"sku": {"id": "1"}}}),
    # lists and maps of the wrong shape
    "variant_ids a string": _json({**EVENT, "variant_ids": "v1"}),
    "variant_ids an object": _json({**EVENT, "variant_ids": {"0": "v1"}}),
    "entity_identifiers a list": _json({**EVENT, "entity_identifiers": [["sku", "1"]]}),
    "entity_identifiers a string": _json({**EVENT, "entity_identifiers": "sku=1"}),
    # the schema's constraint
    "an empty dsid": _json({**EVENT, "dsid": ""}),
    "a boolean dsid": _json({**EVENT, "dsid": False}),
    # numbers where strings go, with something else wrong: the input echoes them
    "numbers and a missing market": _json(
        {"tenant": "t", "type": "click", "document_width": 1280, "entity_price": 99.5}
    ),
    "numbers and a bad type": _json({**EVENT, "type": "pageview", "document_width": 1280}),
    # junk, deep and wide
    "nested junk": _json({**EVENT, "user_id": {"a": [1, {"b": None}], "c": [[True]]}}),
    "junk at the depth limit": (
        b'[{"tenant": "t", "market": "m", "type": "click", "entity_identifiers": {"a": '
        + b"[" * 13
        + b"]" * 13
        + b"}}]"
    ),
    "errors in several events": _json(
        {**EVENT, "type": "x"}, EVENT, {"tenant": 1, "market": False}, [EVENT]
    ),
    "every field wrong": _json({name: True for name in Event.model_fields}),
    "non-ASCII everywhere": _json({"tenant": "bütik", "market": "日本", "type": "køb", "ø": "✓"}),
    # encodings the stdlib parser reads (FastAPI's too), with errors inside
    "a UTF-8 byte order mark": codecs.BOM_UTF8 + _json({**EVENT, "type": "nope"}),
    "UTF-16": json.dumps([{**EVENT, "market": None}]).encode("utf-16"),
    # the last of duplicate keys counts, in both parsers
    "duplicate keys": b'[{"tenant": "t", "market": "m", "type": "click", "tenant": false}]',
}


@pytest.mark.parametrize("name", list(BAD_BODIES))
@pytest.mark.usefixtures("rdb")
def test_a_bad_body_gets_what_fastapi_answers(
    http: httpx.Client, plain: httpx.Client, keys: KeySpace, rdb: redis.Redis, name: str
) -> None:
    body = BAD_BODIES[name]
    headers = {"content-type": "application/json"}
    expected = plain.post("/create-events", content=body, headers=headers)
    answer = http.post("/create-events", content=body, headers=headers)
    assert expected.status_code == 422, expected.text  # a bad body for FastAPI too
    assert (answer.status_code, answer.json()) == (422, expected.json())
    assert answer.headers["content-type"] == "application/json"
    assert queued(rdb, keys) == []


def test_the_detail_is_fastapis_whole_error_not_only_the_contracts_three_fields(
    http: httpx.Client,
) -> None:
    answer = http.post("/create-events", json=[{**EVENT, "dsid": "", "type": "refund"}])
    assert answer.json() == {
        "detail": [
            {
                "type": "enum",
                "loc": ["body", 0, "type"],
                "msg": "Input should be 'page_view', 'click', 'add_to_cart', 'purchase',"
                " 'element_visible', 'ws_click' or 'recommendations_inserted'",
                "input": "refund",
                "ctx": {
                    "expected": "'page_view', 'click', 'add_to_cart', 'purchase',"
                    " 'element_visible', 'ws_click' or 'recommendations_inserted'"
                },
            },
            {
                "type": "string_too_short",
                "loc": ["body", 0, "dsid"],
                "msg": "String should have at least 1 character",
                "input": "",
                "ctx": {"min_length": 1},
            },
        ]
    }


# --- what FastAPI cannot answer: the bridge still does --------------------------------


@pytest.mark.parametrize(
    ("body", "item"),
    [
        # Not JSON, but Python's parser takes them; JSON has no NaN: null.
        (b'[{"tenant": "t", "market": "m", "type": "click", "user_id": NaN}]',
         {"loc": ["body", 0, "user_id"], "input": None}),
        (b'[{"tenant": "t", "market": "m", "type": "click", "url": 1e400}]',
         {"loc": ["body", 0, "url"], "input": None}),
        # JSON allows "\ud800", UTF-8 does not: written escaped, as a 422's loc is.
        (b'[{"tenant": "t", "market": "m", "type": "\\ud800"}]',
         {"loc": ["body", 0, "type"], "input": "\\ud800"}),
    ],
    ids=["NaN", "a number past the largest double", "a lone surrogate"],
)  # fmt: skip
def test_inputs_fastapi_cannot_write_are_written_as_json_can(
    http: httpx.Client, plain: httpx.Client, body: bytes, item: dict[str, Any]
) -> None:
    headers = {"content-type": "application/json"}
    assert plain.post("/create-events", content=body, headers=headers).status_code == 500
    answer = http.post("/create-events", content=body, headers=headers)
    assert answer.status_code == 422
    [error] = answer.json()["detail"]
    assert {k: error[k] for k in item} == item


# --- numbers where strings go: accepted, and kept as their JSON text -------------------

NUMBERS = [
    ("1280", "1280"),  # window.innerWidth
    ("99.5", "99.5"),
    ("0", "0"),
    ("-3", "-3"),
    ("100.0", "100.0"),  # Python's json writes floats so
    ("0.1", "0.1"),
    ("0.30000000000000004", "0.30000000000000004"),  # 0.1 + 0.2 in JavaScript too
    ("1263.3333740234375", "1263.3333740234375"),
    ("12345678901234567890123", "12345678901234567890123"),  # ints are exact
    ("1e21", "1e+21"),  # JavaScript writes 1e+21
    ("1e-05", "1e-05"),  # Python's json writes that; JavaScript 0.00001
    ("-0.0", "-0.0"),
]


@pytest.mark.parametrize(("number", "text"), NUMBERS)
def test_a_number_becomes_its_text_on_both_validation_paths(number: str, text: str) -> None:
    raw = f'[{{"tenant": "t", "market": "m", "type": "click", "document_width": {number}}}]'
    # pydantic's JSON parser; the stdlib's, taken when the first refuses (a BOM here).
    for body in (raw.encode(), codecs.BOM_UTF8 + raw.encode()):
        events = validate_body(body, 16)
        assert not isinstance(events, Reply)
        assert events[0].document_width == text


VALUES = [
    "x", "", 0, 7, 2**64, 10**30, 0.5, -0.0, 1e-7, 1e300, True, False, None,
    [], ["x"], {}, {"a": "b"}, math.nan, math.inf, -math.inf,
]  # fmt: skip


def _outcome(adapter: TypeAdapter[Any], raw: bytes | None, value: Any) -> Any:
    try:
        if raw is None:
            events = adapter.validate_python(value, from_attributes=True)
        else:
            events = adapter.validate_json(raw)
    except ValidationError as error:
        return error.errors(include_url=False)
    return [event.model_dump(mode="json", exclude_none=True) for event in events]


@pytest.mark.parametrize("value", VALUES, ids=repr)
@pytest.mark.parametrize("place", ["user_id", "dsid", "variant_ids", "entity_identifiers"])
def test_the_bridges_string_rule_is_the_plain_one_in_every_place(value: Any, place: str) -> None:
    # rest_bridge.models writes the rule as a core schema (for speed); here it is a
    # plain before-validator. Same results, both ways pydantic validates.
    inner = {"variant_ids": [value], "entity_identifiers": {"k": value}}.get(place, value)
    body = [{**EVENT, place: inner}]
    ours: TypeAdapter[Any] = TypeAdapter(list[BridgeEvent])
    theirs: TypeAdapter[Any] = TypeAdapter(list[Event])
    raw = json.dumps(body).encode()  # NaN and the infinities as Python's json writes them
    for json_raw in (None, raw):
        expected = _outcome(theirs, json_raw, body)
        got = _outcome(ours, json_raw, body)
        assert json.dumps(got, default=str) == json.dumps(expected, default=str)


@pytest.fixture(scope="module")
def numeric_key(valkey: Any, settings: Settings) -> str:
    """A key for tenant "1280", which a number names too."""
    return create_key(valkey.url, settings.key_prefix, ["1280"])


@pytest.mark.usefixtures("rdb")
def test_numbers_in_every_string_place_are_queued_as_the_reference_reads_them(
    bridge: str, numeric_key: str, plain: httpx.Client, rdb: redis.Redis, keys: KeySpace
) -> None:
    numbers = [json.loads(number) for number, _ in NUMBERS]
    event: dict[str, Any] = {
        "tenant": 1280,
        "market": 46,
        "type": "page_view",
        **{name: numbers[i % len(numbers)] for i, name in enumerate(OPTIONAL_STRING_FIELDS)},
        "variant_ids": [31415, "31415-red", 2.5],
        "entity_identifiers": {"sku": 31415, "ean": "4006381333931", "weight": 0.25},
    }
    expected = plain.post("/create-events", json=[event])
    assert expected.status_code == 200
    [read] = expected.json()
    assert (read["tenant"], read["market"], read["variant_ids"]) == (
        "1280",
        "46",
        ["31415", "31415-red", "2.5"],
    )
    assert read["entity_identifiers"] == {"sku": "31415", "ean": "4006381333931", "weight": "0.25"}
    answer = httpx.post(
        f"{bridge}/create-events", json=[event], headers={"x-api-key": numeric_key}, timeout=10
    )
    assert answer.status_code == 200, answer.text
    [(_, envelope)] = queued(rdb, keys)
    assert event_to_dict(envelope.event) == read
