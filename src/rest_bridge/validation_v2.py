"""Depict's v2 request body (``TrackV2Request``) validated as FastAPI validates it, then the
TrackRequest the server takes.

As for v1 (rest_bridge.validation): the stdlib parser FastAPI uses, then the model on its
Python values (``validate_python(from_attributes=True)``, FastAPI's call), so a 422 is
FastAPI's, union errors included (pydantic names the anyOf member in ``loc``). Before
the model: the events counted (more than ``max_events_per_request``: refused whole) and
the nesting bounded; NaN and the infinities refused (not JSON, though the stdlib parser
takes them). After it, what FastAPI would take and protobuf cannot hold: a quantity past
uint64. (A lone surrogate, "\\ud800", is refused by pydantic itself, ``string_unicode``;
unlike FastAPI, whose JSON answer cannot hold it, the bridge's 422 writes it escaped.)

Each price goes on as sent: a JSON string verbatim, a JSON number as its text in the
body (a second parse keeps every number's text), never rounded through a float.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import TypeAdapter, ValidationError
from pydantic_core import ErrorDetails

from events_server.pb import events_pb2 as pb
from events_server.wire.rejected import tenants_of
from rest_bridge.errors import (
    MAX_LISTED_ERRORS,
    body_errors,
    missing_body,
    unprocessable,
    validation_detail,
)
from rest_bridge.fastpath import quick_track
from rest_bridge.jsonbody import nests_deeper, parse_json, too_deep, too_many_events
from rest_bridge.models_v2 import (
    EUnavailabilityType,
    ProductUnavailableEvent,
    PurchasedProduct,
    PurchaseEvent,
    TrackV2Request,
    UserTransactionMappingEvent,
)
from rest_bridge.responses import Reply

TRACK: TypeAdapter[TrackV2Request] = TypeAdapter(TrackV2Request)
_PRODUCTS: TypeAdapter[list[PurchasedProduct]] = TypeAdapter(list[PurchasedProduct])
_KNOWN = {
    "request": frozenset(TrackV2Request.model_fields),
    "event": frozenset().union(
        UserTransactionMappingEvent.model_fields,
        PurchaseEvent.model_fields,
        ProductUnavailableEvent.model_fields,
    ),
    "product": frozenset(PurchasedProduct.model_fields),
}

V2_JSON_DEPTH = 5
"""How deep a valid body nests (the request, its events, an event, its products, a product):
the depth bound is at least this, whatever max_json_depth says (v1 bodies nest 3 deep)."""

MAX_QUANTITY = 2**64 - 1  # protobuf's uint64

UNAVAILABILITY = {
    EUnavailabilityType.out_of_stock: pb.UNAVAILABILITY_TYPE_OUT_OF_STOCK,
    EUnavailabilityType.missing: pb.UNAVAILABILITY_TYPE_MISSING,
}


class NumberText(str):
    """A JSON number, as its text in the body ("89.9", "1e3", "-0")."""

    __slots__ = ()


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _known_and(item: dict[Any, Any], known: frozenset[str], need: int) -> dict[Any, Any]:
    """``item`` with its first ``need`` unknown keys only: pydantic lists a model's unknown
    keys after its fields' errors, in the input's order, so the first errors stay the same."""
    unknown = 0
    kept = {}
    for key, value in item.items():
        if key not in known:
            unknown += 1
            if unknown > need:
                continue
        kept[key] = value
    return kept


def _prefix_with_errors(value: list[Any], need: int) -> list[Any]:
    """The shortest prefix of products ``value`` (tried in growing sizes) holding ``need``
    errors, else all of it."""
    size = need
    while size < len(value):
        try:
            _PRODUCTS.validate_python(value[:size], from_attributes=True)
        except ValidationError as error:
            if error.error_count() >= need:
                break
        size *= 4
    return value[:size]


def _cut_event(event: Any, need: int) -> Any:
    if not isinstance(event, dict):
        return event
    cut = _known_and(event, _KNOWN["event"], need)
    products = cut.get("products")
    if isinstance(products, list):
        if len(products) > need:
            products = _prefix_with_errors(products, need)
        cut["products"] = [
            _known_and(p, _KNOWN["product"], need) if isinstance(p, dict) else p for p in products
        ]
    return cut


def _first_errors(value: dict[Any, Any], need: int) -> list[ErrorDetails]:
    """The first ``need`` errors of body ``value`` as pydantic lists them, without building
    the others (a purchase of 300,000 empty products has 900,000: their dicts take seconds).

    Validated is a copy cut where only errors past the first ``need`` of their event (or of
    the request) could be: unknown keys past ``need`` of each object, products past a prefix
    holding ``need`` errors. What differs are echoes of the cut objects and lists as
    ``input``, which a 422 that lists only some errors leaves out anyway.
    """
    cut = _known_and(value, _KNOWN["request"], need)
    if isinstance(events := cut.get("events"), list):
        cut["events"] = [_cut_event(event, need) for event in events]
    try:
        TRACK.validate_python(cut, from_attributes=True)
    except ValidationError as error:
        return error.errors(include_url=False)[:need]
    return []  # (a cut of an invalid body is invalid: not reached)


def _refusal(value: Any, error: ValidationError) -> Reply:
    """FastAPI's 422 for ``error``, listing at most MAX_LISTED_ERRORS errors."""
    count = error.error_count()
    if count <= MAX_LISTED_ERRORS or not isinstance(value, dict):
        return unprocessable(body_errors(error))
    listed = _first_errors(value, MAX_LISTED_ERRORS)
    return unprocessable([{**e, "loc": ["body", *e["loc"]]} for e in listed], count - len(listed))


def _price(product: pb.PurchasedProduct, raw: Any, validated: float | str) -> None:
    if isinstance(raw, NumberText):
        product.price_number = str(raw)
    elif isinstance(raw, str):
        product.price_text = raw
    else:  # what pydantic takes as a number besides JSON numbers (true): its value
        product.price_number = repr(validated)


def _ids(event: Any) -> dict[str, str]:
    return {
        name: value
        for name in ("user_id", "session_id", "dsid")
        if (value := getattr(event, name)) is not None
    }


def _tracked(
    event: Any, raw: dict[str, Any], tenant: str, market: str
) -> pb.TrackedEvent | list[str | int]:
    """One validated event as protobuf, or where in ``raw``'s products a quantity is too large."""
    common = {"tenant": tenant, "market": market, **_ids(event)}
    if isinstance(event, PurchaseEvent):
        products = []
        for index, (item, sent) in enumerate(zip(event.products, raw["products"], strict=True)):
            if item.quantity > MAX_QUANTITY:
                return ["products", index, "quantity"]
            product = pb.PurchasedProduct(sku=item.sku, quantity=item.quantity)
            _price(product, sent["price"], item.price)
            products.append(product)
        return pb.TrackedEvent(
            purchase=pb.Purchase(
                **common,
                transaction_id=event.transaction_id,
                currency=event.currency,
                products=products,
            )
        )
    if isinstance(event, UserTransactionMappingEvent):
        return pb.TrackedEvent(
            transaction_mapping=pb.TransactionMapping(**common, transaction_id=event.transaction_id)
        )
    assert isinstance(event, ProductUnavailableEvent)
    return pb.TrackedEvent(
        product_unavailable=pb.ProductUnavailable(
            **common,
            product_id=event.product_id,
            unavailability_type=UNAVAILABILITY[event.unavailability_type],
        )
    )


def _as_protobuf(request: TrackV2Request, raw: dict[str, Any]) -> pb.TrackRequest | Reply:
    events = []
    for index, (event, sent) in enumerate(zip(request.events, raw["events"], strict=True)):
        tracked = _tracked(event, sent, request.tenant, request.market)
        if isinstance(tracked, list):
            return unprocessable(
                [
                    {
                        **validation_detail(
                            ["body", "events", index, *tracked],
                            f"Input should be less than or equal to {MAX_QUANTITY}",
                            "less_than_equal",
                        ),
                        "ctx": {"le": MAX_QUANTITY},
                    }
                ]
            )
        events.append(tracked)
    return pb.TrackRequest(events=events)


def validate_track_body(
    body: bytes, max_depth: int, max_events: int
) -> tuple[pb.TrackRequest | Reply, list[str]]:
    """A JSON request body as a TrackRequest, or its 422 Reply; and the tenant it names."""
    if not body:
        return unprocessable(missing_body()), []
    depth = max(max_depth, V2_JSON_DEPTH)
    value = parse_json(body, depth, parse_constant=_not_json)
    if isinstance(value, Reply):
        return value, []
    tenants = tenants_of([value.get("tenant")]) if isinstance(value, dict) else []
    events = value.get("events") if isinstance(value, dict) else None
    if isinstance(events, list) and len(events) > max_events:
        return too_many_events(len(events), max_events, ("body", "events")), tenants
    if nests_deeper(value, depth):
        return too_deep(depth), tenants
    try:
        request = TRACK.validate_python(value, from_attributes=True)
    except ValidationError as error:
        return _refusal(value, error), tenants
    # The same JSON again, every number kept as its text: the prices as sent.
    raw = json.loads(body, parse_float=NumberText, parse_int=NumberText)
    return _as_protobuf(request, raw), tenants


def validate_track(body: bytes, max_depth: int, max_events: int) -> pb.TrackRequest | Reply:
    """validate_track_body on the event loop (the tenants are read from a refused body later);
    a body clearly valid takes one quick pass (rest_bridge.fastpath) instead."""
    if (request := quick_track(body, max_events)) is not None:
        return request
    return validate_track_body(body, max_depth, max_events)[0]


def track_in_worker(
    body: bytes, max_depth: int, max_events: int
) -> bytes | tuple[Reply, list[str]]:
    """In a worker process: the serialized TrackRequest, or the refusal and its tenants."""
    result, tenants = validate_track_body(body, max_depth, max_events)
    if isinstance(result, Reply):
        return result, tenants
    return result.SerializeToString()
