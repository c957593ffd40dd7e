"""Test data: the tenants, valid events (protobuf and JSON), the contract's examples, sizes."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from events_server.pb import events_pb2 as pb
from events_server.wire.codec import varint

TEST_TENANTS = (
    "t", "t0", "t1", "t2", "my_store", "shop_eu", "shop_us", "outlet", "mp", "workers",
    "first", "second", "third", *(f"shop-{c}" for c in "abcdfghorx"), "shop-1x", "shop-dl",
    "shop-t1", "shop-t2",
    "shop-big", "shop-hung", "shop-cap", "shop-last", "shop-r", *(f"shop-{n}" for n in range(10)),
    *(f"shop-r{n}" for n in range(10)), *(f"shop-m{n}" for n in range(110)),
)  # fmt: skip
"""Every tenant the tests write to: the session's key covers them all."""

CONTRACT = Path(__file__).parents[2] / "contract" / "create-events.openapi.yaml"


def ev(**fields: object) -> pb.Event:
    """A valid event; keyword arguments override its fields."""
    base: dict[str, object] = {
        "tenant": "shop-a",
        "market": "us",
        "type": pb.EVENT_TYPE_ADD_TO_CART,
        "user_id": "user-1",
    }
    base.update(fields)
    return pb.Event(**base)  # type: ignore[arg-type]


def event(run: str, n: int) -> dict[str, Any]:
    """Event ``n`` of a run, as JSON: a unique deduplication_id, users spread over partitions."""
    return {
        "tenant": "shop-r",
        "market": "us",
        "type": "add_to_cart",
        "deduplication_id": f"{run}-{n}",
        "user_id": f"user-{n % 97}",
        "product_id": f"p-{n}",
    }


def batches(run: str, total: int, size: int) -> Iterator[list[dict[str, Any]]]:
    """``total`` events of a run in requests of ``size``."""
    for start in range(0, total, size):
        yield [event(run, n) for n in range(start, min(start + size, total))]


def contract_examples() -> list[list[dict[str, Any]]]:
    """The example requests embedded in the contract's description, as JSON."""
    description = yaml.safe_load(CONTRACT.read_text())["paths"]["/create-events"]["post"][
        "description"
    ]
    blocks = re.findall(r"<pre>(.*?)</pre>", description, flags=re.DOTALL)
    return [json.loads(re.sub(r"</?mark>", "", block)) for block in blocks]


# --- events of an exact serialized size, for the size limits at their edges ---------


def event_of_size(size: int, longest: int, **fields: object) -> pb.Event:
    """A valid event of exactly ``size`` protobuf bytes, none of its strings over ``longest``.

    ``variant_ids`` items make up the size: each costs a tag byte, its length and itself.
    """
    base: dict[str, object] = {"tenant": "t", "market": "us", "type": pb.EVENT_TYPE_CLICK}
    made = pb.Event(**{**base, **fields})  # type: ignore[arg-type]
    while (missing := size - made.ByteSize()) > 0:
        if missing == 1:
            raise ValueError(f"no item adds exactly 1 byte (event is {made.ByteSize()} bytes)")
        # The longest item that fills the gap exactly or leaves room for another (>= 2 bytes).
        length = min(longest, missing - 2)
        while (left := missing - (1 + len(varint(length)) + length)) != 0 and left < 2:
            length -= 1
        made.variant_ids.append("v" * length)
    if made.ByteSize() != size:
        raise ValueError(f"cannot make an event of {size} bytes from {fields}")
    return made


def request_size(events: list[pb.Event]) -> int:
    """Bytes of the CreateEventsRequest carrying ``events``."""
    return pb.CreateEventsRequest(events=events).ByteSize()


# --- Depict's v2 kinds, as TrackedEvents -------------------------------------------


def product(sku: str = "white-socks-xl", price: str = "89.9", quantity: int = 1) -> dict[str, Any]:
    """A purchased product's fields; ``price`` is a JSON number's text (see ``text_price``)."""
    return {"sku": sku, "price_number": price, "quantity": quantity}


def text_price(sku: str, price: str, quantity: int = 1) -> dict[str, Any]:
    """A purchased product whose price was sent as a JSON string."""
    return {"sku": sku, "price_text": price, "quantity": quantity}


TRANSACTION: dict[str, object] = {
    "tenant": "shop-a",
    "market": "se",
    "dsid": "3n0kq7c1x9s",
    "transaction_id": "T-1001",
}
"""The fields a valid purchase and the mapping of its transaction both have."""


def purchase(*products: dict[str, Any], **fields: object) -> pb.TrackedEvent:
    """A valid purchase (one product unless given); keyword arguments override its fields."""
    base: dict[str, object] = {
        **TRANSACTION,
        "currency": "SEK",
        "products": [pb.PurchasedProduct(**p) for p in products or (product(quantity=12),)],
    }
    base.update(fields)
    return pb.TrackedEvent(purchase=pb.Purchase(**base))  # type: ignore[arg-type]


def mapping(**fields: object) -> pb.TrackedEvent:
    """A valid transaction mapping; keyword arguments override its fields."""
    base = {**TRANSACTION, **fields}
    return pb.TrackedEvent(transaction_mapping=pb.TransactionMapping(**base))  # type: ignore[arg-type]


def unavailable(**fields: object) -> pb.TrackedEvent:
    """A valid product_unavailable report; keyword arguments override its fields."""
    base: dict[str, object] = {
        "tenant": "shop-a",
        "market": "se",
        "user_id": "user-1",
        "dsid": "3n0kq7c1x9s",
        "product_id": "p-17",
        "unavailability_type": pb.UNAVAILABILITY_TYPE_OUT_OF_STOCK,
    }
    base.update(fields)
    return pb.TrackedEvent(product_unavailable=pb.ProductUnavailable(**base))  # type: ignore[arg-type]
