"""The contract's ``Event`` as a pydantic model: the JSON shape the bridge accepts."""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, GetCoreSchemaHandler, GetJsonSchemaHandler
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema
from pydantic_core import core_schema as cs


# The contract's event types, named as in the contract (a docstring would leak
# into the schema as a description).
class EEventType(StrEnum):
    page_view = "page_view"
    click = "click"
    add_to_cart = "add_to_cart"
    purchase = "purchase"
    element_visible = "element_visible"
    ws_click = "ws_click"
    recommendations_inserted = "recommendations_inserted"


class Text:
    """A string of the contract: a JSON string, or a JSON number kept as its text.

    Depict's client sends ``document_width: window.innerWidth`` (``1280``) and
    integrations send ``entity_price: 99.5``: they are kept as ``"1280"`` and
    ``"99.5"``. Booleans are no numbers here, nor are NaN and the infinities (not
    JSON; JSON.stringify writes null): they, arrays, objects and a null where none is
    allowed still get the plain string's 422 (``string_type``, "Input should be a
    valid string"), so a 422 is exactly the one of a plain ``str`` field that takes
    numbers.

    An integer comes back digit for digit, however long (Python's ints are exact;
    JSON has no leading zeros; only ``-0`` comes back as ``"0"``). A float comes back
    as Python's repr, the shortest text that reads back as the same double: the text
    JSON.stringify and Python's json module write for the values browsers send
    (integers are integers; decimals such as ``99.5``). Where they part:

    - under 1e-4, JavaScript writes ``0.00001`` and ``1e-7``, repr ``1e-05`` and
      ``1e-07``;
    - from 1e16, repr writes exponents (``1e+16``), but a browser writes such values
      as integers (above) up to 1e21, and from there as repr does (``1e+21``);
    - other encoders' exponent forms come back as repr's (``1E3`` -> ``1000.0``), and
      a float without fraction keeps its ``.0`` (``100.0``, as Python clients send it).

    pydantic's JSON parser and the stdlib's (rest_bridge.validation uses both) give the
    same int or float, so the text never depends on the path. (pydantic's own
    ``coerce_numbers_to_str`` does not: in JSON mode it writes floats with Rust's
    formatting, ``1.0`` -> ``"1"``; and it takes NaN, as ``"NaN"``.)

    It is a core schema rather than a before-validator so that strings, nearly every
    value, never leave pydantic's Rust code (a Python call per string made validating
    100 events about a third slower); the schema is the contract's plain
    ``type: string``.
    """

    def __init__(self, min_length: int | None = None) -> None:
        self._min_length = min_length

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> CoreSchema:
        text = cs.union_schema(
            [
                cs.str_schema(),
                cs.no_info_after_validator_function(str, cs.int_schema(strict=True)),
                cs.no_info_after_validator_function(
                    repr, cs.float_schema(strict=True, allow_inf_nan=False)
                ),
            ],
            mode="left_to_right",
            # Not "matches no member of the union": what a plain str field says.
            custom_error_type="string_type",
        )
        if self._min_length is None:
            return text
        # Checked on the text, so that "" gets the plain string's string_too_short.
        return cs.chain_schema([text, cs.str_schema(min_length=self._min_length)])

    def __get_pydantic_json_schema__(
        self, schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        return handler(cs.str_schema(min_length=self._min_length))


String = Annotated[str, Text()]


def _all_of_ref(schema: dict[str, Any]) -> None:
    # The contract wraps the enum reference as `allOf: [$ref]` (older pydantic's
    # output); current pydantic puts `$ref` beside `description`.
    schema["allOf"] = [{"$ref": schema.pop("$ref")}]


# One shopping event, as sent by storefronts. (No docstring: it would become the
# schema's description, which the contract does not have.)
class Event(BaseModel):
    model_config = ConfigDict(extra="forbid", title="Event")

    tenant: String = Field(description="Identifier associated with the API integration")
    market: String = Field(description="Market identifier")
    deduplication_id: String | None = Field(
        None,
        description="If retrying creating events, this should be set to a unique value common"
        " across all requests with the same event",
    )
    type: EEventType = Field(description="Type of event", json_schema_extra=_all_of_ref)
    user_id: String | None = Field(None, description="Customer identifier")
    session_id: String | None = Field(None, description="Session identifier")
    dsid: Annotated[str, Text(min_length=1)] | None = Field(
        None,
        description="Populated for integrations performed by Depict.ai only. Depict.ai Session Id",
    )
    ab_test_group: String | None = Field(
        None, description="A/B test group identifier. Not required."
    )
    product_id: String | None = Field(None, description="Main product identifier")
    variant_ids: list[String] | None = Field(
        None, description="Identifiers of variants for this product. Not required."
    )
    entity_identifiers: dict[str, String] | None = Field(
        None, description="Key-value object containing additional identifiers for the product"
    )
    url: String | None = Field(
        None, description="The value of `document.location.href` in the user's browser"
    )
    entity_price: String | None = Field(None, description="Current price of product. Not required.")
    currency: String | None = Field(
        None, description="Currency of product (ISO 4217 code). Not required."
    )
    document_referrer: String | None = Field(
        None, description="The value of `document.referrer` in the user's browser"
    )
    document_width: String | None = Field(
        None, description="The value of `document.width` in the user's browser"
    )
    attribution_id: String | None = Field(
        None, description="Keyword specifying what led to this event. Not required."
    )
    recommendation_id: String | None = Field(
        None, description="Unique identifier returned from the `/recommend` endpoint"
    )
    search_result_id: String | None = Field(
        None, description="Unique identifier of the search result."
    )
    product_listing_result_id: String | None = Field(
        None, description="Unique identifier of the product listing result."
    )
    click_location: String | None = Field(
        None, description="Keyword specifying what element was clicked. Not required."
    )
    page_url: String | None = Field(None, description="The URL of the product page visited")
    recommendation_type: String | None = Field(
        None, description="The type of recommendations inserted"
    )


def _encodable(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def unencodable_locations(events: Sequence[Event]) -> list[list[str | int]]:
    """Where the events hold lone surrogates (JSON allows "\\ud800"; UTF-8 and protobuf do not)."""
    found: list[list[str | int]] = []
    for index, event in enumerate(events):
        for name, value in vars(event).items():
            if isinstance(value, str) and not _encodable(value):
                found.append(["body", index, name])
            elif isinstance(value, list):
                found.extend(
                    ["body", index, name, i] for i, item in enumerate(value) if not _encodable(item)
                )
            elif isinstance(value, dict):
                found.extend(
                    # The key goes into the 422 body, so it must be encodable itself.
                    ["body", index, name, key.encode("utf-8", "backslashreplace").decode()]
                    for key, item in value.items()
                    if not (_encodable(key) and _encodable(item))
                )
    return found
