"""The rejected-requests record: a bounded entry per tenant for each request refused as invalid."""

from __future__ import annotations

import json
import time
from typing import Any

import grpc
import httpx
import pytest
import redis
from redis.asyncio import Redis as AsyncRedis

from events_server.pb import events_pb2 as pb
from events_server.pb import events_pb2_grpc
from events_server.queue.keys import KeySpace
from events_server.server.rejected import RejectedLog
from events_server.server.settings import Settings
from events_server.wire.rejected import (
    MAX_ERROR_CHARS,
    MAX_ERRORS,
    MAX_ERRORS_BYTES,
    MAX_TENANTS,
    PAYLOAD_LIMIT,
)
from tests.harness.data import ev
from tests.harness.keys import create_key
from tests.harness.processes import tail
from tests.harness.proxy import proxy_to
from tests.harness.rpc import keyed_channel, send
from tests.harness.servers import LoopThread, serving
from tests.harness.streams import records, wait_for_records
from tests.harness.valkey import SessionValkey
from tests.harness.waiting import eventually
from tests.harness.web import keyed_client


def test_a_bridge_422_leaves_a_record_for_the_tenant(
    http: httpx.Client, rdb: redis.Redis, keys: KeySpace
) -> None:
    body = [{"tenant": "shop-dl", "market": "us", "type": "clack", "user_id": "u"}]
    answer = http.post("/create-events", json=body)
    assert answer.status_code == 422
    [record] = wait_for_records(rdb, keys, "shop-dl")
    assert record[b"tenant"] == b"shop-dl"
    assert record[b"source"] == b"http"
    assert record[b"at"].endswith(b"Z")
    [error] = json.loads(record[b"errors"])
    assert error["field"] == "body.0.type"
    assert error["reason"] == "enum"
    assert json.loads(record[b"payload"]) == body
    assert int(record[b"payload_size"]) == len(record[b"payload"])


def test_the_payload_is_cut_to_a_few_kib_and_its_size_kept(
    http: httpx.Client, rdb: redis.Redis, keys: KeySpace
) -> None:
    event = {"tenant": "shop-big", "market": "us", "type": "nope", "url": "x" * 20_000}
    answer = http.post("/create-events", json=[event])
    assert answer.status_code == 422
    [record] = wait_for_records(rdb, keys, "shop-big")
    assert len(record[b"payload"]) == PAYLOAD_LIMIT
    assert int(record[b"payload_size"]) > 20_000


def test_a_grpc_rejection_is_recorded_by_the_server(
    stub: events_pb2_grpc.EventsServiceStub, rdb: redis.Redis, keys: KeySpace
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        send(stub, ev(tenant="shop-g", type=99))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    [record] = wait_for_records(rdb, keys, "shop-g")
    assert record[b"source"] == b"grpc"
    [error] = json.loads(record[b"errors"])
    assert error == {
        "field": "events[0].type",
        "description": "type 99 is not a known EventType",
        "reason": "enum",
    }
    assert json.loads(record[b"payload"])[0]["tenant"] == "shop-g"


def test_a_request_refused_by_the_server_via_the_bridge_is_recorded_once(
    http: httpx.Client, rdb: redis.Redis, keys: KeySpace
) -> None:
    # Valid JSON for the bridge; the server refuses the empty market.
    answer = http.post(
        "/create-events", json=[{"tenant": "shop-1x", "market": "", "type": "click"}]
    )
    assert answer.status_code == 422
    wait_for_records(rdb, keys, "shop-1x")
    time.sleep(0.3)  # a second record, if any, would be written by now
    [record] = records(rdb, keys, "shop-1x")
    assert record[b"source"] == b"grpc"


def test_each_named_tenant_gets_the_record_up_to_a_few(
    http: httpx.Client, rdb: redis.Redis, keys: KeySpace
) -> None:
    body = [{"tenant": f"shop-m{n}", "market": "us", "type": "bad"} for n in range(MAX_TENANTS + 2)]
    assert http.post("/create-events", json=body).status_code == 422
    for n in range(MAX_TENANTS):
        assert len(wait_for_records(rdb, keys, f"shop-m{n}")) == 1
    time.sleep(0.3)
    found = {key.decode() for key in rdb.scan_iter(match=keys.rejected_pattern())}
    assert found == {keys.rejected(f"shop-m{n}") for n in range(MAX_TENANTS)}


def test_a_request_naming_none_of_its_keys_tenants_is_recorded_for_the_keys_tenant(
    bridge: str, settings: Settings, rdb: redis.Redis, keys: KeySpace
) -> None:
    own = create_key(settings.redis_url, settings.key_prefix, ["shop-own"])
    with keyed_client(bridge, own) as client:
        for body in (b"[{not json", b'{"tenant": "shop-o"}', b'[{"market": "us", "type": "c"}]'):
            answer = client.post(
                "/create-events", content=body, headers={"content-type": "application/json"}
            )
            assert answer.status_code == 422
    found = wait_for_records(rdb, keys, "shop-own", 3)
    fields = sorted(json.loads(r[b"errors"])[0]["field"] for r in found)  # sent in the background
    assert fields == ["body", "body.0.tenant", "body.2"]
    assert {key.decode() for key in rdb.scan_iter(match=keys.rejected_pattern())} == {
        keys.rejected("shop-own")
    }


def test_a_request_without_a_valid_key_is_not_recorded(
    bridge: str, http: httpx.Client, rdb: redis.Redis, keys: KeySpace
) -> None:
    body = [{"tenant": "shop-o", "market": "us", "type": "x"}]
    with httpx.Client(base_url=bridge, timeout=10) as anonymous:
        # Refused before the body is read (rest_bridge.admission): who comes first.
        assert anonymous.post("/create-events", json=body).status_code == 401
        wrong = {"x-api-key": "evk_not-a-key"}
        assert anonymous.post("/create-events", json=body, headers=wrong).status_code == 401
    # A recorded rejection sent last: once it is there, the others had their chance.
    http.post("/create-events", json=[{"tenant": "shop-last", "market": "us", "type": "x"}])
    wait_for_records(rdb, keys, "shop-last")
    found = {key.decode() for key in rdb.scan_iter(match=keys.rejected_pattern())}
    assert found == {keys.rejected("shop-last")}


def test_streams_are_capped_approximately(
    loop: LoopThread, settings: Settings, rdb: redis.Redis, keys: KeySpace
) -> None:
    cap = 50

    async def write(n: int) -> None:
        client = AsyncRedis.from_url(settings.redis_url)
        log = RejectedLog(client, keys, maxlen=cap, timeout_seconds=5)
        try:
            for i in range(n):
                request = pb.RejectedRequest(tenants=["shop-cap"], payload=b"%d" % i)
                await log.record(request, "test")
        finally:
            await client.aclose()

    loop.run(write(1000))
    length = int(rdb.xlen(keys.rejected("shop-cap")))
    # MAXLEN ~ trims whole radix-tree nodes (100 entries by default): at least the cap
    # is kept, and never much more.
    assert cap <= length <= cap + 100
    newest: Any = rdb.xrevrange(keys.rejected("shop-cap"), count=1)
    assert newest[0][1][b"payload"] == b"999"


def test_a_rejection_is_not_delayed_by_a_hung_redis(
    api_key: str, loop: LoopThread, valkey: SessionValkey, settings: Settings
) -> None:
    with (
        proxy_to(valkey.url) as proxy,
        serving(loop, settings.model_copy(update={"redis_url": proxy.url})) as (_, target),
        keyed_channel(target, api_key) as channel,
    ):
        send(events_pb2_grpc.EventsServiceStub(channel), ev())  # the key's lookup is cached
        proxy.set_mode("blackhole")  # the record cannot be written: it must not hold the answer
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as caught:
            send(events_pb2_grpc.EventsServiceStub(channel), ev(tenant="shop-hung", type=99))
        took = time.monotonic() - started
        proxy.set_mode("pass")
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert took < settings.redis_timeout_seconds / 2


def test_tail_rejected_prints_the_records(
    http: httpx.Client, settings: Settings, rdb: redis.Redis, keys: KeySpace
) -> None:
    for tenant, kind in (("shop-t1", "a"), ("shop-t2", "b"), ("shop-t1", "c")):
        body = [{"tenant": tenant, "market": "us", "type": kind}]
        assert http.post("/create-events", json=body).status_code == 422
        wait_for_records(rdb, keys, tenant, 2 if kind == "c" else 1)

    every = tail(settings, "--rejected")
    assert [(r["tenant"], json.loads(r["payload"])[0]["type"]) for r in every] == [
        ("shop-t1", "a"),
        ("shop-t2", "b"),
        ("shop-t1", "c"),
    ]
    first = every[0]
    assert first["source"] == "http"
    assert first["errors"][0]["field"] == "body.0.type"
    assert first["truncated"] is False
    assert [r["tenant"] for r in tail(settings, "--rejected", "--tenant", "shop-t2")] == ["shop-t2"]
    [newest] = tail(settings, "--rejected", "--count", "1")
    assert json.loads(newest["payload"])[0]["type"] == "c"


def test_record_rpc_keeps_every_record_bounded(
    channel: grpc.Channel, rdb: redis.Redis, keys: KeySpace
) -> None:
    # What a careless (or hostile) internal caller could send: all of it is cut.
    request = pb.RejectedRequest(
        tenants=[f"shop-r{n}" for n in range(10)] + ["", "x" * 10_000],
        errors=[pb.RejectedField(field="f" * 2_000, description="d", reason="r")] * 100,
        payload=b"p" * 100_000,
        payload_size=100_000,
    )
    events_pb2_grpc.RejectedEventsStub(channel).Record(request, timeout=5)
    found = sorted(key.decode() for key in rdb.scan_iter(match=keys.rejected_pattern()))
    assert found == sorted(keys.rejected(f"shop-r{n}") for n in range(MAX_TENANTS))
    [record] = records(rdb, keys, "shop-r0")
    errors = json.loads(record[b"errors"])
    # Cut in count (MAX_ERRORS), in characters per field, and in bytes per record: as many
    # whole errors as fit, then one saying how many of the MAX_ERRORS were not kept.
    assert len(record[b"errors"]) <= MAX_ERRORS_BYTES
    assert len(errors[0]["field"]) == MAX_ERROR_CHARS
    kept, last = errors[:-1], errors[-1]
    assert all(e == errors[0] for e in kept)
    assert last["description"] == f"{MAX_ERRORS - len(kept)} more errors not kept"
    assert len(record[b"payload"]) == PAYLOAD_LIMIT
    assert int(record[b"payload_size"]) == 100_000


def test_a_request_over_a_limit_is_recorded_with_the_limit(
    stub: events_pb2_grpc.EventsServiceStub, rdb: redis.Redis, keys: KeySpace, settings: Settings
) -> None:
    events = [ev(tenant="shop-cap")] * (settings.max_events_per_request + 1)
    with pytest.raises(grpc.RpcError) as caught:
        send(stub, *events)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    [record] = wait_for_records(rdb, keys, "shop-cap")
    assert record[b"source"] == b"grpc"
    [error] = json.loads(record[b"errors"])
    assert (error["field"], error["reason"]) == ("events", "too_many_events")
    assert "max_events_per_request" in error["description"]
    assert int(record[b"payload_size"]) == pb.CreateEventsRequest(events=events).ByteSize()
    assert len(record[b"payload"]) == PAYLOAD_LIMIT


def test_a_callers_records_are_held_to_its_share_and_another_callers_are_still_written(
    loop: LoopThread, settings: Settings, rdb: redis.Redis, keys: KeySpace
) -> None:
    flooding = create_key(settings.redis_url, settings.key_prefix, ["shop-share"], "flood")
    other = create_key(settings.redis_url, settings.key_prefix, ["shop-share"], "other")
    with serving(loop, settings, rejected_records_per_second=1) as (_, target):
        with keyed_channel(target, flooding) as channel:
            stub = events_pb2_grpc.EventsServiceStub(channel)
            started = time.monotonic()
            for n in range(40):
                with pytest.raises(grpc.RpcError) as caught:
                    send(stub, ev(tenant="shop-share", type=99, user_id=f"flood-{n}"))
                # Refused as ever, recorded or not.
                assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            took = time.monotonic() - started
        with keyed_channel(target, other) as channel, pytest.raises(grpc.RpcError):
            send(
                events_pb2_grpc.EventsServiceStub(channel),
                ev(tenant="shop-share", type=99, user_id="other"),
            )
        eventually(
            lambda: any(b'"other"' in r[b"payload"] for r in records(rdb, keys, "shop-share"))
        )
        time.sleep(0.2)  # the flood's last records were written before, in the background
    flood = [r for r in records(rdb, keys, "shop-share") if b'"flood-' in r[b"payload"]]
    # A burst of ten, then one a second.
    assert 10 <= len(flood) <= 10 + int(took) + 1
