"""Service identity: only the REST bridge is believed, and only it files rejected requests.

Here the bridge proves itself with the shared EVENTS_BRIDGE_TOKEN over plaintext (mutual
TLS is in test_tls.py), or, with nothing configured, by calling from this host.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator

import grpc
import httpx
import pytest
import redis

from events_server.pb import events_pb2 as pb
from events_server.pb import events_pb2_grpc
from events_server.queue.keys import KeySpace
from events_server.server.settings import Settings
from events_server.wire.metadata import MD_BRIDGE_TOKEN
from tests.harness.keys import register_storefront
from tests.harness.servers import LoopThread, bridge_settings_for, serving, serving_bridge
from tests.harness.streams import queued
from tests.harness.waiting import eventually

STOREFRONT = "https://shop-a.example"
TOKEN = "the-tests-bridge-token-" + "x" * 16
FORGED = (
    ("x-forwarded-for", "6.6.6.6"),
    ("grpcgateway-user-agent", "Mozilla/5.0 (forged)"),
    ("grpcgateway-referer", "https://forged.example/page"),
    ("x-forwarded-host", "forged.example"),
    # Refused for the session key (it lists no origins), if it were believed.
    ("grpcgateway-origin", "https://forged.example"),
    ("x-ws-message-id", "forged-frame-1"),
)
BROWSER = {"user-agent": "Mozilla/5.0 (tests)", "referer": f"{STOREFRONT}/p/1"}


def event(tenant: str = "t") -> pb.Event:
    return pb.Event(
        tenant=tenant,
        market="us",
        type=pb.EVENT_TYPE_PAGE_VIEW,
        user_id="u-1",
        deduplication_id=uuid.uuid4().hex,
    )


def forged_record(tenant: str = "t") -> pb.RejectedRequest:
    return pb.RejectedRequest(
        tenants=[tenant],
        errors=[pb.RejectedField(field="body", description="forged", reason="forged")],
        payload=b"[]",
        payload_size=2,
    )


def create(target: str, *metadata: tuple[str, str], tenant: str = "t") -> pb.CreateEventsResponse:
    """One CreateEvents call, as a direct gRPC caller (plaintext)."""
    with grpc.insecure_channel(target) as channel:
        reply: pb.CreateEventsResponse = events_pb2_grpc.EventsServiceStub(channel).CreateEvents(
            pb.CreateEventsRequest(events=[event(tenant)]), metadata=metadata, timeout=5
        )
        return reply


def record(target: str, *metadata: tuple[str, str]) -> None:
    """RejectedEvents.Record, as a direct gRPC caller (plaintext)."""
    with grpc.insecure_channel(target) as channel:
        events_pb2_grpc.RejectedEventsStub(channel).Record(
            forged_record(), metadata=metadata, timeout=5
        )


def envelopes(rdb: redis.Redis, keys: KeySpace) -> list[pb.Envelope]:
    return [envelope for _, envelope in queued(rdb, keys)]


@pytest.fixture
def token_server(
    loop: LoopThread, settings: Settings, rdb: redis.Redis, api_key: str
) -> Iterator[str]:
    """A server that knows the bridge by EVENTS_BRIDGE_TOKEN (plaintext); its target."""
    with serving(loop, Settings(**{**settings.model_dump(), "bridge_token": TOKEN})) as (_, target):
        yield target


# --- direct callers ------------------------------------------------------------------


def test_a_tenant_key_calling_record_directly_is_refused_and_writes_nothing(
    token_server: str, api_key: str, rdb: redis.Redis, keys: KeySpace
) -> None:
    for metadata in [
        (("x-api-key", api_key),),
        (("x-api-key", api_key), (MD_BRIDGE_TOKEN, TOKEN[:-1] + "y")),  # a wrong token
        (("grpcgateway-origin", STOREFRONT),),
    ]:
        with pytest.raises(grpc.RpcError) as caught:
            record(token_server, *metadata)
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "RejectedEvents/Record is for the REST bridge only" in str(caught.value.details())
    assert rdb.exists(keys.rejected("t")) == 0
    # The same call with the bridge's credential is filed: the refusal was the identity's.
    record(token_server, ("x-api-key", api_key), (MD_BRIDGE_TOKEN, TOKEN))
    assert rdb.xlen(keys.rejected("t")) == 1


def test_forwarded_context_from_a_direct_caller_is_ignored(
    token_server: str,
    api_key: str,
    rdb: redis.Redis,
    keys: KeySpace,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="events_server.server.identity"):
        # Accepted although the forged origin may not use the key: it was not believed.
        assert create(token_server, ("x-api-key", api_key), *FORGED).accepted == 1
    [envelope] = envelopes(rdb, keys)
    assert envelope.client_ip == "127.0.0.1"  # the peer
    assert envelope.user_agent.startswith("grpc-python")  # its own, not the forged one
    for name in ("referer", "forwarded_host", "storefront_origin", "ws_message_id"):
        assert not envelope.HasField(name), name
    assert "forwarded client context ignored" in caplog.text
    assert "EVENTS_BRIDGE_TOKEN" in caplog.text


def test_the_same_context_with_the_bridge_token_is_believed(
    token_server: str, api_key: str, rdb: redis.Redis, keys: KeySpace
) -> None:
    believed = [kv for kv in FORGED if kv[0] != "grpcgateway-origin"]
    create(token_server, ("x-api-key", api_key), (MD_BRIDGE_TOKEN, TOKEN), *believed)
    [envelope] = envelopes(rdb, keys)
    assert envelope.client_ip == "6.6.6.6"
    assert envelope.user_agent == "Mozilla/5.0 (forged)"
    assert envelope.referer == "https://forged.example/page"
    assert envelope.forwarded_host == "forged.example"
    assert envelope.ws_message_id == "forged-frame-1"


def test_a_direct_caller_without_a_key_naming_a_storefront_origin_is_unauthenticated(
    token_server: str, settings: Settings, rdb: redis.Redis, keys: KeySpace
) -> None:
    register_storefront(settings, "shop-a", STOREFRONT)
    with pytest.raises(grpc.RpcError) as caught:
        create(token_server, ("grpcgateway-origin", STOREFRONT), tenant="shop-a")
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert envelopes(rdb, keys) == []
    # From the bridge, the same origin is keyless storefront intake.
    create(
        token_server, ("grpcgateway-origin", STOREFRONT), (MD_BRIDGE_TOKEN, TOKEN), tenant="shop-a"
    )
    assert [e.storefront_origin for e in envelopes(rdb, keys)] == [STOREFRONT]


# --- the bridge ----------------------------------------------------------------------


def test_the_bridge_with_the_token_is_believed(
    token_server: str, settings: Settings, api_key: str, rdb: redis.Redis, keys: KeySpace
) -> None:
    register_storefront(settings, "shop-a", STOREFRONT)
    bridge = bridge_settings_for(token_server, bridge_token=TOKEN)
    body = [{"tenant": "shop-a", "market": "us", "type": "page_view", "user_id": "u-1"}]
    with serving_bridge(bridge) as url, httpx.Client(base_url=url, timeout=10) as http:
        # Keyless, from the registered storefront: its Origin is believed.
        answer = http.post("/create-events", json=body, headers={"origin": STOREFRONT, **BROWSER})
        assert answer.status_code == 200, answer.text
        # The bridge's own 422 is filed in the tenant's rejected record.
        bad = http.post("/create-events", json=[{"tenant": "t"}], headers={"x-api-key": api_key})
        assert bad.status_code == 422
        eventually(lambda: rdb.exists(keys.rejected("t")) == 1)
    [envelope] = envelopes(rdb, keys)
    assert envelope.storefront_origin == STOREFRONT
    assert envelope.user_agent == BROWSER["user-agent"]
    assert envelope.referer == BROWSER["referer"]
    assert envelope.forwarded_host == url.removeprefix("http://")


def test_a_bridge_without_the_token_is_not_believed(
    token_server: str, settings: Settings, api_key: str, rdb: redis.Redis, keys: KeySpace
) -> None:
    register_storefront(settings, "shop-a", STOREFRONT)
    bridge = bridge_settings_for(token_server)
    body = [{"tenant": "shop-a", "market": "us", "type": "page_view", "user_id": "u-1"}]
    with serving_bridge(bridge) as url, httpx.Client(base_url=url, timeout=10) as http:
        keyless = http.post("/create-events", json=body, headers={"origin": STOREFRONT})
        assert keyless.status_code == 401, keyless.text
        keyed = http.post("/create-events", json=body, headers={"x-api-key": api_key, **BROWSER})
        assert keyed.status_code == 200
        bad = http.post("/create-events", json=[{"tenant": "t"}], headers={"x-api-key": api_key})
        assert bad.status_code == 422
        time.sleep(0.3)  # the report goes out in the background, and is refused
    assert rdb.exists(keys.rejected("t")) == 0
    [envelope] = envelopes(rdb, keys)
    assert envelope.user_agent != BROWSER["user-agent"]
    assert not envelope.HasField("referer")


def test_with_nothing_configured_a_peer_on_this_host_is_the_bridge(
    loop: LoopThread, settings: Settings, api_key: str, rdb: redis.Redis, keys: KeySpace
) -> None:
    # How make run and the README start the two: side by side, nothing shared.
    with serving(loop, settings) as (_, target):
        create(target, ("x-api-key", api_key), ("x-forwarded-for", "203.0.113.9"))
        record(target, ("x-api-key", api_key))
    assert [e.client_ip for e in envelopes(rdb, keys)] == ["203.0.113.9"]
    assert rdb.xlen(keys.rejected("t")) == 1
