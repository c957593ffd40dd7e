"""Rate limits against the real servers: per key and per storefront origin, shared by
every server process, answered 429 with Retry-After, counted per caller."""

from __future__ import annotations

import time
import uuid

import grpc
import httpx
import pytest
import redis

from events_server.pb import events_pb2_grpc
from events_server.queue.keys import KeySpace
from events_server.server.app import EventsServer
from events_server.server.routing import partition_for
from events_server.server.settings import Settings
from tests.harness.data import ev
from tests.harness.metrics import scrape, server_metrics_url, value
from tests.harness.processes import run_events_server
from tests.harness.rpc import send
from tests.harness.servers import LoopThread, serving
from tests.harness.streams import queued


def create_limited_key(settings: Settings, *flags: str) -> tuple[str, str]:
    """A key for shop-a with the given rate flags: (its id, its secret)."""
    out = run_events_server(settings, "keys", "create", "--tenant", "shop-a", *flags).stdout
    lines = out.splitlines()
    return lines[0].split()[1], lines[-1]


def attempt(target: str, secret: str, events: int = 1) -> tuple[grpc.StatusCode, str, str]:
    """(code, details, retry-after trailer) of one CreateEvents call."""
    with grpc.insecure_channel(target) as channel:
        stub = events_pb2_grpc.EventsServiceStub(channel)
        try:
            send(
                stub,
                *(ev(user_id=f"u{n}") for n in range(events)),
                metadata=(("x-api-key", secret),),
            )
        except grpc.RpcError as error:
            call: grpc.Call = error  # type: ignore[assignment]  # a failed call is both
            trailers = call.trailing_metadata() or ()
            after = next((str(v) for k, v in trailers if k == "retry-after"), "")
            return error.code(), str(error.details()), after
    return grpc.StatusCode.OK, "", ""


def test_a_key_over_its_request_rate_is_refused_with_retry_after_and_nothing_queued(
    settings: Settings,
    grpc_target: str,
    grpc_server: tuple[EventsServer, int],
    rdb: redis.Redis,
    keys: KeySpace,
) -> None:
    key_id, secret = create_limited_key(
        settings, "--requests-per-second", "2", "--burst-seconds", "1"
    )
    url = server_metrics_url(grpc_server[0])
    before = value(scrape(url), "events_rate_limited_total", auth="key", caller=key_id)
    codes = [attempt(grpc_target, secret) for _ in range(3)]
    assert [c for c, _, _ in codes] == [grpc.StatusCode.OK] * 2 + [
        grpc.StatusCode.RESOURCE_EXHAUSTED
    ]
    _, details, after = codes[2]
    assert "over its rate limit (2 requests/s" in details
    assert after == "1"
    assert len(queued(rdb, keys)) == 2
    assert value(scrape(url), "events_rate_limited_total", auth="key", caller=key_id) == (
        before + 1
    )
    time.sleep(0.6)  # half a second earns one more request
    assert attempt(grpc_target, secret)[0] == grpc.StatusCode.OK


def test_the_limit_is_shared_by_every_server_process(
    loop: LoopThread, settings: Settings, grpc_target: str, rdb: redis.Redis, keys: KeySpace
) -> None:
    # A burst of 3 that refills once in 10 s: the holds of refused calls earn nothing back.
    _, secret = create_limited_key(
        settings, "--requests-per-second", "0.1", "--burst-seconds", "30"
    )
    with serving(loop, settings) as (_, other):
        codes = [attempt(target, secret)[0] for target in (grpc_target, other) * 3]
    assert codes.count(grpc.StatusCode.OK) == 3
    assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 3
    assert len(queued(rdb, keys)) == 3


def test_an_event_rate_counts_events_and_a_request_past_the_burst_is_invalid(
    settings: Settings, grpc_target: str, rdb: redis.Redis, keys: KeySpace
) -> None:
    _, secret = create_limited_key(settings, "--events-per-second", "10", "--burst-seconds", "1")
    assert attempt(grpc_target, secret, events=6)[0] == grpc.StatusCode.OK
    assert attempt(grpc_target, secret, events=6)[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    code, details, _ = attempt(grpc_target, secret, events=11)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "more than its burst of 10" in details
    assert len(queued(rdb, keys)) == 6


def test_keys_limits_changes_a_keys_rates(
    settings: Settings, grpc_target: str, rdb: redis.Redis
) -> None:
    key_id, secret = create_limited_key(settings, "--requests-per-second", "1")
    listed = run_events_server(settings, "keys", "list").stdout
    assert "requests_per_second=1" in listed
    changed = run_events_server(settings, "keys", "limits", key_id, "--requests-per-second", "0")
    assert "limits of" in changed.stdout
    time.sleep(settings.key_cache_seconds + 0.2)  # servers see it within the cache time
    codes = [attempt(grpc_target, secret)[0] for _ in range(5)]
    assert codes == [grpc.StatusCode.OK] * 5
    missing = run_events_server(settings, "keys", "limits", "key_nope", check=False)
    assert missing.returncode == 1


def test_the_bridge_answers_a_rate_limit_429_with_the_servers_retry_after(
    settings: Settings, bridge: str, rdb: redis.Redis
) -> None:
    _, secret = create_limited_key(settings, "--requests-per-second", "1", "--burst-seconds", "1")
    event = {"tenant": "shop-a", "market": "us", "type": "click"}
    with httpx.Client(base_url=bridge, timeout=10, headers={"x-api-key": secret}) as client:
        answers = [client.post("/create-events", json=[event]) for _ in range(2)]
    assert [a.status_code for a in answers] == [200, 429]
    assert answers[1].headers["retry-after"] == "1"
    assert "rate limit" in answers[1].json()["detail"]


def test_a_storefront_origin_has_a_rate_of_its_own(
    loop: LoopThread, settings: Settings, rdb: redis.Redis, keys: KeySpace
) -> None:
    origin = f"https://shop-{uuid.uuid4().hex[:8]}.example"
    run_events_server(settings, "storefronts", "add", "--tenant", "shop-a", "--origin", origin)
    with (
        serving(loop, settings, storefront_requests_per_second=1, rate_burst_seconds=1) as (
            _,
            target,
        ),
        grpc.insecure_channel(target) as channel,
    ):
        stub = events_pb2_grpc.EventsServiceStub(channel)
        send(stub, ev(), metadata=(("grpcgateway-origin", origin),))
        with pytest.raises(grpc.RpcError) as caught:
            send(stub, ev(), metadata=(("grpcgateway-origin", origin),))
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"sf:{origin}" in str(caught.value.details())
    assert len(queued(rdb, keys)) == 1


def evalsha_calls(rdb: redis.Redis) -> int:
    """How many script calls Redis has run (EVALSHA), all clients together."""
    stats = rdb.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


def test_a_single_event_is_charged_and_written_in_one_round_trip(
    settings: Settings, grpc_target: str, rdb: redis.Redis, keys: KeySpace
) -> None:
    _, secret = create_limited_key(settings, "--requests-per-second", "100")
    assert attempt(grpc_target, secret)[0] == grpc.StatusCode.OK  # scripts cached
    before = evalsha_calls(rdb)
    assert [attempt(grpc_target, secret)[0] for _ in range(5)] == [grpc.StatusCode.OK] * 5
    # One script call each: the charge and the write, in one script.
    assert evalsha_calls(rdb) - before == 5
    # Events for several partitions: the charge is a call before the write's.
    users = [f"spread-{n}" for n in range(20)]
    partitions = {partition_for(ev(user_id=user), settings.partitions) for user in users}
    assert len(partitions) > 1
    before = evalsha_calls(rdb)
    with grpc.insecure_channel(grpc_target) as channel:
        send(
            events_pb2_grpc.EventsServiceStub(channel),
            *(ev(user_id=user) for user in users),
            metadata=(("x-api-key", secret),),
        )
    assert evalsha_calls(rdb) - before == 1 + len(partitions)
    assert len(queued(rdb, keys)) == 6 + len(users)


def test_a_write_redis_refuses_charges_nothing(
    settings: Settings, grpc_target: str, rdb: redis.Redis, keys: KeySpace
) -> None:
    # One request per 10 s: a charge taken by the refused write would refuse the next.
    _, secret = create_limited_key(settings, "--requests-per-second", "0.1", "--burst-seconds", "1")
    partition = partition_for(ev(user_id="u0"), settings.partitions)
    rdb.set(keys.stream(partition), "not a stream")
    code, details, _ = attempt(grpc_target, secret)
    assert code == grpc.StatusCode.UNAVAILABLE
    assert "WRONGTYPE" in details
    rdb.delete(keys.stream(partition))
    assert attempt(grpc_target, secret)[0] == grpc.StatusCode.OK
    assert attempt(grpc_target, secret)[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert len(queued(rdb, keys)) == 1
