"""The contract's ``Event`` as a pydantic model: the JSON shape the bridge accepts."""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field


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


def _all_of_ref(schema: dict[str, Any]) -> None:
    # The contract wraps the enum reference as `allOf: [$ref]` (older pydantic's
    # output); current pydantic puts `$ref` beside `description`.
    schema["allOf"] = [{"$ref": schema.pop("$ref")}]


# One shopping event, as sent by storefronts. (No docstring: it would become the
# schema's description, which the contract does not have.)
class Event(BaseModel):
    model_config = ConfigDict(extra="forbid", title="Event")

    tenant: str = Field(description="Identifier associated with the API integration")
    market: str = Field(description="Market identifier")
    deduplication_id: str | None = Field(
        None,
        description="If retrying creating events, this should be set to a unique value common"
        " across all requests with the same event",
    )
    type: EEventType = Field(description="Type of event", json_schema_extra=_all_of_ref)
    user_id: str | None = Field(None, description="Customer identifier")
    session_id: str | None = Field(None, description="Session identifier")
    dsid: Annotated[str, Field(min_length=1)] | None = Field(
        None,
        description="Populated for integrations performed by Depict.ai only. Depict.ai Session Id",
    )
    ab_test_group: str | None = Field(None, description="A/B test group identifier. Not required.")
    product_id: str | None = Field(None, description="Main product identifier")
    variant_ids: list[str] | None = Field(
        None, description="Identifiers of variants for this product. Not required."
    )
    entity_identifiers: dict[str, str] | None = Field(
        None, description="Key-value object containing additional identifiers for the product"
    )
    url: str | None = Field(
        None, description="The value of `document.location.href` in the user's browser"
    )
    entity_price: str | None = Field(None, description="Current price of product. Not required.")
    currency: str | None = Field(
        None, description="Currency of product (ISO 4217 code). Not required."
    )
    document_referrer: str | None = Field(
        None, description="The value of `document.referrer` in the user's browser"
    )
    document_width: str | None = Field(
        None, description="The value of `document.width` in the user's browser"
    )
    attribution_id: str | None = Field(
        None, description="Keyword specifying what led to this event. Not required."
    )
    recommendation_id: str | None = Field(
        None, description="Unique identifier returned from the `/recommend` endpoint"
    )
    search_result_id: str | None = Field(
        None, description="Unique identifier of the search result."
    )
    product_listing_result_id: str | None = Field(
        None, description="Unique identifier of the product listing result."
    )
    click_location: str | None = Field(
        None, description="Keyword specifying what element was clicked. Not required."
    )
    page_url: str | None = Field(None, description="The URL of the product page visited")
    recommendation_type: str | None = Field(
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
