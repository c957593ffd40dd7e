"""Depict's v2 kinds (purchase, transaction mapping, product unavailable): their names, where
each sits in an Envelope, and their JSON form for people and JSONL sinks.

A kind's name is its field name in ``TrackedEvent.kind`` and ``Envelope.tracked`` alike.

Prices are rendered as sent and never through a float: ``price_text`` (a JSON string the
client sent) and ``price_number`` (the exact text of a JSON number it sent) both come out
as JSON strings under their own names, so that a reader knows which the client sent and
no JSON reader rounds ``"89.90000000000000000001"``.
"""

from __future__ import annotations

from typing import Any, Final

from events_server.pb import events_pb2 as pb

PURCHASE: Final = "purchase"
TRANSACTION_MAPPING: Final = "transaction_mapping"
PRODUCT_UNAVAILABLE: Final = "product_unavailable"
KINDS = (PURCHASE, TRANSACTION_MAPPING, PRODUCT_UNAVAILABLE)
"""Every v2 kind, in field order."""

EVENT: Final = "event"
"""What a CreateEvents envelope holds (its ``event`` field), beside the v2 kinds."""

TrackedKind = pb.Purchase | pb.TransactionMapping | pb.ProductUnavailable
"""The message of one v2 kind."""

UNAVAILABILITY_NAMES: dict[int, str] = {
    pb.UNAVAILABILITY_TYPE_OUT_OF_STOCK: "out_of_stock",
    pb.UNAVAILABILITY_TYPE_MISSING: "missing",
}
"""Depict's name of every valid UnavailabilityType (UNSPECIFIED is deliberately absent)."""

UNAVAILABILITY_VALUES: dict[str, pb.UnavailabilityType.ValueType] = {
    name: pb.UnavailabilityType.ValueType(number) for number, name in UNAVAILABILITY_NAMES.items()
}

ENVELOPE_FIELDS: dict[str, int] = {
    kind: pb.Envelope.DESCRIPTOR.fields_by_name[kind].number for kind in KINDS
}
"""The Envelope field number that holds each kind."""

USER_FIELDS = ("user_id", "session_id", "dsid")
"""Who the event is about, as every kind names it (each optional)."""


def kind_of(tracked: pb.TrackedEvent) -> str | None:
    """The kind a TrackedEvent holds (None: none is set)."""
    return tracked.WhichOneof("kind")


def message_of(tracked: pb.TrackedEvent) -> TrackedKind | None:
    """The message of the kind a TrackedEvent holds (None: none is set)."""
    kind = tracked.WhichOneof("kind")
    if kind is None:
        return None
    message: TrackedKind = getattr(tracked, kind)
    return message


def envelope_kind(envelope: pb.Envelope) -> str:
    """What an envelope holds: ``event`` (a CreateEvents event) or a v2 kind."""
    return envelope.WhichOneof("tracked") or EVENT


def tracked(kind: str, message: TrackedKind) -> pb.TrackedEvent:
    """A TrackedEvent holding ``message`` (of ``kind``), copied."""
    event = pb.TrackedEvent()
    getattr(event, kind).CopyFrom(message)
    return event


def product_to_dict(product: pb.PurchasedProduct) -> dict[str, Any]:
    """One purchased product as JSON; its price under the name of the form it was sent in."""
    out: dict[str, Any] = {"sku": product.sku}
    if (price := product.WhichOneof("price")) is not None:
        out[price] = getattr(product, price)
    out["quantity"] = product.quantity
    return out


def kind_to_dict(message: TrackedKind) -> dict[str, Any]:
    """One v2 kind's message as JSON: fields with no value are left out."""
    out: dict[str, Any] = {"tenant": message.tenant, "market": message.market}
    for name in USER_FIELDS:
        if message.HasField(name):  # type: ignore[arg-type]
            out[name] = getattr(message, name)
    if isinstance(message, pb.ProductUnavailable):
        out["product_id"] = message.product_id
        out["unavailability_type"] = UNAVAILABILITY_NAMES.get(
            message.unavailability_type, message.unavailability_type
        )
        if message.HasField("deduplication_id"):
            out["deduplication_id"] = message.deduplication_id
        return out
    out["transaction_id"] = message.transaction_id
    if isinstance(message, pb.Purchase):
        out["currency"] = message.currency
        out["products"] = [product_to_dict(product) for product in message.products]
    return out


def tracked_to_dict(event: pb.TrackedEvent) -> dict[str, Any]:
    """A TrackedEvent as JSON: ``{kind: {...}}`` (``{}`` when no kind is set)."""
    kind = event.WhichOneof("kind")
    if kind is None:
        return {}
    return {kind: kind_to_dict(getattr(event, kind))}
