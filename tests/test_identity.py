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
from pydantic import SecretStr, ValidationError

from events_server.pb import events_pb2 as pb
from events_server.pb import events_pb2_grpc
from events_server.queue.keys import KeySpace
from events_server.server.identity import BridgeIdentity
from events_server.server.settings import Settings
from events_server.wire.addresses import is_local_address, is_local_peer
from events_server.wire.metadata import MD_BRIDGE_TOKEN
from rest_bridge.cli import settings_to_env
from rest_bridge.config import BridgeSettings
from tests.tls_support import (
    STOREFRONT,
    BridgeThread,
    Loop,
    envelopes,
    register_storefront,
    server_settings,
    serving,
)

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


def wait_for(condition: object, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if callable(condition) and condition():
            return True
        time.sleep(0.02)
    return False


@pytest.fixture
def token_server(loop: Loop, settings: Settings, rdb: redis.Redis, api_key: str) -> Iterator[str]:
    """A server that knows the bridge by EVENTS_BRIDGE_TOKEN (plaintext); its target."""
    with serving(loop, server_settings(settings, bridge_token=TOKEN)) as (_, target):
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
    register_storefront(settings)
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
    register_storefront(settings)
    bridge = BridgeSettings(grpc_target=token_server, bridge_token=TOKEN, log_level="WARNING")
    body = [{"tenant": "shop-a", "market": "us", "type": "page_view", "user_id": "u-1"}]
    with BridgeThread(bridge) as served, httpx.Client(base_url=served.url, timeout=10) as http:
        # Keyless, from the registered storefront: its Origin is believed.
        answer = http.post("/create-events", json=body, headers={"origin": STOREFRONT, **BROWSER})
        assert answer.status_code == 200, answer.text
        # The bridge's own 422 is filed in the tenant's rejected record.
        bad = http.post("/create-events", json=[{"tenant": "t"}], headers={"x-api-key": api_key})
        assert bad.status_code == 422
        assert wait_for(lambda: rdb.exists(keys.rejected("t")) == 1)
    [envelope] = envelopes(rdb, keys)
    assert envelope.storefront_origin == STOREFRONT
    assert envelope.user_agent == BROWSER["user-agent"]
    assert envelope.referer == BROWSER["referer"]
    assert envelope.forwarded_host == f"127.0.0.1:{served.port}"


def test_a_bridge_without_the_token_is_not_believed(
    token_server: str, settings: Settings, api_key: str, rdb: redis.Redis, keys: KeySpace
) -> None:
    register_storefront(settings)
    bridge = BridgeSettings(grpc_target=token_server, log_level="WARNING")
    body = [{"tenant": "shop-a", "market": "us", "type": "page_view", "user_id": "u-1"}]
    with BridgeThread(bridge) as served, httpx.Client(base_url=served.url, timeout=10) as http:
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
    loop: Loop, settings: Settings, api_key: str, rdb: redis.Redis, keys: KeySpace
) -> None:
    # How make run and the README start the two: side by side, nothing shared.
    with serving(loop, settings) as (_, target):
        create(target, ("x-api-key", api_key), ("x-forwarded-for", "203.0.113.9"))
        record(target, ("x-api-key", api_key))
    assert [e.client_ip for e in envelopes(rdb, keys)] == ["203.0.113.9"]
    assert rdb.xlen(keys.rejected("t")) == 1


# --- the decision's parts ------------------------------------------------------------


@pytest.mark.parametrize(
    ("peer", "local"),
    [
        ("ipv4:127.0.0.1:5000", True),
        ("ipv4:127.8.0.1:5000", True),
        ("ipv6:[::1]:5000", True),
        ("ipv6:[::ffff:127.0.0.1]:5000", True),
        ("unix:/run/events.sock", True),
        ("unix:", True),
        ("ipv4:10.0.0.7:5000", False),
        ("ipv6:[2001:db8::1]:5000", False),
        ("ipv6:[fe80::1%eth0]:5000", False),
        ("", False),
    ],
)
def test_which_peers_are_on_this_host(peer: str, local: bool) -> None:
    assert is_local_peer(peer) is local


@pytest.mark.parametrize(
    ("address", "local"),
    [
        ("127.0.0.1:50051", True),
        ("localhost:50051", True),
        ("[::1]:50051", True),
        ("unix:/run/events.sock", True),
        ("dns:///localhost:50051", True),
        ("0.0.0.0:50051", False),
        ("[::]:50051", False),
        ("events.internal:50051", False),
        ("10.0.0.7:50051", False),
    ],
)
def test_which_addresses_are_on_this_host(address: str, local: bool) -> None:
    assert is_local_address(address) is local


def test_a_server_open_to_other_hosts_without_an_identity_warns() -> None:
    warning = BridgeIdentity().startup_warning("0.0.0.0:50051")
    assert warning is not None
    assert "no bridge identity is configured" in warning
    assert BridgeIdentity().startup_warning("127.0.0.1:50051") is None
    assert BridgeIdentity(token=TOKEN).startup_warning("0.0.0.0:50051") is None
    assert BridgeIdentity(client_certificates=True).startup_warning("[::]:50051") is None


def test_identity_modes_are_described() -> None:
    assert BridgeIdentity().mode == "loopback"
    assert BridgeIdentity(token=TOKEN).mode == "token"
    assert BridgeIdentity(token=TOKEN, client_certificates=True).mode == "mtls+token"
    named = BridgeIdentity(client_certificates=True, names=["bridge.internal"])
    assert "bridge.internal" in named.describe()


def test_the_token_must_be_long_and_printable() -> None:
    with pytest.raises(ValidationError, match="at least 16 printable ASCII"):
        Settings(bridge_token="short")
    with pytest.raises(ValidationError, match="at least 16 printable ASCII"):
        BridgeSettings(bridge_token="é" * 20)
    assert Settings(bridge_token="").bridge_token is None  # empty: unset
    token = BridgeSettings(bridge_token=TOKEN).bridge_token
    assert isinstance(token, SecretStr)
    assert TOKEN not in repr(BridgeSettings(bridge_token=TOKEN))


def test_bridge_workers_get_the_token_through_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = BridgeSettings(bridge_token=TOKEN, grpc_target="127.0.0.1:1")
    for name, value in settings_to_env(settings).items():
        monkeypatch.setenv(name, value)
    again = BridgeSettings()
    assert again.bridge_token is not None
    assert again.bridge_token.get_secret_value() == TOKEN
    assert again == settings
