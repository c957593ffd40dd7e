"""The quick pass (rest_bridge.fastpath) takes only bodies the full validation takes, and
builds the very protobuf messages it builds: both run over the contract tests' bodies (valid
and refused, v1 and v2) and over bodies generated around the common shape."""

from __future__ import annotations

import codecs
import json
from typing import Any

import orjson
from hypothesis import given
from hypothesis import strategies as st

from bench.workload import Batches
from events_server.pb import events_pb2 as pb
from rest_bridge.fastpath import quick_request, quick_track
from rest_bridge.models import Event
from rest_bridge.responses import Reply
from rest_bridge.routes.steps import response_body, response_bytes
from rest_bridge.validation import validate_body_fully
from rest_bridge.validation_v2 import validate_track_body
from rest_bridge.ws_frames import Frame, parse_frame
from tests.harness.fuzz import fuzz_settings
from tests.integration import test_numbers_and_422 as v1_contract
from tests.integration import test_v2_422 as v2_contract

MAX_DEPTH = 16
MAX_EVENTS = 500


def _same_v1(body: bytes) -> bool:
    """Whether the quick pass took ``body``; when it did, the full path's events are its."""
    quick = quick_request(body, MAX_EVENTS)
    if quick is None:
        return False
    full = validate_body_fully(body, MAX_DEPTH, MAX_EVENTS)
    assert not isinstance(full, Reply), (body, full.body)
    request = pb.CreateEventsRequest(events=full)
    assert quick == request, body
    # Deterministic: a map's entries have no order on the wire (upb writes them in its hash
    # table's order, which depends on how the map was filled), everything else must match.
    assert quick.SerializeToString(deterministic=True) == request.SerializeToString(
        deterministic=True
    )
    return True


def _same_v2(body: bytes) -> bool:
    quick = quick_track(body, MAX_EVENTS)
    if quick is None:
        return False
    full, _ = validate_track_body(body, MAX_DEPTH, MAX_EVENTS)
    assert not isinstance(full, Reply), (body, full.body)
    assert quick == full, body
    assert quick.SerializeToString(deterministic=True) == full.SerializeToString(deterministic=True)
    return True


# --- the contract tests' bodies -----------------------------------------------------------


def test_no_bad_v1_body_of_the_contract_tests_is_taken() -> None:
    for body in v1_contract.BAD_BODIES.values():
        assert quick_request(body, MAX_EVENTS) is None, body


def test_no_bad_v2_body_of_the_contract_tests_is_taken() -> None:
    for body in v2_contract.BAD_BODIES.values():
        assert quick_track(body, MAX_EVENTS) is None, body


def test_numbers_in_v1_strings_are_taken_only_when_whole_and_then_as_the_full_path_reads_them() -> (
    None
):
    taken = []
    for number, _ in v1_contract.NUMBERS:
        raw = f'[{{"tenant": "t", "market": "m", "type": "click", "document_width": {number}}}]'
        for body in (raw.encode(), codecs.BOM_UTF8 + raw.encode()):
            if _same_v1(body):
                taken.append(number)
    # Whole numbers as their digits; a fraction or an exponent is the float's repr there.
    assert set(taken) == {"1280", "0", "-3"}


def test_each_value_of_the_contract_tests_in_each_place_is_taken_as_the_full_path_takes_it() -> (
    None
):
    taken = 0
    for value in v1_contract.VALUES:
        for place in ("user_id", "dsid", "variant_ids", "entity_identifiers", "tenant"):
            inner = {"variant_ids": [value], "entity_identifiers": {"k": value}}.get(place, value)
            body = json.dumps([{**v1_contract.EVENT, place: inner}]).encode()
            taken += _same_v1(body)
    assert taken >= 10  # strings, whole numbers, nulls, empty lists and maps


def test_the_valid_v2_bodies_of_the_contract_tests_are_taken_alike() -> None:
    c = v2_contract
    bodies = [
        c._body(c._product(price="19,50 kr"), c._product(price=0), c._product(quantity=3)),
        c._body(c.MAPPING, {"transaction_id": "T-2"}, c.UNAVAILABLE, c.PURCHASE),
        c._body(c._product(price=89.9), c._product(price=1e3), c._product(price=-0.0)),
        c._body(c._purchase(session_id="s", user_id="u", event_type=None)),
        c._body(),
        b'{"tenant":"t","market":"m","events":[{"transaction_id":"T","products":'
        b'[{"sku":"s","price":89.90,"quantity":1},{"sku":"s","price":1E+3,"quantity":2},'
        b'{"sku":"s","price":-0,"quantity":3}],"currency":"EUR"}]}',
    ]
    assert all(_same_v2(body) for body in bodies)
    # Left to the full path: what only it can say (a quantity of 3.0, a loosely matched
    # currency, a price past a double), and it answers them as before.
    for body in (
        c._body(c._product(quantity=3.0)),
        c._body(c._purchase(currency="xSEKx")),
        c._body(c._product(price=10**400)),
    ):
        assert quick_track(body, MAX_EVENTS) is None


def test_the_benchmarks_bodies_are_taken_alike() -> None:
    batches = Batches(seed=3, worker=0)
    for n in (1, 1, 1, 2, 10, 100):
        assert _same_v1(batches.json_body(n))


def test_past_max_events_and_empty_lists_are_left_to_the_full_path() -> None:
    body = json.dumps([v1_contract.EVENT] * 3).encode()
    assert quick_request(body, 2) is None
    assert quick_request(b"[]", MAX_EVENTS) is None
    track = v2_contract._body(*[v2_contract.MAPPING] * 3)
    assert quick_track(track, 2) is None


# --- generated bodies around the common shape ---------------------------------------------

ODD_VALUES = st.sampled_from(
    [
        "", "x", "\ud800", "ø", 0, 7, -1, 2**63, 2**64, 10**30, 0.5, -0.0, 1e300, True, False,
        None, [], ["x"], [1, "y"], [None], {}, {"a": "b"}, {"a": 1}, {"a": None}, {"\ud800": "v"},
        "click", "purchase", "SEK", "sek", "out_of_stock", "transaction_mapping",
        "product_unavailable",
    ]
)  # fmt: skip
PLAIN_VALUES = st.one_of(
    st.text(max_size=6), st.integers(-(10**21), 10**21), st.lists(st.text(max_size=3), max_size=3)
)
VALUES = st.one_of(PLAIN_VALUES, ODD_VALUES)
V1_NAMES = st.sampled_from([*Event.model_fields, "colour", "Type"])


@st.composite
def v1_bodies(draw: Any) -> bytes:
    events = []
    for _ in range(draw(st.integers(1, 3))):
        event: dict[str, Any] = {"tenant": "t", "market": "m", "type": "page_view"}
        for name, value in draw(st.lists(st.tuples(V1_NAMES, VALUES), max_size=4)):
            event[name] = value
        if draw(st.integers(0, 3)) == 0:
            event.pop(draw(st.sampled_from(["tenant", "market", "type"])))
        events.append(event)
    return json.dumps(events).encode()


@given(body=v1_bodies())
@fuzz_settings(1500)
def test_generated_v1_bodies_are_taken_only_as_the_full_path_takes_them(body: bytes) -> None:
    _same_v1(body)


V2_EVENT_NAMES = st.sampled_from(
    ["event_type", "transaction_id", "currency", "products", "product_id", "unavailability_type",
     "user_id", "session_id", "dsid", "extra"]
)  # fmt: skip
V2_PRODUCT_NAMES = st.sampled_from(["sku", "price", "quantity", "extra"])
PRICES = st.one_of(ODD_VALUES, st.floats(allow_nan=False), st.integers(-5, 10**25))


@st.composite
def v2_bodies(draw: Any) -> bytes:
    kinds = [v2_contract.PURCHASE, v2_contract.MAPPING, v2_contract.UNAVAILABLE]
    events = []
    for _ in range(draw(st.integers(0, 3))):
        event = json.loads(json.dumps(draw(st.sampled_from(kinds))))
        for name, value in draw(st.lists(st.tuples(V2_EVENT_NAMES, VALUES), max_size=2)):
            event[name] = value
        if draw(st.integers(0, 3)) == 0:
            event.pop(draw(st.sampled_from(sorted(event))), None)
        for product in event.get("products", []) if isinstance(event.get("products"), list) else []:
            if isinstance(product, dict):
                product["price"] = draw(PRICES)
                changes = draw(st.lists(st.tuples(V2_PRODUCT_NAMES, ODD_VALUES), max_size=2))
                for name, value in changes:
                    product[name] = value
        events.append(event)
    top = {"tenant": draw(st.sampled_from(["t", "", 7])), "market": "m", "events": events}
    return json.dumps(top).encode()


@given(body=v2_bodies())
@fuzz_settings(1500)
def test_generated_v2_bodies_are_taken_only_as_the_full_path_takes_them(body: bytes) -> None:
    _same_v2(body)


def test_the_generators_give_the_quick_pass_bodies_to_take() -> None:
    # An honest check of the two above: most of what they generate around the common
    # shape must reach the comparison, or they would compare nothing.
    taken = {"v1": 0, "v2": 0}

    @given(v1=v1_bodies(), v2=v2_bodies())
    @fuzz_settings(400)
    def count(v1: bytes, v2: bytes) -> None:
        taken["v1"] += _same_v1(v1)
        taken["v2"] += _same_v2(v2)

    count()
    assert taken["v1"] >= 40
    assert taken["v2"] >= 40


@given(body=v1_bodies())
@fuzz_settings(500)
def test_a_frame_of_a_clearly_valid_event_carries_the_event_the_full_path_makes(
    body: bytes,
) -> None:
    event = json.loads(body)[0]
    frame = parse_frame(json.dumps({"id": "f-1", "event": event}))
    assert isinstance(frame, Frame)
    if frame.request is not None:
        assert frame.body == orjson.dumps([event])
        full = validate_body_fully(frame.body, MAX_DEPTH, MAX_EVENTS)
        assert frame.request == pb.CreateEventsRequest(events=full)  # type: ignore[arg-type]


def test_the_benchmarks_frames_carry_their_events() -> None:
    batches = Batches(seed=4, worker=0)
    for _ in range(20):
        frame_id, data = batches.ws_frame()
        frame = parse_frame(data)
        assert isinstance(frame, Frame)
        assert frame.id == frame_id
        assert frame.request is not None
        full = validate_body_fully(frame.body, MAX_DEPTH, MAX_EVENTS)
        assert frame.request == pb.CreateEventsRequest(events=full)  # type: ignore[arg-type]


def test_the_200_body_is_written_as_orjson_writes_the_results() -> None:
    result = pb.EventResult
    replies = [
        pb.CreateEventsResponse(),
        pb.CreateEventsResponse(
            accepted=1,
            duplicates=1,
            results=[
                result(status=result.STATUS_ACCEPTED, entry_id="1700000000000-0", partition=3),
                result(status=result.STATUS_DUPLICATE, entry_id='"\\ø\n', partition=0),
            ],
        ),
        pb.CreateEventsResponse(results=[result(status=result.STATUS_UNSPECIFIED)]),
    ]
    for reply in replies:
        assert response_bytes(reply) == orjson.dumps(response_body(reply))
