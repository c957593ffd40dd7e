"""Keyless storefront intake: registered origins, the tenants they may write, frame ids."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import grpc
import httpx
import pytest
import redis

from events_server.pb import events_pb2 as pb
from events_server.pb import events_pb2_grpc
from events_server.queue.keys import KeySpace
from events_server.server.app import EventsServer
from events_server.server.settings import Settings
from tests.harness.data import ev
from tests.harness.metrics import scrape, server_metrics_url, value
from tests.harness.processes import run_events_server
from tests.harness.rpc import send
from tests.harness.streams import queued


def storefronts(settings: Settings, *args: str, check: bool = True) -> str:
    return run_events_server(settings, "storefronts", *args, check=check).stdout


@pytest.fixture
def origin(settings: Settings, rdb: redis.Redis) -> str:
    """A storefront origin of its own (no cached lookup of another test applies), for shop-a."""
    page = f"https://shop-{uuid.uuid4().hex[:8]}.example"
    storefronts(settings, "add", "--tenant", "shop-a", "--origin", page)
    return page


@pytest.fixture
def keyless(grpc_target: str) -> Iterator[events_pb2_grpc.EventsServiceStub]:
    """A stub that sends no API key."""
    with grpc.insecure_channel(grpc_target) as channel:
        yield events_pb2_grpc.EventsServiceStub(channel)


def test_storefronts_add_list_remove(settings: Settings, rdb: redis.Redis) -> None:
    out = storefronts(
        settings, "add", "--tenant", "shop-a", "--origin", "https://Shop.example:443/",
        "--origin", "http://localhost:3000",
    )  # fmt: skip
    assert "registered https://shop.example  tenants=shop-a" in out
    storefronts(settings, "add", "--tenant", "shop-b", "--origin", "https://shop.example")
    listed = [json.loads(line) for line in storefronts(settings, "list", "--json").splitlines()]
    assert [(f["origin"], f["tenants"]) for f in listed] == [
        ("http://localhost:3000", ["shop-a"]),
        ("https://shop.example", ["shop-a", "shop-b"]),
    ]
    assert "removed https://shop.example for tenant shop-a" in storefronts(
        settings, "remove", "--tenant", "shop-a", "--origin", "https://shop.example"
    )
    storefronts(settings, "remove", "--tenant", "shop-a")  # every origin of shop-a
    listed = [json.loads(line) for line in storefronts(settings, "list", "--json").splitlines()]
    assert [(f["origin"], f["tenants"]) for f in listed] == [("https://shop.example", ["shop-b"])]
    missing = run_events_server(
        settings, "storefronts", "remove", "--tenant", "nobody", check=False
    )
    assert missing.returncode == 1
    assert "no origin registered for 'nobody'" in missing.stderr


@pytest.mark.parametrize("bad", ["null", "*", "https://shop.example/path", "ftp://shop.example"])
def test_storefronts_add_refuses_what_is_not_an_origin(
    settings: Settings, rdb: redis.Redis, bad: str
) -> None:
    done = run_events_server(
        settings, "storefronts", "add", "--tenant", "shop-a", "--origin", bad, check=False
    )
    assert done.returncode == 2
    assert "origin" in done.stderr
    assert storefronts(settings, "list") == ""


def test_a_registered_origin_writes_its_tenant_without_a_key(
    keyless: events_pb2_grpc.EventsServiceStub,
    origin: str,
    rdb: redis.Redis,
    keys: KeySpace,
    grpc_server: tuple[EventsServer, int],
) -> None:
    url = server_metrics_url(grpc_server[0])
    before = value(scrape(url), "events_admitted_requests_total", auth="storefront")
    reply = send(keyless, ev(), metadata=(("grpcgateway-origin", origin),))
    assert reply.accepted == 1
    ((_, envelope),) = queued(rdb, keys)
    assert envelope.api_key_id == ""
    assert envelope.storefront_origin == origin
    assert value(scrape(url), "events_admitted_requests_total", auth="storefront") == before + 1


def test_a_registered_origin_may_not_write_another_tenant(
    keyless: events_pb2_grpc.EventsServiceStub, origin: str, rdb: redis.Redis, keys: KeySpace
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        send(keyless, ev(), ev(tenant="shop-b"), metadata=(("grpcgateway-origin", origin),))
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "events[1].tenant" in str(caught.value.details())
    assert "'shop-b'" in str(caught.value.details())
    assert queued(rdb, keys) == []


def test_an_unregistered_origin_or_none_at_all_is_refused(
    keyless: events_pb2_grpc.EventsServiceStub, rdb: redis.Redis, keys: KeySpace
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        send(keyless, ev(), metadata=(("grpcgateway-origin", "https://nobody.example"),))
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "events[0].tenant: storefront origin 'https://nobody.example' is not registered" in (
        str(caught.value.details())
    )
    assert "'shop-a'" in str(caught.value.details())
    with pytest.raises(grpc.RpcError) as caught:
        send(keyless, ev())
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert queued(rdb, keys) == []


def test_a_frame_id_dedups_an_event_without_a_deduplication_id(
    keyless: events_pb2_grpc.EventsServiceStub, origin: str, rdb: redis.Redis, keys: KeySpace
) -> None:
    # No user, session or dsid: the route too must come from the frame id.
    event = pb.Event(tenant="shop-a", market="us", type=pb.EVENT_TYPE_PAGE_VIEW)
    frame = (("grpcgateway-origin", origin), ("x-ws-message-id", "4d1ccywqn6.2"))
    replies = [send(keyless, event, metadata=frame) for _ in range(5)]
    assert [r.accepted for r in replies] == [1, 0, 0, 0, 0]
    assert len({r.results[0].entry_id for r in replies}) == 1
    other = send(keyless, event, metadata=(frame[0], ("x-ws-message-id", "another")))
    assert other.accepted == 1
    envelopes = [e for _, e in queued(rdb, keys)]
    assert sorted(e.ws_message_id for e in envelopes) == ["4d1ccywqn6.2", "another"]
    assert all(not e.event.HasField("deduplication_id") for e in envelopes)


def test_a_frame_id_carries_one_event_and_is_short(
    keyless: events_pb2_grpc.EventsServiceStub, origin: str, rdb: redis.Redis, keys: KeySpace
) -> None:
    for events, frame_id, field in (((ev(), ev()), "a", "events"), ((ev(),), "x" * 257, "id")):
        metadata = (("grpcgateway-origin", origin), ("x-ws-message-id", frame_id))
        with pytest.raises(grpc.RpcError) as caught:
            send(keyless, *events, metadata=metadata)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in str(caught.value.details())
    assert queued(rdb, keys) == []


def test_origins_check_allows_a_registered_storefront_with_credentials(
    grpc_target: str, origin: str
) -> None:
    with grpc.insecure_channel(grpc_target) as channel:
        check = events_pb2_grpc.OriginsStub(channel).Check
        allowed = check(pb.OriginCheckRequest(origin=origin), timeout=5)
        refused = check(pb.OriginCheckRequest(origin="https://nobody.example"), timeout=5)
    assert (allowed.allowed, allowed.credentials) == (True, True)
    assert not refused.allowed


def test_keyless_http_from_a_registered_page(
    bridge: str, origin: str, rdb: redis.Redis, keys: KeySpace
) -> None:
    event = {"tenant": "shop-a", "market": "us", "type": "page_view"}
    with httpx.Client(base_url=bridge, timeout=10) as client:
        ok = client.post("/create-events", json=[event], headers={"Origin": origin})
        foreign = client.post(
            "/create-events", json=[{**event, "tenant": "shop-b"}], headers={"Origin": origin}
        )
        stranger = client.post(
            "/create-events", json=[event], headers={"Origin": "https://nobody.example"}
        )
        nobody = client.post("/create-events", json=[event])
    assert ok.status_code == 200, ok.text
    assert ok.headers["access-control-allow-origin"] == origin
    assert ok.headers["access-control-allow-credentials"] == "true"
    assert foreign.status_code == 403
    assert "events[0].tenant" in foreign.json()["detail"]
    assert stranger.status_code == 403
    assert nobody.status_code == 401
    ((_, envelope),) = queued(rdb, keys)
    assert envelope.storefront_origin == origin
