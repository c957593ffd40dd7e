"""rest_bridge.validation_v2: a 422 of many errors lists pydantic's first ones, in its order,
without building the others (bodies cut where only later errors could be)."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from pydantic import ValidationError

from events_server.pb import events_pb2 as pb
from rest_bridge.validation_v2 import TRACK, validate_track_body

PRODUCT = {"sku": "s", "price": 1, "quantity": 1}
UNKNOWN = {f"k{i}": i for i in range(300)}


def _purchase(products: list[Any], **extra: Any) -> dict[str, Any]:
    return {"transaction_id": "T", "currency": "SEK", "products": products, **extra}


def _body(*events: Any, **extra: Any) -> dict[str, Any]:
    return {"tenant": "t", "market": "m", "events": list(events), **extra}


MANY_ERRORS = {
    "empty products": _body(_purchase([{}] * 2000)),
    "valid products, then bad ones": _body(_purchase([PRODUCT] * 300 + [{"sku": ""}] * 300)),
    "valid and bad products in turn": _body(_purchase([PRODUCT, {"quantity": 0}] * 400)),
    "unknown keys in an event": _body({"transaction_id": "T", **UNKNOWN}),
    "unknown keys in a product": _body(_purchase([{**PRODUCT, **UNKNOWN}])),
    "unknown keys in the request": _body(**UNKNOWN),
    "a few errors, then many": _body({"x": 1}, _purchase([{}] * 500), _purchase([{}] * 500)),
}


def _bounded(error: dict[str, Any]) -> dict[str, Any]:
    """An error as a 422 listing only some shows it: no object or list echoed."""
    shown = {k: v for k, v in error.items() if k not in {"url"}}
    if isinstance(shown.get("input"), dict | list):
        del shown["input"]
    return {**shown, "loc": ["body", *error["loc"]]}


@pytest.mark.parametrize("name", list(MANY_ERRORS))
def test_the_first_fifty_errors_are_pydantics_first_fifty(name: str) -> None:
    value = MANY_ERRORS[name]
    with pytest.raises(ValidationError) as raised:
        TRACK.validate_python(value, from_attributes=True)
    every = json.loads(json.dumps(raised.value.errors(include_url=False), default=str))
    assert len(every) > 50
    result, _ = validate_track_body(json.dumps(value).encode(), 16, 500)
    assert not isinstance(result, pb.TrackRequest)
    listed = orjson.loads(result.body)["detail"]
    assert listed[:50] == [_bounded(e) for e in every[:50]]
    assert listed[50]["msg"].startswith(f"{len(every) - 50} more errors not listed")


def test_prices_go_on_as_sent() -> None:
    body = (
        b'{"tenant": "t", "market": "m", "events": [{"transaction_id": "T", "currency": "SEK",'
        b' "products": [{"sku": "a", "price": 89.9, "quantity": 1},'
        b' {"sku": "b", "price": 1e3, "quantity": 2}, {"sku": "c", "price": "19,50 kr",'
        b' "quantity": 3}, {"sku": "d", "price": 100, "quantity": 4},'
        b' {"sku": "e", "price": 0.1000000000000000055511151231257827, "quantity": 5}]}]}'
    )
    result, _ = validate_track_body(body, 16, 500)
    assert isinstance(result, pb.TrackRequest)
    prices = [
        (p.WhichOneof("price"), getattr(p, p.WhichOneof("price") or ""))
        for p in result.events[0].purchase.products
    ]
    assert prices == [
        ("price_number", "89.9"),
        ("price_number", "1e3"),
        ("price_text", "19,50 kr"),
        ("price_number", "100"),
        ("price_number", "0.1000000000000000055511151231257827"),
    ]


def test_the_body_tenant_and_market_go_into_every_event() -> None:
    body = _body(
        {"transaction_id": "T", "dsid": "d"},
        {"event_type": "product_unavailable", "product_id": "p", "unavailability_type": "missing"},
        _purchase([PRODUCT], user_id="u"),
    )
    result, tenants = validate_track_body(json.dumps(body).encode(), 16, 500)
    assert isinstance(result, pb.TrackRequest)
    assert tenants == ["t"]
    kinds = [e.WhichOneof("kind") for e in result.events]
    assert kinds == ["transaction_mapping", "product_unavailable", "purchase"]
    for event in result.events:
        inner = getattr(event, event.WhichOneof("kind") or "")
        assert (inner.tenant, inner.market) == ("t", "m")
    assert result.events[1].product_unavailable.unavailability_type == (
        pb.UNAVAILABILITY_TYPE_MISSING
    )
    assert result.events[2].purchase.user_id == "u"
    assert not result.events[2].purchase.HasField("dsid")
