"""API keys against the real servers: who may write, to which tenants, from which pages."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace
from typing import Any

import grpc
import httpx
import pytest
import redis

from events_server.pb import events_pb2 as pb
from events_server.pb import events_pb2_grpc
from events_server.queue.connection import connect
from events_server.queue.keys import KeySpace
from events_server.server.app import EventsServer
from events_server.server.auth import (
    ID_PREFIX,
    SECRET_PREFIX,
    ApiKey,
    Authenticator,
    KeyStore,
    digest_of,
)
from events_server.server.errors import PermissionDenied, StoreUnavailable
from events_server.server.lookups import CachedLookup
from events_server.server.metrics import AUTH_FAILURE_KINDS
from events_server.server.settings import Settings
from events_server.server.storefronts import StorefrontStore
from tests.harness.data import ev
from tests.harness.keys import create_key, register_storefront
from tests.harness.metrics import scrape, server_metrics_url, value
from tests.harness.rpc import send
from tests.harness.servers import LoopThread, serving
from tests.harness.streams import queued
from tests.harness.waiting import eventually

EVENT = {"tenant": "shop-a", "market": "us", "type": "click"}


def post(bridge: str, body: object, **headers: str) -> httpx.Response:
    """POST /create-events with exactly these headers (no session key)."""
    return httpx.post(f"{bridge}/create-events", json=body, headers=headers, timeout=10)


# --- who: 401 ---------------------------------------------------------------------------


def test_a_missing_key_is_401_and_says_how_to_send_one(
    bridge: str, rdb: redis.Redis, keys: KeySpace
) -> None:
    answer = post(bridge, [EVENT])
    assert answer.status_code == 401
    assert "missing API key" in answer.json()["detail"]
    assert "X-API-KEY" in answer.json()["detail"]
    assert queued(rdb, keys) == []


@pytest.mark.parametrize("key", ["evk_wrong", "x" * 5000, "", "évk"])
def test_a_wrong_key_is_401_and_nothing_is_queued(
    bridge: str, rdb: redis.Redis, keys: KeySpace, key: str
) -> None:
    answer = httpx.post(
        f"{bridge}/create-events", json=[EVENT], params={"api_key": key}, timeout=10
    )
    assert answer.status_code == 401
    assert answer.json()["detail"] in {"unknown or revoked API key"} or "missing" in answer.text
    assert queued(rdb, keys) == []


def test_grpc_callers_without_a_good_key_are_unauthenticated(grpc_target: str) -> None:
    with grpc.insecure_channel(grpc_target) as channel:
        stub = events_pb2_grpc.EventsServiceStub(channel)
        for metadata in ((), (("x-api-key", "evk_nope"),)):
            with pytest.raises(grpc.RpcError) as caught:
                send(stub, ev(), metadata=metadata)
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_an_invalid_request_without_a_key_learns_only_that_it_needs_one(grpc_target: str) -> None:
    with grpc.insecure_channel(grpc_target) as channel, pytest.raises(grpc.RpcError) as caught:
        send(events_pb2_grpc.EventsServiceStub(channel), ev(tenant="", type=99))
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


# --- which tenants: 403 -----------------------------------------------------------------


def test_a_write_to_a_tenant_the_key_does_not_cover_is_403_and_queues_nothing(
    bridge: str, settings: Settings, rdb: redis.Redis, keys: KeySpace
) -> None:
    key = create_key(settings.redis_url, settings.key_prefix, ["shop-a"])
    mixed = [EVENT, {**EVENT, "tenant": "shop-b"}, EVENT]
    answer = post(bridge, mixed, **{"x-api-key": key})
    assert answer.status_code == 403
    detail = answer.json()["detail"]
    assert "events[1].tenant" in detail
    assert "'shop-b'" in detail
    assert "nothing was queued" in detail
    assert queued(rdb, keys) == []
    assert post(bridge, [EVENT], **{"x-api-key": key}).status_code == 200


def test_a_key_for_several_tenants_writes_to_each(
    bridge: str, settings: Settings, rdb: redis.Redis, keys: KeySpace
) -> None:
    key = create_key(settings.redis_url, settings.key_prefix, ["shop-a", "shop-b"])
    both = [EVENT, {**EVENT, "tenant": "shop-b"}]
    assert post(bridge, both, **{"x-api-key": key}).json()["accepted"] == 2
    assert sorted(e.event.tenant for _, e in queued(rdb, keys)) == ["shop-a", "shop-b"]


def test_the_envelope_records_the_key_id_never_the_key(
    bridge: str, settings: Settings, rdb: redis.Redis, keys: KeySpace
) -> None:
    key = create_key(settings.redis_url, settings.key_prefix, ["shop-a"], label="envelope")
    assert post(bridge, [EVENT], **{"x-api-key": key}).status_code == 200
    [(_, envelope)] = queued(rdb, keys)
    [record] = [k for k in asyncio.run(_list(settings)) if k.label == "envelope"]
    assert envelope.api_key_id == record.id
    assert envelope.api_key_id.startswith(ID_PREFIX)
    assert key not in envelope.SerializeToString().decode("utf-8", "replace")


async def _list(settings: Settings) -> list[ApiKey]:
    client = connect(settings.redis)
    try:
        return list(await KeyStore(client, KeySpace(settings.key_prefix, 1)).list())
    finally:
        await client.aclose()


# --- the key itself ----------------------------------------------------------------------


def test_only_the_digest_is_stored(bridge: str, settings: Settings, rdb: redis.Redis) -> None:
    key = create_key(settings.redis_url, settings.key_prefix, ["shop-a"], label="digest")
    assert key.startswith(SECRET_PREFIX)
    assert len(key) - len(SECRET_PREFIX) >= 43  # 32 random bytes, url-safe base64
    # Used every way, queued and rejected: still nowhere in Redis.
    assert post(bridge, [EVENT], **{"x-api-key": key}).status_code == 200
    bad = httpx.post(f"{bridge}/create-events", params={"api_key": key}, json=[{}], timeout=10)
    assert bad.status_code == 422
    eventually(lambda: bool(list(rdb.scan_iter(match=f"{settings.key_prefix}:rejected:*"))))
    everything = b""
    for name in rdb.scan_iter(count=1000):
        kind = rdb.type(name)
        value: Any
        if kind == b"hash":
            value = rdb.hgetall(name)
        elif kind == b"string":
            value = rdb.get(name)
        elif kind == b"stream":
            value = rdb.xrange(name)
        else:
            value = None
        everything += name + repr(value).encode()
    assert key.encode() not in everything
    assert digest_of(key).encode() in everything


def test_a_revoked_key_stops_working_within_the_cache_time(
    bridge: str, settings: Settings, rdb: redis.Redis
) -> None:
    key = create_key(settings.redis_url, settings.key_prefix, ["shop-a"], label="revoke-me")
    assert post(bridge, [EVENT], **{"x-api-key": key}).status_code == 200

    async def revoke() -> None:
        client = connect(settings.redis)
        try:
            store = KeyStore(client, KeySpace(settings.key_prefix, 1))
            [record] = [k for k in await store.list() if k.label == "revoke-me"]
            assert (await store.revoke(record.id)) is not None
        finally:
            await client.aclose()

    asyncio.run(revoke())
    refused = lambda: post(bridge, [EVENT], **{"x-api-key": key}).status_code == 401  # noqa: E731
    eventually(refused, within=settings.key_cache_seconds + 1)
    assert post(bridge, [EVENT], **{"x-api-key": key}).json()["detail"] == (
        "unknown or revoked API key"
    )


def test_lookups_are_cached_and_redis_trouble_is_unavailable_not_401(
    loop: LoopThread, settings: Settings, rdb: redis.Redis
) -> None:
    secret = create_key(settings.redis_url, settings.key_prefix, ["shop-a"])

    async def scenario() -> tuple[str, type[BaseException]]:
        client = connect(settings.redis)
        auth = Authenticator(KeyStore(client, KeySpace(settings.key_prefix, 1)), 60, ())
        try:
            first = await auth.authenticate(secret)
        finally:
            await client.aclose()
        # The connection is closed: only the cache can answer now.
        again = await auth.authenticate(secret)
        assert again == first
        broken = connect(replace(settings.redis, url="redis://127.0.0.1:1/0"))
        cold = Authenticator(KeyStore(broken, KeySpace(settings.key_prefix, 1)), 60, ())
        try:
            await cold.authenticate(secret)
        except StoreUnavailable as error:
            return first.id, type(error)
        finally:
            await broken.aclose()
        raise AssertionError("a lookup against a dead Redis succeeded")

    key_id, error = loop.run(scenario())
    assert key_id.startswith(ID_PREFIX)
    assert error is StoreUnavailable


def test_a_cached_caller_is_admitted_without_a_lookup_as_admit_admits_it(
    loop: LoopThread, settings: Settings, rdb: redis.Redis
) -> None:
    secret = create_key(
        settings.redis_url, settings.key_prefix, ["shop-a"], origins=["https://a.example"]
    )
    register_storefront(settings, "shop-b", "https://b.example")

    async def scenario() -> None:
        client = connect(settings.redis)
        keys = KeySpace(settings.key_prefix, 1)
        fronts = CachedLookup(StorefrontStore(client, keys).find, 60, "storefront origin")
        auth = Authenticator(KeyStore(client, keys), 60, (), fronts)
        try:
            # Nothing cached yet: admit_known leaves it to admit, which looks it up.
            assert auth.admit_known(secret, None) is None
            assert auth.admit_known(None, "https://b.example") is None
            by_key = await auth.admit(secret, None)
            by_origin = await auth.admit(None, "https://b.example")
            unregistered = await auth.admit(None, "https://c.example")
        finally:
            await client.aclose()
        # The connection is closed: what admit_known answers now, it answers from the cache.
        assert auth.admit_known(secret, None) == by_key
        assert auth.admit_known(secret, "https://a.example") == by_key
        assert auth.admit_known(None, "https://b.example") == by_origin
        assert by_key.tenants == ("shop-a",)
        assert by_origin.tenants == ("shop-b",)
        with pytest.raises(PermissionDenied):
            auth.admit_known(secret, "https://b.example")  # an origin the key does not list
        # What admit refuses, or answers without a record, it is left to say.
        assert unregistered.tenants == ()
        assert auth.admit_known(None, "https://c.example") is None
        assert auth.admit_known("made-up", None) is None

    loop.run(scenario())


# --- origins, as the server enforces them ----------------------------------------------


def test_a_browser_origin_the_key_does_not_list_is_refused_and_queues_nothing(
    grpc_target: str, settings: Settings, rdb: redis.Redis, keys: KeySpace
) -> None:
    key = create_key(
        settings.redis_url, settings.key_prefix, ["shop-a"], origins=["https://shop.example"]
    )
    with grpc.insecure_channel(grpc_target) as channel:
        stub = events_pb2_grpc.EventsServiceStub(channel)
        allowed = (("x-api-key", key), ("grpcgateway-origin", "https://shop.example"))
        assert send(stub, ev(), metadata=allowed).accepted == 1
        for origin in ("https://shop.example.evil", "http://shop.example", "null"):
            with pytest.raises(grpc.RpcError) as caught:
                send(stub, ev(), metadata=(("x-api-key", key), ("grpcgateway-origin", origin)))
            assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "may not use key" in (caught.value.details() or "")
        # No Origin at all: a server-side caller, which only the key limits.
        assert send(stub, ev(), metadata=(("x-api-key", key),)).accepted == 1
    assert len(queued(rdb, keys)) == 2


def test_origins_check_answers_from_the_key_or_from_every_key(
    grpc_target: str, settings: Settings, rdb: redis.Redis
) -> None:
    listed = create_key(
        settings.redis_url, settings.key_prefix, ["shop-a"], origins=["https://a.example"]
    )
    unlisted = create_key(settings.redis_url, settings.key_prefix, ["shop-a"])
    with grpc.insecure_channel(grpc_target) as channel:
        check = events_pb2_grpc.OriginsStub(channel).Check

        def answer(origin: str, key: str | None = None) -> tuple[bool, bool]:
            metadata = (("x-api-key", key),) if key else ()
            reply = check(pb.OriginCheckRequest(origin=origin), metadata=metadata, timeout=5)
            return reply.allowed, reply.credentials

        assert answer("https://a.example", listed) == (True, True)
        assert answer("https://b.example", listed) == (False, False)
        # Without a key (a preflight): listed by some key in force.
        assert answer("https://a.example") == (True, True)
        assert answer("https://a.example.evil") == (False, False)
        assert answer("null") == (False, False)
        # A key without origins falls back to EVENTS_CORS_ORIGINS, empty here.
        assert answer("https://a.example", unlisted) == (False, False)


def test_refused_keys_are_counted_by_kind_and_not_logged_as_warnings(
    bridge: str,
    settings: Settings,
    grpc_server: tuple[EventsServer, int],
    caplog: pytest.LogCaptureFixture,
) -> None:
    key = create_key(
        settings.redis_url, settings.key_prefix, ["shop-a"], origins=["https://a.example"]
    )
    url = server_metrics_url(grpc_server[0])
    before = scrape(url)
    with caplog.at_level(logging.WARNING, logger="events_server.server.service"):
        assert post(bridge, [EVENT]).status_code == 401
        assert post(bridge, [EVENT], **{"x-api-key": "evk_x"}).status_code == 401
        assert post(bridge, [EVENT], **{"x-api-key": "evk_y"}).status_code == 401
        foreign = [{**EVENT, "tenant": "shop-z"}]
        assert post(bridge, foreign, **{"x-api-key": key}).status_code == 403
    after = scrape(url)
    grew = {
        kind: value(after, "events_auth_failures_total", kind=kind)
        - value(before, "events_auth_failures_total", kind=kind)
        for kind in AUTH_FAILURE_KINDS
    }
    assert grew == {
        "missing_key": 1,
        "unknown_key": 2,
        "tenant_not_allowed": 1,
        "origin_not_allowed": 0,
        "origin_not_registered": 0,
    }
    # Refusals are the client's business: no warning for the operator.
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def hget_calls(rdb: redis.Redis) -> int:
    """How many HGETs Redis has answered (a key lookup is one), all clients together."""
    return int(rdb.info("commandstats").get("cmdstat_hget", {}).get("calls", 0))


def test_a_flood_of_made_up_keys_costs_redis_little_and_keys_in_use_keep_working(
    loop: LoopThread, settings: Settings, rdb: redis.Redis
) -> None:
    in_use = create_key(settings.redis_url, settings.key_prefix, ["shop-a"], "in use")
    with (
        serving(loop, settings, peer_unknown_keys_per_second=5) as (_, target),
        grpc.insecure_channel(target) as channel,
    ):
        stub = events_pb2_grpc.EventsServiceStub(channel)

        def answer(secret: str) -> tuple[grpc.StatusCode, str]:
            try:
                send(stub, ev(), metadata=(("x-api-key", secret),))
            except grpc.RpcError as error:
                return error.code(), str(error.details())
            return grpc.StatusCode.OK, ""

        assert answer(in_use)[0] == grpc.StatusCode.OK  # cached as found from here on
        before = hget_calls(rdb)
        answers = {answer(f"{SECRET_PREFIX}made-up-{n}") for n in range(200)}
        looked_up = hget_calls(rdb) - before
        # Every refusal in the same words; Redis asked for the first few only (a burst
        # of 5, plus 5/s while the flood lasted).
        assert answers == {(grpc.StatusCode.UNAUTHENTICATED, "unknown or revoked API key")}
        assert looked_up <= 15
        assert answer(in_use)[0] == grpc.StatusCode.OK
        # A key in force that this process has not seen waits for the address's
        # allowance to come back (a fifth of a second for one lookup at 5/s).
        fresh = create_key(settings.redis_url, settings.key_prefix, ["shop-a"], "fresh")
        eventually(lambda: answer(fresh)[0] == grpc.StatusCode.OK, within=3)


def test_a_key_found_before_keeps_working_once_its_address_spent_its_unknown_key_allowance(
    loop: LoopThread, settings: Settings, rdb: redis.Redis
) -> None:
    # The flood's address is the client's (one NAT, or a proxy not counted in
    # EVENTS_FORWARDED_HOPS): its allowance (one lookup per 5 s) is spent at once.
    in_use = create_key(settings.redis_url, settings.key_prefix, ["shop-a"], "in use")
    shared = settings.model_copy(
        update={"peer_unknown_keys_per_second": 0.2, "key_cache_seconds": 0.05}
    )
    with serving(loop, shared) as (_, target), grpc.insecure_channel(target) as channel:
        stub = events_pb2_grpc.EventsServiceStub(channel)

        def answer(secret: str) -> grpc.StatusCode:
            try:
                send(stub, ev(), metadata=(("x-api-key", secret),))
            except grpc.RpcError as error:
                return error.code()
            return grpc.StatusCode.OK

        assert answer(in_use) == grpc.StatusCode.OK
        assert {answer(f"{SECRET_PREFIX}made-up-{n}") for n in range(20)} == {
            grpc.StatusCode.UNAUTHENTICATED
        }
        time.sleep(0.1)  # the key's cached answer has expired: it is looked up again
        assert answer(in_use) == grpc.StatusCode.OK
        # A key revoked meanwhile is found revoked, allowance or not.
        rdb.hdel(KeySpace(settings.key_prefix, 1).api_key_digests(), digest_of(in_use))
        time.sleep(0.1)
        assert answer(in_use) == grpc.StatusCode.UNAUTHENTICATED
