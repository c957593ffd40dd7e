"""Bad input of every kind gets a 4xx (or INVALID_ARGUMENT), never a 500 or a crash.

Three sources: schemathesis driven by the bridge's own /openapi.json, hypothesis
building arbitrary protobuf Events for the gRPC server, and hand-made malformed
bodies.
"""

from __future__ import annotations

import gzip
import json
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import httpx
import pytest
import requests
import schemathesis
from google.protobuf.descriptor import FieldDescriptor
from hypothesis import given
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from events_server.pb import events_pb2 as pb
from events_server.pb import events_pb2_grpc
from events_server.server.settings import Settings
from events_server.wire.codec import TYPE_NAMES
from tests.harness.data import TEST_TENANTS
from tests.harness.fuzz import fuzz_settings, judged_call
from tests.harness.rpc import violations

Figures = Callable[[str], None]

SCHEMATHESIS_CASES = 1000


@pytest.mark.usefixtures("rdb")
def test_schemathesis_finds_no_server_error_and_no_schema_violation(
    bridge: str, api_key: str, figures: Figures
) -> None:
    schema = schemathesis.openapi.from_url(f"{bridge}/openapi.json")
    operation = schema["/create-events"]["POST"]
    # Valid requests and requests that break the schema on purpose, half and half; most
    # valid ones write to a tenant of the session's key, so they reach Redis.
    cases = st.one_of(
        operation.as_strategy(schemathesis.GenerationMode.POSITIVE).map(_mostly_our_tenant),
        operation.as_strategy(schemathesis.GenerationMode.NEGATIVE),
    )
    seen: Counter[int] = Counter()
    session = requests.Session()

    @fuzz_settings(SCHEMATHESIS_CASES)
    @given(case=cases)
    def check(case: schemathesis.Case[Any]) -> None:
        response = case.call(
            base_url=bridge, session=session, timeout=10, headers={"x-api-key": api_key}
        )
        seen[response.status_code] += 1
        # 403 (a tenant the key does not cover) is the one answer the contract cannot
        # document: keys are outside it. Everything else must conform.
        conformance = [] if response.status_code == 403 else [status_code_conformance]
        case.validate_response(
            response,
            checks=[
                not_a_server_error,
                response_schema_conformance,
                content_type_conformance,
                *conformance,
            ],
        )

    try:
        check()
    finally:
        session.close()
        figures(f"schemathesis cases={seen.total()}, statuses={dict(sorted(seen.items()))}")
    assert seen.total() >= SCHEMATHESIS_CASES
    assert all(status < 500 for status in seen)


def _mostly_our_tenant(case: schemathesis.Case[Any]) -> schemathesis.Case[Any]:
    """Put generated events under a tenant the session key covers, but for a few."""
    if isinstance(case.body, list):
        for event in case.body:
            if not isinstance(event, dict):
                continue
            tenant = event.get("tenant")
            if isinstance(tenant, str) and len(tenant) % 5:
                event["tenant"] = "t"
    return case


# --- arbitrary protobuf Events, straight to gRPC -------------------------------------

# Big (over the string and event limits), but a request of a few events stays under
# max_request_bytes (4 MiB).
HUGE = st.integers(1_000, 50_000).map(lambda n: "x" * n)
# Huge in about one field of 40: with ~23 fields an event, many requests still pass
# the string limits, so the accepting path is exercised too.
TEXT = st.integers(0, 39).flatmap(lambda n: HUGE if n == 0 else st.text(max_size=30))
KEYS = st.one_of(st.just(""), st.text(max_size=10))
OUR_TENANTS = TEST_TENANTS[:3]


def _field_strategy(field: FieldDescriptor) -> st.SearchStrategy[Any]:
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        return st.dictionaries(KEYS, st.text(max_size=30), max_size=4)
    if field.type == FieldDescriptor.TYPE_ENUM:
        # Unknown numbers included (proto3 enums are open), valid ones often enough.
        return st.sampled_from(sorted(TYPE_NAMES)) | st.integers(-(2**31), 2**31 - 1)
    if field.is_repeated:
        return st.lists(st.text(max_size=30), max_size=4)
    if field.name == "tenant":  # the key's tenants, other tenants, no tenant
        return st.sampled_from(OUR_TENANTS) | TEXT
    if field.type == FieldDescriptor.TYPE_STRING:
        return st.none() | TEXT if field.has_presence else TEXT
    raise AssertionError(f"no strategy for {field.full_name}")


@st.composite
def any_event(draw: st.DrawFn) -> pb.Event:
    """An Event with any value in every field (built from the descriptor, so new fields too)."""
    event = pb.Event()
    for field in pb.Event.DESCRIPTOR.fields:
        value = draw(_field_strategy(field))
        if value is None:
            continue
        if isinstance(value, dict):
            getattr(event, field.name).update(value)
        elif isinstance(value, list):
            getattr(event, field.name).extend(value)
        else:
            setattr(event, field.name, value)
    return event


def _strings(event: pb.Event) -> Iterator[str]:
    """Every string the event holds: fields, list items, map keys and values."""
    for field, value in event.ListFields():
        if field.message_type is not None:
            yield from value.keys()
            yield from value.values()
        elif field.is_repeated:
            yield from value
        elif field.type == FieldDescriptor.TYPE_STRING:
            yield value


def _valid(event: pb.Event, limits: Settings) -> bool:
    return bool(
        event.tenant
        and event.market
        and event.type in TYPE_NAMES
        and (event.dsid or not event.HasField("dsid"))
        and event.ByteSize() <= limits.max_event_bytes
        and all(len(text) <= limits.max_string_length for text in _strings(event))
    )


@pytest.mark.usefixtures("rdb")
def test_arbitrary_protobuf_events_get_ok_invalid_argument_or_permission_denied(
    stub: events_pb2_grpc.EventsServiceStub, figures: Figures, settings: Settings
) -> None:
    seen: Counter[str] = Counter()

    @fuzz_settings(300)
    @given(events=st.lists(any_event(), max_size=3))
    def check(events: list[pb.Event]) -> None:
        request = pb.CreateEventsRequest(events=events)
        ours = all(e.tenant in TEST_TENANTS for e in events)
        every_valid = all(_valid(e, settings) for e in events)
        answer = judged_call(stub.CreateEvents, request, every_valid, ours, seen)
        if isinstance(answer, grpc.RpcError):
            assert violations(answer)

    check()
    figures(f"arbitrary Event requests={seen.total()}, codes={dict(seen)}")
    assert set(seen) <= {"OK", "INVALID_ARGUMENT", "PERMISSION_DENIED"}


# --- malformed bodies ----------------------------------------------------------------

VALID = json.dumps(
    [{"tenant": "shop-f", "market": "us", "type": "click", "deduplication_id": "f-1"}]
).encode()

MALFORMED: dict[str, tuple[bytes, dict[str, str]]] = {
    "invalid UTF-8": (b'[{"tenant": "\xff\xfe", "market": "us", "type": "click"}]', {}),
    "a top-level object": (VALID[1:-1], {}),
    "10,000-deep array nesting": (b"[" * 10_000 + b"]" * 10_000, {}),
    "10,000-deep object nesting": (b'{"a":' * 10_000 + b"1" + b"}" * 10_000, {}),
    "deep nesting inside an event": (
        b'[{"tenant": "t", "market": "m", "type": "click", "entity_identifiers": '
        + b'{"a":' * 10_000
        + b'"x"'
        + b"}" * 10_000
        + b"}]",
        {},
    ),
    "truncated gzip": (gzip.compress(VALID)[:-12], {"content-encoding": "gzip"}),
    "truncated JSON": (VALID[:-5], {}),
    "empty body": (b"", {}),
    "not JSON at all": (b"\x00\x01\x02garbage", {}),
    "NaN where a string goes": (b'[{"tenant": NaN, "market": "us", "type": "click"}]', {}),
    "a lone surrogate": (b'[{"tenant": "\\ud800", "market": "us", "type": "click"}]', {}),
    "a huge number": (b'[{"tenant": 1' + b"0" * 5000 + b', "market": "m", "type": "click"}]', {}),
}


@pytest.mark.parametrize("name", list(MALFORMED))
@pytest.mark.usefixtures("rdb")
def test_malformed_body_gets_a_4xx_naming_the_problem(http: httpx.Client, name: str) -> None:
    body, headers = MALFORMED[name]
    answer = http.post(
        "/create-events", content=body, headers={"content-type": "application/json", **headers}
    )
    assert 400 <= answer.status_code < 500, answer.text
    detail = answer.json()["detail"]
    assert detail
    assert all({"loc", "msg", "type"} <= set(item) for item in detail)
