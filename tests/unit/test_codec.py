"""JSON -> proto -> envelope -> JSON keeps every valid event exactly."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from events_server.pb import events_pb2 as pb
from events_server.wire.codec import (
    OPTIONAL_STRING_FIELDS,
    TYPE_NAMES,
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
