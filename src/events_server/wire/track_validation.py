"""The rules every v2 event (a purchase, transaction mapping or unavailable product) must
pass, for the REST bridge and direct gRPC callers alike: Depict's published schema
(``TrackV2Request`` in create-events-v2.openapi.yaml), plus the size limits every event has
(``validation.Limits``).

Reasons are pydantic's error types where the schema has one (``string_too_short``,
``string_pattern_mismatch``, ``too_short``, ``greater_than_equal``, ``float_parsing``), so
a gRPC caller reads what the REST bridge's 422 would say.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from events_server.pb import events_pb2 as pb
from events_server.wire.tracked import KINDS, UNAVAILABILITY_NAMES, USER_FIELDS, TrackedKind
from events_server.wire.validation import Limits, size_violations
from events_server.wire.violations import FieldViolation

CURRENCY_PATTERN = (
    "^AED|AFN|ALL|AMD|ANG|AOA|ARS|AUD|AWG|AZN|BAM|BBD|BDT|BGN|BHD|BIF|BMD|BND|BOB|BRL|BSD|BTN"
    "|BWP|BYR|BZD|CAD|CDF|CHF|CLP|CNY|COP|CRC|CUC|CUP|CVE|CZK|DJF|DKK|DOP|DZD|EGP|ERN|ETB|EUR"
    "|FJD|FKP|GBP|GEL|GGP|GHS|GIP|GMD|GNF|GTQ|GYD|HKD|HNL|HRK|HTG|HUF|IDR|ILS|IMP|INR|IQD|IRR"
    "|ISK|JEP|JMD|JOD|JPY|KES|KGS|KHR|KMF|KPW|KRW|KWD|KYD|KZT|LAK|LBP|LKR|LRD|LSL|LYD|MAD|MDL"
    "|MGA|MKD|MMK|MNT|MOP|MRO|MUR|MVR|MWK|MXN|MYR|MZN|NAD|NGN|NIO|NOK|NPR|NZD|OMR|PAB|PEN|PGK"
    "|PHP|PKR|PLN|PYG|QAR|RON|RSD|RUB|RWF|SAR|SBD|SCR|SDG|SEK|SGD|SHP|SLL|SOS|SPL|SRD|STD|SVC"
    "|SYP|SZL|THB|TJS|TMT|TND|TOP|TRY|TTD|TVD|TWD|TZS|UAH|UGX|USD|UYU|UZS|VEF|VND|VUV|WST|XAF"
    "|XCD|XDR|XOF|XPF|YER|ZAR|ZMW|ZWD$"
)
"""Depict's published ``currency`` pattern, as published: its ``^`` and ``$`` bind only the
first and last alternatives, so ``"SEK"`` anywhere in the string matches (JSON Schema and
pydantic search for a pattern; they do not match it whole)."""

# Searched as JSON Schema (ECMA) and pydantic (Rust regex) search it: their "$" is the end of
# the text, where Python's would also match before a final newline ("ZWD\n").
_CURRENCY = re.compile(CURRENCY_PATTERN.removesuffix("$") + r"\Z")

# RFC 8259's number grammar, ASCII digits only (Python's \d takes any Unicode digit).
_JSON_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")

_SHOWN = 40
"""Characters of a bad value quoted in a description."""


def _shown(value: str) -> str:
    return repr(value if len(value) <= _SHOWN else value[:_SHOWN] + "...")


def currency_ok(currency: str) -> bool:
    """Whether Depict's pattern admits ``currency`` (searched, as published)."""
    return _CURRENCY.search(currency) is not None


def price_number_problem(text: str) -> tuple[str, str] | None:
    """(reason, description) when ``text`` is not a JSON number's text of a value >= 0."""
    if not _JSON_NUMBER.fullmatch(text):
        return "float_parsing", f"price_number {_shown(text)} is not a JSON number's text"
    # Compared as the float Depict's own server (pydantic) compares: "-1e-400" is -0.0 there,
    # and admitted. The text itself is kept, never the float.
    if float(text) < 0:
        return "greater_than_equal", f"price_number {_shown(text)} is below 0"
    return None


def _long_strings(message: Message, path: str, limit: int) -> Iterator[tuple[str, str]]:
    """(field path, what is too long) for each string set in ``message`` (and in its
    sub-messages) that is longer than ``limit``."""
    for field, value in message.ListFields():
        name = f"{path}.{field.name}"
        if field.type == FieldDescriptor.TYPE_STRING:
            for i, text in enumerate(value if field.is_repeated else (value,)):
                if len(text) > limit:
                    where = f"{name}[{i}]" if field.is_repeated else name
                    yield where, f"{where.rpartition('.')[2]} is {len(text)} characters long"
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            for i, sub in enumerate(value if field.is_repeated else (value,)):
                yield from _long_strings(sub, f"{name}[{i}]" if field.is_repeated else name, limit)


def tracked_violations(
    index: int, event: pb.TrackedEvent, limits: Limits | None = None, size: int | None = None
) -> list[FieldViolation]:
    """What is wrong with one v2 event (empty when it is valid); ``limits`` adds the size rules.

    Fields are named from the request down, e.g. ``events[0].purchase.products[1].quantity``.
    ``size`` is the serialized size of the kind's message (what is queued), when the caller
    has it.
    """
    kind = event.WhichOneof("kind")
    if kind is None:
        return [
            FieldViolation(
                f"events[{index}].kind",
                f"an event holds one of {', '.join(KINDS)}; this one holds none",
                "missing",
            )
        ]
    message: TrackedKind = getattr(event, kind)
    path = f"events[{index}].{kind}"
    found = _kind_violations(path, message)
    if limits is None:
        return found
    size = message.ByteSize() if size is None else size
    long_strings = _long_strings(message, path, limits.max_string_length)
    return found + size_violations(index, size, limits, long_strings)


def _kind_violations(path: str, message: TrackedKind) -> list[FieldViolation]:
    """Depict's schema rules for one kind's message at ``path``."""
    found: list[FieldViolation] = []

    def bad(field: str, description: str, reason: str) -> None:
        found.append(FieldViolation(f"{path}.{field}", description, reason))

    def required(name: str, value: str) -> None:
        if not value:
            bad(name, f"{name} must not be empty", "string_too_short")

    required("tenant", message.tenant)
    required("market", message.market)
    for name in USER_FIELDS:
        if message.HasField(name) and not getattr(message, name):  # type: ignore[arg-type]
            bad(name, f"{name} must not be empty when set", "string_too_short")
    if isinstance(message, pb.ProductUnavailable):
        required("product_id", message.product_id)
        if message.unavailability_type == pb.UNAVAILABILITY_TYPE_UNSPECIFIED:
            bad(
                "unavailability_type",
                "unavailability_type is required (UNAVAILABILITY_TYPE_UNSPECIFIED is not one)",
                "missing",
            )
        elif message.unavailability_type not in UNAVAILABILITY_NAMES:
            bad(
                "unavailability_type",
                f"unavailability_type {message.unavailability_type} is not a known"
                " UnavailabilityType",
                "enum",
            )
        return found
    required("transaction_id", message.transaction_id)
    if not isinstance(message, pb.Purchase):
        return found
    if not currency_ok(message.currency):
        bad(
            "currency",
            f"currency {_shown(message.currency)} is not a code Depict's currency pattern admits"
            " (ISO 4217, e.g. SEK)",
            "string_pattern_mismatch",
        )
    if not message.products:
        bad("products", "a purchase lists at least one product", "too_short")
    for j, product in enumerate(message.products):
        where = f"products[{j}]"
        if not product.sku:
            bad(f"{where}.sku", "sku must not be empty", "string_too_short")
        price = product.WhichOneof("price")
        if price is None:
            bad(f"{where}.price", "price is required (price_number or price_text)", "missing")
        elif price == "price_number" and (problem := price_number_problem(product.price_number)):
            reason, description = problem
            bad(f"{where}.price_number", description, reason)
        if product.quantity < 1:
            bad(f"{where}.quantity", "quantity must be at least 1", "greater_than_equal")
    return found
