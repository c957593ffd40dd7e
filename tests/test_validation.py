"""The server's own rules, which direct gRPC callers meet without the bridge's schema."""

from __future__ import annotations

import pytest

from events_server.errors import InvalidEvents
from events_server.pb import events_pb2 as pb
from events_server.validation import event_violations, validate_events


def valid(**fields: object) -> pb.Event:
    base: dict[str, object] = {"tenant": "t", "market": "us", "type": pb.EVENT_TYPE_CLICK}
    base.update(fields)
    return pb.Event(**base)  # type: ignore[arg-type]


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
        validate_events([valid(), valid(tenant="", market=""), valid(type=0)])
    assert [v.field for v in caught.value.violations] == [
        "events[1].tenant",
        "events[1].market",
        "events[2].type",
    ]
    assert "3 field violations" in str(caught.value)
