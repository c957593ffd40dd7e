"""The v2 rules (Depict's schema for purchases, mappings, unavailable products) as the server
applies them to direct gRPC callers; where Depict's own server is pydantic, the same answers."""

from __future__ import annotations

from typing import Annotated

import pytest
from pydantic import BaseModel, Field, ValidationError

from events_server.pb import events_pb2 as pb
from events_server.wire.track_validation import (
    CURRENCY_PATTERN,
    currency_ok,
    price_number_problem,
    tracked_violations,
)
from events_server.wire.tracked import tracked_to_dict
from events_server.wire.validation import Limits
from tests.harness.data import mapping, product, purchase, text_price, unavailable

LIMITS = Limits(max_events_per_request=5, max_event_bytes=400, max_string_length=50)


def found(event: pb.TrackedEvent, limits: Limits | None = None) -> list[tuple[str, str]]:
    return [(v.field, v.reason) for v in tracked_violations(3, event, limits)]


@pytest.mark.parametrize(
    "event",
    [
        purchase(),
        purchase(text_price("a", ""), product("b", "0", 1), user_id="u", session_id="s"),
        mapping(),
        mapping(dsid=None),  # no user at all: still valid
        unavailable(),
        unavailable(unavailability_type=pb.UNAVAILABILITY_TYPE_MISSING, deduplication_id="r"),
    ],
)
def test_valid_events_of_each_kind_have_no_violations(event: pb.TrackedEvent) -> None:
    assert found(event, LIMITS) == []


def test_every_violation_of_an_event_is_named_from_the_request_down() -> None:
    bad = purchase(
        product(sku="", price="-1", quantity=0),
        text_price("ok", "free"),
        tenant="",
        market="",
        session_id="",
        transaction_id="",
        currency="kronor",
    )
    assert found(bad) == [
        ("events[3].purchase.tenant", "string_too_short"),
        ("events[3].purchase.market", "string_too_short"),
        ("events[3].purchase.session_id", "string_too_short"),
        ("events[3].purchase.transaction_id", "string_too_short"),
        ("events[3].purchase.currency", "string_pattern_mismatch"),
        ("events[3].purchase.products[0].sku", "string_too_short"),
        ("events[3].purchase.products[0].price_number", "greater_than_equal"),
        ("events[3].purchase.products[0].quantity", "greater_than_equal"),
    ]


def test_an_event_of_no_kind_and_unknown_enums_are_named() -> None:
    assert found(pb.TrackedEvent()) == [("events[3].kind", "missing")]
    assert found(unavailable(unavailability_type=0, product_id="")) == [
        ("events[3].product_unavailable.product_id", "string_too_short"),
        ("events[3].product_unavailable.unavailability_type", "missing"),
    ]
    assert found(unavailable(unavailability_type=5)) == [
        ("events[3].product_unavailable.unavailability_type", "enum")
    ]


def test_the_size_limits_reach_into_products() -> None:
    long = "x" * 51
    assert found(purchase(product(), product(sku=long)), LIMITS) == [
        ("events[3].purchase.products[1].sku", "string_too_long")
    ]
    assert found(purchase(text_price("a", long)), LIMITS) == [
        ("events[3].purchase.products[0].price_text", "string_too_long")
    ]
    assert found(mapping(transaction_id=long), LIMITS) == [
        ("events[3].transaction_mapping.transaction_id", "string_too_long")
    ]
    many = purchase(*(product(sku=f"sku-{n}" * 5) for n in range(12)))
    assert found(many, LIMITS) == [("events[3]", "event_too_large")]
    assert found(many) == []  # without limits, only the schema's rules


# --- the currency pattern, as published ------------------------------------------------


class Currency(BaseModel):
    """Depict's field as pydantic (so FastAPI, so Depict's own server) checks it."""

    currency: Annotated[str, Field(pattern=CURRENCY_PATTERN)]


CURRENCIES = [
    "SEK",
    "EUR",
    "sek",
    "",
    "SE",
    "xxSEKxx",  # a middle alternative is anchored nowhere
    "AEDxx",  # ^AED binds the start only
    "xAED",
    "xZWD",  # ZWD$ binds the end only
    "ZWDx",
    "ZWD\n",  # Python's $ would match before the newline; JSON Schema's does not
    "AED\n",
    "\nZWD",
    "kronor",
    "SEKSEK",
    "S\u0415K",  # a Cyrillic E
]


@pytest.mark.parametrize("currency", CURRENCIES, ids=repr)
def test_the_currency_pattern_answers_as_pydantic_does(currency: str) -> None:
    try:
        Currency(currency=currency)
        admitted = True
    except ValidationError:
        admitted = False
    assert currency_ok(currency) is admitted


def test_the_pattern_is_searched_as_published() -> None:
    assert [c for c in CURRENCIES if currency_ok(c)] == [
        "SEK",
        "EUR",
        "xxSEKxx",
        "AEDxx",
        "xZWD",
        "AED\n",
        "\nZWD",
        "SEKSEK",
    ]


# --- prices ----------------------------------------------------------------------------


class Price(BaseModel):
    price: Annotated[float, Field(ge=0)] | str


NUMBERS = ["0", "89.9", "100", "1e3", "1E+3", "2.5e-3", "0.0", "-0", "-0.0", "-1e-400", "1e400"]
NOT_NUMBERS = ["", "01", "1.", ".5", "+1", "0x10", "NaN", "Infinity", " 1", "1 ", "1,5", "\u0661"]


@pytest.mark.parametrize("text", NUMBERS)
def test_a_json_number_of_value_0_or_more_is_a_price_as_pydantic_takes_it(text: str) -> None:
    assert price_number_problem(text) is None
    Price.model_validate_json(f'{{"price": {text}}}')  # Depict's own server admits it too


@pytest.mark.parametrize("text", ["-0.01", "-1", "-1e-3", "-100.5"])
def test_a_negative_number_is_refused_as_pydantic_refuses_it(text: str) -> None:
    assert price_number_problem(text) is not None
    assert price_number_problem(text)[0] == "greater_than_equal"  # type: ignore[index]
    with pytest.raises(ValidationError):
        Price.model_validate_json(f'{{"price": {text}}}')


@pytest.mark.parametrize("text", NOT_NUMBERS, ids=repr)
def test_what_is_no_json_numbers_text_is_refused(text: str) -> None:
    assert price_number_problem(text) is not None
    assert price_number_problem(text)[0] == "float_parsing"  # type: ignore[index]


# --- JSON form ---------------------------------------------------------------------------


def test_each_kind_renders_as_json_with_prices_as_sent() -> None:
    event = purchase(text_price("a", "19,50 kr"), product("b", "89.90000000000000000001", 2))
    assert tracked_to_dict(event)["purchase"]["products"] == [
        {"sku": "a", "price_text": "19,50 kr", "quantity": 1},
        {"sku": "b", "price_number": "89.90000000000000000001", "quantity": 2},
    ]
    assert tracked_to_dict(unavailable(unavailability_type=7, user_id=None)) == {
        "product_unavailable": {
            "tenant": "shop-a",
            "market": "se",
            "dsid": "3n0kq7c1x9s",
            "product_id": "p-17",
            "unavailability_type": 7,  # a number this version has no name for, as it is
        }
    }
    assert tracked_to_dict(pb.TrackedEvent()) == {}
