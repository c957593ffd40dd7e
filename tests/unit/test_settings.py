"""Settings refused at start-up: what the server and the bridge cannot run with."""

from __future__ import annotations

import pydantic
import pytest
from pydantic import ValidationError

from events_server.server.settings import Settings
from rest_bridge.config import MIN_JSON_DEPTH, BridgeSettings


def test_workers_need_a_fixed_tcp_port() -> None:
    with pytest.raises(ValidationError, match="fixed TCP port"):
        Settings(grpc_addr="127.0.0.1:0", workers=2)
    with pytest.raises(ValidationError, match="fixed TCP port"):
        Settings(grpc_addr="unix:/tmp/events.sock", workers=2)


def test_max_request_bytes_must_hold_one_event_of_max_event_bytes() -> None:
    # One event of 65533 bytes is a 65537-byte request (a tag byte, a 3-byte length).
    base = {**Settings().model_dump(), "max_event_bytes": 65_533}
    assert Settings(**{**base, "max_request_bytes": 65_537}).max_request_bytes == 65_537
    with pytest.raises(ValidationError, match="at least 65537"):
        Settings(**{**base, "max_request_bytes": 65_536})


def test_replica_confirmation_is_on_by_default_on_a_cluster_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The documented deployment (a cluster, a replica per primary) acknowledges only
    # replicated writes; one Redis with no replica (make run) keeps working as it did.
    assert Settings().replicas_to_confirm == 0
    assert Settings(redis_cluster=True).replicas_to_confirm == 1
    monkeypatch.setenv("EVENTS_CONFIRM_REPLICAS", "0")
    assert Settings(redis_cluster=True).replicas_to_confirm == 0
    monkeypatch.setenv("EVENTS_CONFIRM_REPLICAS", "2")
    assert Settings().replicas_to_confirm == 2
    monkeypatch.setenv("EVENTS_CONFIRM_REPLICAS", "Auto")
    assert Settings(durability="fsync", redis_cluster=True).replicas_to_confirm == 1
    for wrong in ("-1", "some", "17"):
        monkeypatch.setenv("EVENTS_CONFIRM_REPLICAS", wrong)
        with pytest.raises(ValidationError, match="confirm_replicas"):
            Settings()


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("max_json_depth", MIN_JSON_DEPTH - 1),
        ("max_json_depth", 257),
        ("max_body_bytes", 0),
        ("max_body_bytes", 2 * 1024 * 1024 + 1),
        ("cors_cache_seconds", -1),
    ],
)
def test_limits_out_of_range_are_refused_at_start_up(setting: str, value: int) -> None:
    with pytest.raises(pydantic.ValidationError, match=setting):
        BridgeSettings.model_validate({setting: value})
