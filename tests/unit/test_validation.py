"""The server's own rules, which direct gRPC callers meet without the bridge's schema."""

from __future__ import annotations

import pytest

from events_server.pb import events_pb2 as pb
from events_server.server.errors import InvalidEvents
from events_server.server.validation import validate_events
from events_server.wire.validation import Limits, event_violations
from events_server.wire.violations import FieldViolation
from tests.harness.data import event_of_size


def valid(**fields: object) -> pb.Event:
    base: dict[str, object] = {"tenant": "t", "market": "us", "type": pb.EVENT_TYPE_CLICK}
    base.update(fields)
    return pb.Event(**base)  # type: ignore[arg-type]


LIMITS = Limits(max_events_per_request=5, max_event_bytes=1000, max_string_length=100)


def test_a_valid_event_has_no_violations() -> None:
    assert event_violations(0, valid(dsid="x", user_id="")) == []


@pytest.mark.parametrize(
    ("event", "field", "reason"),
    [
        (valid(tenant=""), "tenant", "string_too_short"),
        (valid(market=""), "market", "string_too_short"),
        (valid(type=pb.EVENT_TYPE_UNSPECIFIED), "type", "missing"),
        (valid(type=99), "type", "enum"),
        (valid(dsid=""), "dsid", "string_too_short"),
    ],
)
def test_each_rule_names_the_event_and_field(event: pb.Event, field: str, reason: str) -> None:
    [violation] = event_violations(7, event)
    assert violation.field == f"events[7].{field}"
    assert violation.reason == reason
    assert field in violation.description


def test_all_violations_of_a_request_are_reported_together() -> None:
    with pytest.raises(InvalidEvents) as caught:
        validate_events([valid(), valid(tenant="", market=""), valid(type=0)], LIMITS)
    assert [v.field for v in caught.value.violations] == [
        "events[1].tenant",
        "events[1].market",
        "events[2].type",
    ]
    assert "3 field violations" in str(caught.value)


# --- limits ---------------------------------------------------------------------------


def violations_of(events: list[pb.Event], limits: Limits = LIMITS) -> list[tuple[str, str]]:
    """(field, reason) of every violation validate_events reports; [] when it passes."""
    try:
        validate_events(events, limits)
    except InvalidEvents as error:
        return [(v.field, v.reason) for v in error.violations]
    return []


def test_the_events_come_back_serialized_for_the_queue() -> None:
    events = [valid(user_id="u-1"), valid(variant_ids=["a", "b"], entity_identifiers={"k": "v"})]
    assert validate_events(events, LIMITS) == [e.SerializeToString() for e in events]


def test_up_to_max_events_per_request_pass_and_one_more_is_refused_with_the_limit() -> None:
    assert violations_of([valid()] * 5) == []
    with pytest.raises(InvalidEvents) as caught:
        validate_events([valid()] * 6, LIMITS)
    [violation] = caught.value.violations
    assert (violation.field, violation.reason) == ("events", "too_many_events")
    assert "6 events" in violation.description
    assert "at most 5" in violation.description
    assert "max_events_per_request" in violation.description


def test_too_many_events_is_refused_before_any_event_is_looked_at() -> None:
    # The count alone decides: the invalid events are not worth reporting yet.
    assert violations_of([valid(tenant="")] * 6) == [("events", "too_many_events")]


def test_an_event_of_max_event_bytes_passes_and_one_byte_more_is_refused() -> None:
    limits = Limits(max_events_per_request=5, max_event_bytes=1000, max_string_length=5000)
    at_limit = event_of_size(1000, longest=100)
    over = event_of_size(1001, longest=100)
    assert violations_of([valid(), at_limit], limits) == []
    with pytest.raises(InvalidEvents) as caught:
        validate_events([valid(), over], limits)
    [violation] = caught.value.violations
    assert (violation.field, violation.reason) == ("events[1]", "event_too_large")
    assert "1001 bytes" in violation.description
    assert "at most 1000" in violation.description
    assert "max_event_bytes" in violation.description


STRING_FIELDS = [
    f.name for f in pb.Event.DESCRIPTOR.fields if f.type == f.TYPE_STRING and not f.is_repeated
]


@pytest.mark.parametrize("name", STRING_FIELDS)
def test_every_string_field_may_hold_max_string_length_characters_and_no_more(name: str) -> None:
    assert violations_of([valid(**{name: "x" * 100})]) == []
    with pytest.raises(InvalidEvents) as caught:
        validate_events([valid(), valid(**{name: "x" * 101})], LIMITS)
    [violation] = caught.value.violations
    assert (violation.field, violation.reason) == (f"events[1].{name}", "string_too_long")
    assert "101 characters" in violation.description
    assert "at most 100" in violation.description
    assert "max_string_length" in violation.description


def test_list_items_map_keys_and_map_values_are_limited_too() -> None:
    assert violations_of([valid(variant_ids=["a", "x" * 100])]) == []
    assert violations_of([valid(variant_ids=["a", "x" * 101])]) == [
        ("events[0].variant_ids[1]", "string_too_long")
    ]
    assert violations_of([valid(entity_identifiers={"k" * 100: "v" * 100})]) == []
    assert violations_of([valid(entity_identifiers={"sku": "v" * 101})]) == [
        ("events[0].entity_identifiers", "string_too_long")
    ]
    assert violations_of([valid(entity_identifiers={"k" * 101: "v"})]) == [
        ("events[0].entity_identifiers", "string_too_long")
    ]


def test_a_map_violation_names_the_key_shortened() -> None:
    with pytest.raises(InvalidEvents) as caught:
        validate_events([valid(entity_identifiers={"sku": "v" * 101, "k" * 500: "v"})], LIMITS)
    value, key = sorted(caught.value.violations, key=lambda v: "key" in v.description)
    assert "entity_identifiers['sku'] is 101 characters long" in value.description
    assert f"a key of entity_identifiers ('{'k' * 40}...') is 500 characters" in key.description
    assert "k" * 41 not in key.description


def test_string_length_counts_characters_not_bytes() -> None:
    # 100 two-byte characters: 200 bytes of UTF-8, still 100 characters.
    assert violations_of([valid(url="é" * 100)]) == []
    assert violations_of([valid(url="é" * 101)]) == [("events[0].url", "string_too_long")]
    assert violations_of([valid(url="🙂" * 100)]) == []


def test_a_large_event_of_short_strings_is_valid() -> None:
    # Large enough to be scanned, yet every string is within the limit.
    event = event_of_size(900, longest=100)
    assert event.ByteSize() > LIMITS.max_string_length
    assert violations_of([event]) == []


def test_size_violations_come_with_the_other_rules_of_the_request() -> None:
    too_big = event_of_size(1200, longest=100, url="x" * 101)
    assert violations_of([valid(tenant=""), too_big]) == [
        ("events[0].tenant", "string_too_short"),
        ("events[1]", "event_too_large"),
        ("events[1].url", "string_too_long"),
    ]


def test_without_limits_event_violations_checks_only_the_rules() -> None:
    # The client checks events before sending; it cannot know the server's limits.
    assert event_violations(0, valid(url="x" * 100_000)) == []
    assert event_violations(0, valid(url="x" * 101), LIMITS) == [
        FieldViolation(
            "events[0].url",
            "url is 101 characters long; at most 100 are allowed (max_string_length)",
            "string_too_long",
        )
    ]
