"""One quick pass for the bodies storefronts send: clearly valid JSON straight to protobuf.

The full validation (rest_bridge.validation, rest_bridge.validation_v2) keeps FastAPI's
observable behaviour: pydantic's models, then FastAPI's exact 422 when a body is refused.
That costs a request ~7 µs (v1, one event) to ~40 µs (v2, one purchase) of which most is
pydantic building model objects the bridge then copies into protobuf. Here a body of the
common shape is checked by hand and built into the protobuf message at once; anything
not clearly valid gives None, and the caller takes the full validation, whose answer
(422s included) is then exactly what it was.

So this accepts a subset of what the models accept, and builds the very messages the full
path builds (tests/unit/test_fastpath.py runs both over the contract tests' bodies and
generated ones). Left to the full path: numbers with a fraction or an exponent in v1's
string fields (their text is the float's repr there), booleans, lone surrogates, unknown
keys, anything past the limits, and every refusal.
"""

from __future__ import annotations

import json
import math
from typing import Any, TypeGuard

import orjson

from events_server.pb import events_pb2 as pb
from events_server.wire.codec import TYPE_VALUES
from rest_bridge.models import Event
from rest_bridge.models_v2 import (
    CURRENCY_PATTERN,
    PurchasedProduct,
    PurchaseEvent,
    UserTransactionMappingEvent,
)

# --- v1: a JSON array of Event ----------------------------------------------------------

_STRING, _DSID, _TYPE, _LIST, _MAP = range(5)
_KINDS = dict.fromkeys(Event.model_fields, _STRING) | {
    "dsid": _DSID,
    "type": _TYPE,
    "variant_ids": _LIST,
    "entity_identifiers": _MAP,
}
_REQUIRED = ("tenant", "market", "type")


def _text(value: Any) -> str | None:
    """A string field's text when it is a string or an integer (as rest_bridge.models.Text
    keeps it; orjson gives an int only for an integer it read exactly), else None."""
    kind = type(value)
    if kind is str:
        return value  # type: ignore[no-any-return]
    if kind is int:
        return str(value)
    return None


def _texts(value: Any) -> list[str] | None:
    if type(value) is not list:
        return None
    if all(type(item) is str for item in value):
        return value
    texts = [_text(item) for item in value]
    return None if None in texts else texts  # type: ignore[return-value]


def _text_map(value: Any) -> dict[str, str] | None:
    if type(value) is not dict:
        return None
    if all(type(item) is str for item in value.values()):
        return value
    texts = {key: _text(item) for key, item in value.items()}
    return None if None in texts.values() else texts  # type: ignore[return-value]


def _field(name: str, kind: int, value: Any) -> Any:
    """What protobuf takes for a field that is not a plain string, or None when the model
    would refuse it."""
    if kind == _TYPE:
        return TYPE_VALUES.get(value) if type(value) is str else None
    if kind == _LIST:
        return _texts(value)
    if kind == _MAP:
        return _text_map(value)
    text = _text(value)
    return None if kind == _DSID and not text else text  # dsid: at least one character


_KNOWN = frozenset(_KINDS)
_NEEDED = frozenset(_REQUIRED)
_PLAIN = frozenset({str, list, dict, type(None)})
"""The types of an event's values that protobuf takes as they are (None: no value), once
the type is a number and the list and the map are checked: strings for every other field
(protobuf refuses a list or a map there, and so does the model)."""


def quick_fields(item: Any) -> dict[str, Any] | None:
    """``item`` (parsed by orjson) as protobuf Event fields when it is clearly a valid Event.

    Fields, not the Event: a request built of them at once (``CreateEventsRequest(events=
    [fields])``) costs less than an Event built and then copied into it. What is left to
    protobuf to refuse (a list or a map in a string field: TypeError) makes the caller
    take the full validation."""
    if type(item) is not dict:
        return None
    keys = item.keys()
    if not keys <= _KNOWN or not keys >= _NEEDED:
        return None  # an unknown field (the model forbids it), or a required one missing
    if not set(map(type, item.values())) <= _PLAIN:
        return _converted(item)  # numbers where the contract has strings: the client's
    kind = item["type"]
    number = TYPE_VALUES.get(kind) if type(kind) is str else None
    if number is None or item["tenant"] is None or item["market"] is None:
        return None
    fields = dict(item)
    fields["type"] = number
    if "dsid" in fields and fields["dsid"] == "":
        return None  # at least one character
    if (ids := fields.get("variant_ids")) is not None and _texts(ids) is not ids:
        return None
    if (identifiers := fields.get("entity_identifiers")) is not None and _text_map(
        identifiers
    ) is not identifiers:
        return None
    return fields


def _converted(item: dict[str, Any]) -> dict[str, Any] | None:
    """``quick_fields`` for an event with values other than strings, lists and maps:
    field by field, each converted as the model converts it."""
    fields = item
    for name, value in item.items():
        kind = _KINDS[name]
        if kind == _STRING and type(value) is str:
            continue  # nearly every field: taken as it is
        if fields is item:
            fields = dict(item)
        if value is None:
            if name in _REQUIRED:
                return None
            del fields[name]  # no value, as the model's None
        elif (taken := _field(name, kind, value)) is None:
            return None
        else:
            fields[name] = taken
    if fields is item or not all(name in fields for name in _REQUIRED):
        return None  # (a type is always converted: no copy, no type)
    return fields


def quick_request(body: bytes, max_events: int | None) -> pb.CreateEventsRequest | None:
    """The CreateEventsRequest of a JSON body that is clearly a valid list of events (at
    most ``max_events``, at least one), else None."""
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if type(value) is not list or not value:
        return None
    if max_events is not None and len(value) > max_events:
        return None
    events = []
    for item in value:
        if (fields := quick_fields(item)) is None:
            return None
        events.append(fields)
    return request_of(events)


def request_of(events: list[dict[str, Any]]) -> pb.CreateEventsRequest | None:
    """The CreateEventsRequest of events' fields from ``quick_fields``; None when protobuf
    refuses one (a list or a map where a string goes: the full path refuses it too)."""
    try:
        # upb takes a message's fields as a dict: typeshed's stubs do not say so.
        return pb.CreateEventsRequest(events=events)  # type: ignore[arg-type]
    except TypeError:
        return None


# --- v2: a TrackV2Request ---------------------------------------------------------------


class _Number(str):
    """A JSON number's text as the body has it (validation_v2 keeps prices so)."""

    __slots__ = ()


class _Integer(_Number):
    __slots__ = ()


def _constant(name: str) -> Any:
    raise ValueError(name)  # NaN, Infinity: not JSON, left to the full path


_CURRENCIES = frozenset(CURRENCY_PATTERN.strip("^$").split("|"))
"""Each code the pattern lists: a currency equal to one matches it, whatever else it does."""

_IDS = ("user_id", "session_id", "dsid")
_MAPPING_KEYS = frozenset(UserTransactionMappingEvent.model_fields)
_PURCHASE_KEYS = frozenset(PurchaseEvent.model_fields)
_PRODUCT_KEYS = frozenset(PurchasedProduct.model_fields)
_UNAVAILABLE_KEYS = frozenset({*_IDS, "event_type", "product_id", "unavailability_type"})
_UNAVAILABILITY = {
    "out_of_stock": pb.UNAVAILABILITY_TYPE_OUT_OF_STOCK,
    "missing": pb.UNAVAILABILITY_TYPE_MISSING,
}
_MAX_QUANTITY = 2**64 - 1


def _non_empty(value: Any) -> TypeGuard[str]:
    return type(value) is str and value != ""


def _common(event: dict[str, Any], tenant: str, market: str) -> dict[str, Any] | None:
    """The fields every kind shares, or None when an id is not a non-empty string."""
    common = {"tenant": tenant, "market": market}
    for name in _IDS:
        value = event.get(name)
        if value is not None:
            if not _non_empty(value):
                return None
            common[name] = value
    return common


def _product(item: Any) -> pb.PurchasedProduct | None:
    if type(item) is not dict or item.keys() != _PRODUCT_KEYS:
        return None
    sku, price, quantity = item["sku"], item["price"], item["quantity"]
    if not _non_empty(sku) or type(quantity) is not _Integer:
        return None
    count = int(quantity)
    if not 1 <= count <= _MAX_QUANTITY:
        return None
    if type(price) is str:
        return pb.PurchasedProduct(sku=sku, quantity=count, price_text=price)
    if isinstance(price, _Number):
        value = float(price)
        if not (math.isfinite(value) and value >= 0):
            return None
        return pb.PurchasedProduct(sku=sku, quantity=count, price_number=str(price))
    return None


def _tracked(event: Any, tenant: str, market: str) -> pb.TrackedEvent | None:
    """One event as the union of the spec would take it, when clearly valid."""
    if type(event) is not dict:
        return None
    kind = event.get("event_type")
    if kind is None:  # the first member it fits, as the union's: never more than one
        kind = "purchase" if "products" in event or "currency" in event else "transaction_mapping"
    common = _common(event, tenant, market)
    if common is None:
        return None
    if kind == "transaction_mapping":
        if not event.keys() <= _MAPPING_KEYS or not _non_empty(tid := event.get("transaction_id")):
            return None
        mapping = pb.TransactionMapping(**common, transaction_id=tid)
        return pb.TrackedEvent(transaction_mapping=mapping)
    if kind == "purchase":
        if not event.keys() <= _PURCHASE_KEYS or not _non_empty(tid := event.get("transaction_id")):
            return None
        currency, items = event.get("currency"), event.get("products")
        if type(currency) is not str or currency not in _CURRENCIES:
            return None
        if type(items) is not list or not items:
            return None
        products = []
        for item in items:
            if (product := _product(item)) is None:
                return None
            products.append(product)
        purchase = pb.Purchase(**common, transaction_id=tid, currency=currency, products=products)
        return pb.TrackedEvent(purchase=purchase)
    if kind == "product_unavailable":
        reason = event.get("unavailability_type")
        if type(reason) is not str or reason not in _UNAVAILABILITY:
            return None
        if not event.keys() <= _UNAVAILABLE_KEYS:
            return None
        if not _non_empty(product_id := event.get("product_id")):
            return None
        unavailable = pb.ProductUnavailable(
            **common, product_id=product_id, unavailability_type=_UNAVAILABILITY[reason]
        )
        return pb.TrackedEvent(product_unavailable=unavailable)
    return None


def quick_track(body: bytes, max_events: int) -> pb.TrackRequest | None:
    """The TrackRequest of a body that is clearly a valid TrackV2Request, else None.

    Read by the stdlib parser, as the full path reads it, every number kept as its text.
    """
    try:
        value = json.loads(body, parse_float=_Number, parse_int=_Integer, parse_constant=_constant)
    except (ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError too
        return None
    if type(value) is not dict or not value.keys() <= {"tenant", "market", "events"}:
        return None
    tenant, market, events = value.get("tenant"), value.get("market"), value.get("events")
    if not _non_empty(tenant) or not _non_empty(market) or type(events) is not list:
        return None
    if len(events) > max_events:
        return None
    tracked = []
    try:
        for event in events:
            if (one := _tracked(event, tenant, market)) is None:
                return None
            tracked.append(one)
    except UnicodeEncodeError:  # a lone surrogate ("\\ud800"), which protobuf refuses
        return None
    return pb.TrackRequest(events=tracked)
