"""JSON -> proto -> envelope -> JSON keeps every valid event exactly."""

from __future__ import annotations

from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import given
from hypothesis import strategies as st

from events_server.pb import events_pb2 as pb
from events_server.wire.codec import (
    OPTIONAL_STRING_FIELDS,
    TYPE_NAMES,
    envelope_bytes,
    envelope_context,
    envelope_to_dict,
    event_from_dict,
)
from rest_bridge.models import EEventType, Event

# Valid UTF-8 only: lone surrogates are rejected by the bridge (see test_app).
text = st.text(st.characters(exclude_categories=["Cs"]), max_size=20)
absent = st.just(...)  # marker: leave the field out of the JSON object


def _optional(values: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(absent, st.none(), values)


@st.composite
def contract_events(draw: st.DrawFn) -> dict[str, Any]:
    """A valid contract Event as a JSON object: each optional field absent, null or a value."""
    event: dict[str, Any] = {
        "tenant": draw(text),
        "market": draw(text),
        "type": draw(st.sampled_from([t.value for t in EEventType])),
    }
    for name in OPTIONAL_STRING_FIELDS:
        value = draw(_optional(text.filter(bool) if name == "dsid" else text))
        if value is not ...:
            event[name] = value
    for name, values in (
        ("variant_ids", st.lists(text, max_size=4)),
        ("entity_identifiers", st.dictionaries(text, text, max_size=4)),
    ):
        value = draw(_optional(values))
        if value is not ...:
            event[name] = value
    return event


def _no_value_left_out(event: dict[str, Any]) -> dict[str, Any]:
    """The canonical form: null (no value) reads as absent; "" is a value and stays."""
    return {k: v for k, v in event.items() if v is not None and v not in ([], {})}


def _round_trip(event: dict[str, Any]) -> dict[str, Any]:
    model = Event.model_validate(event)
    envelope = pb.Envelope(client_ip="127.0.0.1")
    envelope.event.CopyFrom(event_from_dict(vars(model)))
    wire = envelope.SerializeToString()
    out: dict[str, Any] = envelope_to_dict(pb.Envelope.FromString(wire))["event"]
    return out


@given(contract_events())
def test_every_valid_event_round_trips(event: dict[str, Any]) -> None:
    assert _round_trip(event) == _no_value_left_out(event)


def test_empty_string_absent_and_null_stay_distinct() -> None:
    base = {"tenant": "t", "market": "m", "type": "click"}
    empty = _round_trip({**base, "user_id": ""})
    assert empty["user_id"] == ""
    assert "user_id" not in _round_trip({**base, "user_id": None})
    assert "user_id" not in _round_trip(base)


def test_every_contract_type_has_a_proto_value() -> None:
    assert sorted(TYPE_NAMES.values()) == sorted(t.value for t in EEventType)
    assert pb.EVENT_TYPE_UNSPECIFIED not in TYPE_NAMES


def test_optional_fields_are_the_contracts_nullable_strings() -> None:
    nullable = {
        name
        for name, field in Event.model_fields.items()
        if field.default is None and name not in ("variant_ids", "entity_identifiers")
    }
    assert set(OPTIONAL_STRING_FIELDS) == nullable
    assert len(pb.Event.DESCRIPTOR.fields) == len(Event.model_fields) == 23


# Lengths past 127 bytes take a varint of two bytes, past 16383 three.
context_strings = st.one_of(st.none(), st.just(""), text, st.text(min_size=130, max_size=20000))


@given(
    seconds=st.integers(0, 2**40),
    nanos=st.integers(0, 999_999_999),
    client_ip=st.one_of(st.just(""), text),
    user_agent=context_strings,
    referer=context_strings,
    forwarded_host=context_strings,
    api_key_id=st.one_of(st.just(""), text),
    storefront_origin=context_strings,
    ws_message_id=context_strings,
)
def test_envelope_context_is_the_envelopes_own_serialization(  # noqa: PLR0917
    seconds: int,
    nanos: int,
    client_ip: str,
    user_agent: str | None,
    referer: str | None,
    forwarded_host: str | None,
    api_key_id: str,
    storefront_origin: str | None,
    ws_message_id: str | None,
) -> None:
    received_at = Timestamp(seconds=seconds, nanos=nanos)
    fields: dict[str, Any] = {
        "client_ip": client_ip,
        "user_agent": user_agent,
        "referer": referer,
        "forwarded_host": forwarded_host,
        "api_key_id": api_key_id,
        "storefront_origin": storefront_origin,
        "ws_message_id": ws_message_id,
    }
    built = envelope_context(received_at.SerializeToString(), **fields)
    assert built == pb.Envelope(received_at=received_at, **fields).SerializeToString()
    event = pb.Event(tenant="shop", market="se", type=pb.EVENT_TYPE_CLICK, url="u" * 300)
    envelope = pb.Envelope.FromString(envelope_bytes(event.SerializeToString(), built))
    assert envelope.event == event
    assert envelope.received_at == received_at
    for name, value in fields.items():
        if value is None:
            assert not envelope.HasField(name)  # type: ignore[arg-type]
        else:
            assert getattr(envelope, name) == value
