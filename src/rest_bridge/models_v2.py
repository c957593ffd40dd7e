"""Depict's v2 ``TrackV2Request`` as pydantic models: the JSON of POST /v2/create-events and
POST /v2/track (contract/create-events-v2.openapi.yaml, Depict's own published spec).

Written as the spec says, with none of the v1 contract's leniency (rest_bridge.models takes
numbers for strings): only ``price`` is ``number | string``. The classes have no docstrings
and the enum no members' comments: either would become a schema description the spec lacks.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema

# The currency pattern exactly as published: its `^` binds only the first alternative and
# its `$` the last, so "xSEKx" matches (by "SEK") and "AED-1" too. Taken as it is.
CURRENCY_PATTERN = (
    "^AED|AFN|ALL|AMD|ANG|AOA|ARS|AUD|AWG|AZN|BAM|BBD|BDT|BGN|BHD|BIF|BMD|BND|BOB|BRL|BSD|BTN|"
    "BWP|BYR|BZD|CAD|CDF|CHF|CLP|CNY|COP|CRC|CUC|CUP|CVE|CZK|DJF|DKK|DOP|DZD|EGP|ERN|ETB|EUR|FJD|"
    "FKP|GBP|GEL|GGP|GHS|GIP|GMD|GNF|GTQ|GYD|HKD|HNL|HRK|HTG|HUF|IDR|ILS|IMP|INR|IQD|IRR|ISK|JEP|"
    "JMD|JOD|JPY|KES|KGS|KHR|KMF|KPW|KRW|KWD|KYD|KZT|LAK|LBP|LKR|LRD|LSL|LYD|MAD|MDL|MGA|MKD|MMK|"
    "MNT|MOP|MRO|MUR|MVR|MWK|MXN|MYR|MZN|NAD|NGN|NIO|NOK|NPR|NZD|OMR|PAB|PEN|PGK|PHP|PKR|PLN|PYG|"
    "QAR|RON|RSD|RUB|RWF|SAR|SBD|SCR|SDG|SEK|SGD|SHP|SLL|SOS|SPL|SRD|STD|SVC|SYP|SZL|THB|TJS|TMT|"
    "TND|TOP|TRY|TTD|TVD|TWD|TZS|UAH|UGX|USD|UYU|UZS|VEF|VND|VUV|WST|XAF|XCD|XDR|XOF|XPF|YER|ZAR|"
    "ZMW|ZWD$"
)

NonEmpty = Annotated[str, Field(min_length=1)]


# The spec's `const`s have no `type: string` beside them, which pydantic's schema would add.
MappingType = Annotated[
    Literal["transaction_mapping"], WithJsonSchema({"const": "transaction_mapping"})
]
PurchaseType = Annotated[Literal["purchase"], WithJsonSchema({"const": "purchase"})]
UnavailableType = Annotated[
    Literal["product_unavailable"], WithJsonSchema({"const": "product_unavailable"})
]


class EUnavailabilityType(StrEnum):
    out_of_stock = "out_of_stock"
    missing = "missing"


def _all_of_ref(schema: dict[str, Any]) -> None:
    # The spec wraps the enum reference as `allOf: [$ref]` (older pydantic's output).
    schema["allOf"] = [{"$ref": schema.pop("$ref")}]


_USER_ID = "User Id. Persistent between devices, typically on a logged in user."
_SESSION_ID = "Session Id. Unique to a browser/app and stored locally, e.g. cookie or localStorage."
_DSID = "Populated for integrations performed by Depict.ai only. Depict.ai Session Id."
_TRANSACTION_ID = "Unique identifier for the transaction."


class _Identified(BaseModel):
    # (The spec's three event schemas each start with these three fields.)
    model_config = ConfigDict(extra="forbid")

    user_id: NonEmpty | None = Field(None, description=_USER_ID)
    session_id: NonEmpty | None = Field(None, description=_SESSION_ID)
    dsid: NonEmpty | None = Field(None, description=_DSID)


class UserTransactionMappingEvent(_Identified):
    model_config = ConfigDict(title="UserTransactionMappingEvent")

    transaction_id: NonEmpty = Field(description=_TRANSACTION_ID)
    event_type: MappingType | None = Field(
        None, description="The type identifier for this event: transaction_mapping."
    )


class PurchasedProduct(BaseModel):
    model_config = ConfigDict(extra="forbid", title="PurchasedProduct")

    sku: NonEmpty = Field(
        description="Stock keeping unit, a distinct item for sale. If you are using Google"
        " Analytics, it should be the same id used for products there."
    )
    price: Annotated[float, Field(ge=0.0)] | str = Field(
        description="Price per unit. If there are discounts because of quantity, the unit price"
        " should be adjusted accordingly."
    )
    quantity: int = Field(ge=1.0, description="The number of times the product was purchased.")


class PurchaseEvent(_Identified):
    model_config = ConfigDict(title="PurchaseEvent")

    transaction_id: NonEmpty = Field(description=_TRANSACTION_ID)
    event_type: PurchaseType | None = Field(
        None, description="The type identifier for this event: purchase."
    )
    currency: str = Field(pattern=CURRENCY_PATTERN, description="Currency the purchase was paid in")
    products: list[PurchasedProduct] = Field(
        min_length=1, description="All the products purchased in this transaction"
    )


class ProductUnavailableEvent(_Identified):
    model_config = ConfigDict(title="ProductUnavailableEvent")

    event_type: UnavailableType = Field(
        description="The type identifier for this event: product_unavailable."
    )
    product_id: NonEmpty = Field(description="Main product identifier")
    unavailability_type: EUnavailabilityType = Field(
        description="Reason the product isn't available for purchase",
        json_schema_extra=_all_of_ref,
    )


TrackedItem = UserTransactionMappingEvent | PurchaseEvent | ProductUnavailableEvent
"""One event: the spec's anyOf, no discriminator, in the spec's order."""


class TrackV2Request(BaseModel):
    model_config = ConfigDict(extra="forbid", title="TrackV2Request")

    tenant: NonEmpty = Field(description="Identifier associated with the API integration")
    market: NonEmpty = Field(description="Market identifier")
    events: list[TrackedItem]
