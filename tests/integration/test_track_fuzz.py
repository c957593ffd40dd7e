"""Arbitrary v2 events over Track get OK, INVALID_ARGUMENT or PERMISSION_DENIED, never a crash;
each answer as an independent reading of Depict's schema says it should be."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from events_server.pb import events_pb2 as pb
from events_server.pb import events_pb2_grpc
from events_server.server.settings import Settings
from tests.harness.data import TEST_TENANTS
from tests.harness.fuzz import fuzz_settings, judged_call
from tests.harness.rpc import violations

Figures = Callable[[str], None]

# Short strings, one in 10 empty; one in 40 over the string limit. Most values valid, so
# that whole requests pass often enough to exercise the accepting path too.
TEXT = st.integers(0, 39).flatmap(
    lambda n: (
        st.just("x" * 9000)
        if n == 0
        else st.sampled_from(["a", "T-1", "ü", "u 1", "T-2", "b", "c", "d", "e", ""])
    )
)
OPTIONAL = st.none() | TEXT
TENANT = st.sampled_from(["shop-a", "shop-b", "", "not-ours"])
CURRENCY = st.sampled_from(["SEK", "EUR", "xxUSDxx", "AEDx", "SEK", "sek", "", "kr", "ZWD\n"])
NUMBER = st.sampled_from(["0", "89.9", "1e3", "-0", "-1", "01", "1.", "", "19,50", "-1e-400"])
PRICE = st.one_of(
    st.just(None),
    NUMBER.map(lambda text: ("price_number", text)),
    TEXT.map(lambda text: ("price_text", text)),
)


@st.composite
def any_product(draw: st.DrawFn) -> pb.PurchasedProduct:
    product = pb.PurchasedProduct(sku=draw(TEXT), quantity=draw(st.integers(0, 9)))
    if (price := draw(PRICE)) is not None:
        setattr(product, *price)
    return product


@st.composite
def any_tracked(draw: st.DrawFn) -> pb.TrackedEvent:
    kind = draw(st.sampled_from(["purchase", "transaction_mapping", "product_unavailable", None]))
    event = pb.TrackedEvent()
    if kind is None:
        return event
    message: Any = getattr(event, kind)
    message.tenant = draw(TENANT)
    message.market = draw(TEXT)
    for name in ("user_id", "session_id", "dsid"):
        if (value := draw(OPTIONAL)) is not None:
            setattr(message, name, value)
    if kind == "product_unavailable":
        message.product_id = draw(TEXT)
        message.unavailability_type = draw(st.sampled_from([1, 2, 1, 2, 0, 3]))
        return event
    message.transaction_id = draw(TEXT)
    if kind == "purchase":
        message.currency = draw(CURRENCY)
        message.products.extend(draw(st.lists(any_product(), max_size=2)))
    return event


# The reading of Depict's schema this test holds the server to, written apart from it.
CURRENCY_OK = {"SEK", "EUR", "xxUSDxx", "AEDx"}
NUMBER_OK = {"0", "89.9", "1e3", "-0", "-1e-400"}  # -1e-400 is -0.0 as a float: >= 0


def valid(event: pb.TrackedEvent, limits: Settings) -> bool:
    kind = event.WhichOneof("kind")
    if kind is None:
        return False
    message: Any = getattr(event, kind)
    strings = [message.tenant, message.market]
    ok = bool(message.tenant and message.market)
    for name in ("user_id", "session_id", "dsid"):
        if message.HasField(name):
            ok = ok and bool(getattr(message, name))
            strings.append(getattr(message, name))
    if kind == "product_unavailable":
        ok = ok and bool(message.product_id) and message.unavailability_type in (1, 2)
        strings.append(message.product_id)
    else:
        ok = ok and bool(message.transaction_id)
        strings.append(message.transaction_id)
    if kind == "purchase":
        ok = ok and message.currency in CURRENCY_OK and len(message.products) > 0
        for product in message.products:
            price = product.WhichOneof("price")
            ok = ok and bool(product.sku) and product.quantity >= 1 and price is not None
            if price == "price_number":
                ok = ok and product.price_number in NUMBER_OK
            strings += [product.sku, getattr(product, price) if price else ""]
    return (
        ok
        and message.ByteSize() <= limits.max_event_bytes
        and all(len(text) <= limits.max_string_length for text in strings)
    )


@pytest.mark.usefixtures("rdb")
def test_arbitrary_tracked_events_get_ok_invalid_argument_or_permission_denied(
    stub: events_pb2_grpc.EventsServiceStub, figures: Figures, settings: Settings
) -> None:
    seen: Counter[str] = Counter()

    @fuzz_settings(300)
    @given(events=st.lists(any_tracked(), max_size=3))
    def check(events: list[pb.TrackedEvent]) -> None:
        ours = all(
            getattr(e, e.WhichOneof("kind") or "purchase").tenant in TEST_TENANTS for e in events
        )
        request = pb.TrackRequest(events=events)
        every_valid = all(valid(e, settings) for e in events)
        answer = judged_call(stub.Track, request, every_valid, ours, seen)
        if isinstance(answer, pb.CreateEventsResponse):
            seen["events accepted"] += answer.accepted
        elif answer is not None:
            named = {int(field[7 : field.index("]")]) for field, _ in violations(answer)}
            assert named == {i for i, e in enumerate(events) if not valid(e, settings)}

    check()
    figures(f"arbitrary Track requests, codes and events accepted: {dict(seen)}")
    assert set(seen) <= {"OK", "INVALID_ARGUMENT", "PERMISSION_DENIED", "events accepted"}
    assert seen["events accepted"] > 0  # the accepting path was taken, not only refusals
