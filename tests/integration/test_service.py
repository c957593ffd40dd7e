"""CreateEvents over real gRPC against real Valkey: validation, dedup, atomicity, context."""

from __future__ import annotations

import time

import grpc
import pytest
import redis

from events_server.pb import events_pb2_grpc
from events_server.queue.keys import KeySpace
from events_server.server.auth import ApiKey
from events_server.server.routing import partition_for
from events_server.server.settings import Settings
from tests.harness.data import ev, event_of_size, request_size
from tests.harness.rpc import (
    ACCEPTED,
    DUPLICATE,
    send,
    statuses,
    violation_details,
    violations,
)
from tests.harness.servers import LoopThread, serving_stub
from tests.harness.streams import queued

# --- dedup -------------------------------------------------------------------------


def test_same_id_across_requests_is_queued_once(
    stub: events_pb2_grpc.EventsServiceStub, rdb: redis.Redis, keys: KeySpace
) -> None:
    first = send(stub, ev(deduplication_id="order-1"))
    again = send(stub, ev(deduplication_id="order-1"))
    assert statuses(first) == [ACCEPTED]
    assert statuses(again) == [DUPLICATE]
    assert (again.accepted, again.duplicates) == (0, 1)
    # A duplicate points at the entry its first copy made.
    assert again.results[0].entry_id == first.results[0].entry_id
    assert len(queued(rdb, keys)) == 1


def test_same_id_within_one_request_is_queued_once(
    stub: events_pb2_grpc.EventsServiceStub, rdb: redis.Redis, keys: KeySpace
) -> None:
    reply = send(stub, ev(deduplication_id="x"), ev(deduplication_id="y"), ev(deduplication_id="x"))
    assert statuses(reply) == [ACCEPTED, ACCEPTED, DUPLICATE]
    assert (reply.accepted, reply.duplicates) == (2, 1)
    assert sorted(e.event.deduplication_id for _, e in queued(rdb, keys)) == ["x", "y"]


def test_same_id_from_two_tenants_is_queued_twice(
    stub: events_pb2_grpc.EventsServiceStub, rdb: redis.Redis, keys: KeySpace
) -> None:
    reply = send(
        stub, ev(tenant="shop-a", deduplication_id="1"), ev(tenant="shop-b", deduplication_id="1")
    )
    assert statuses(reply) == [ACCEPTED, ACCEPTED]
    assert sorted(e.event.tenant for _, e in queued(rdb, keys)) == ["shop-a", "shop-b"]


def test_events_without_an_id_are_queued_every_time(
    stub: events_pb2_grpc.EventsServiceStub, rdb: redis.Redis, keys: KeySpace
) -> None:
    for _ in range(3):
        assert statuses(send(stub, ev(), ev())) == [ACCEPTED, ACCEPTED]
    assert len(queued(rdb, keys)) == 6


def test_an_id_is_queued_again_after_the_ttl(
    session_key: tuple[ApiKey, str],  # not api_key: the cluster tests run this one too
    loop: LoopThread,
    settings: Settings,
    rdb: redis.Redis,
    keys: KeySpace,
) -> None:
    short = settings.model_copy(update={"dedup_ttl_seconds": 1})

    with serving_stub(loop, short, session_key[1]) as (_, _, short_stub):
        assert statuses(send(short_stub, ev(deduplication_id="t"))) == [ACCEPTED]
        assert statuses(send(short_stub, ev(deduplication_id="t"))) == [DUPLICATE]
        event = ev(deduplication_id="t")
        ttl_ms = rdb.pttl(keys.dedup(partition_for(event, keys.partitions), "shop-a", "t"))
        assert 0 < ttl_ms <= 1000  # set in seconds (EX), as configured
        time.sleep(1.2)
        assert statuses(send(short_stub, ev(deduplication_id="t"))) == [ACCEPTED]
    assert len(queued(rdb, keys)) == 2


def test_retries_land_in_the_partition_of_the_first_attempt(
    stub: events_pb2_grpc.EventsServiceStub,
) -> None:
    partitions = {
        send(stub, ev(user_id="u-9", deduplication_id=f"{i}")).results[0].partition
        for i in range(5)
    }
    assert len(partitions) == 1


# --- validation --------------------------------------------------------------------


def test_one_invalid_event_rejects_the_whole_request(
    stub: events_pb2_grpc.EventsServiceStub, rdb: redis.Redis, keys: KeySpace
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        send(stub, ev(), ev(tenant="", dsid=""), ev(type=0))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violations(caught.value) == [
        ("events[1].tenant", "string_too_short"),
        ("events[1].dsid", "string_too_short"),
        ("events[2].type", "missing"),
    ]
    assert queued(rdb, keys) == []


def test_unknown_type_numbers_are_rejected(stub: events_pb2_grpc.EventsServiceStub) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        send(stub, ev(type=42))
    assert violations(caught.value) == [("events[0].type", "enum")]


def test_an_empty_request_is_ok(stub: events_pb2_grpc.EventsServiceStub) -> None:
    reply = send(stub)
    assert (list(reply.results), reply.accepted, reply.duplicates) == ([], 0, 0)


# --- the envelope ------------------------------------------------------------------


def test_envelope_keeps_the_event_and_what_the_server_knew(
    stub: events_pb2_grpc.EventsServiceStub, rdb: redis.Redis, keys: KeySpace
) -> None:
    event = ev(variant_ids=["v1", "v2"], entity_identifiers={"sku": "1"}, session_id="")
    before = time.time()
    send(
        stub,
        event,
        metadata=(
            ("grpcgateway-user-agent", "Mozilla/5.0"),
            ("grpcgateway-referer", "https://shop.example/p/1"),
            # The left entry came from the client and could be forged; the
            # right one was appended by the bridge.
            ("x-forwarded-for", "6.6.6.6, 203.0.113.9"),
            ("x-forwarded-host", "shop.example"),
        ),
    )
    [(_, envelope)] = queued(rdb, keys)
    assert envelope.event == event
    assert envelope.event.HasField("session_id")
    assert envelope.client_ip == "203.0.113.9"
    assert envelope.user_agent == "Mozilla/5.0"
    assert envelope.referer == "https://shop.example/p/1"
    assert envelope.forwarded_host == "shop.example"
    assert before - 1 <= envelope.received_at.ToNanoseconds() / 1e9 <= time.time() + 1


def test_direct_callers_are_known_by_their_peer(
    stub: events_pb2_grpc.EventsServiceStub, rdb: redis.Redis, keys: KeySpace
) -> None:
    send(stub, ev())
    [(_, envelope)] = queued(rdb, keys)
    assert envelope.client_ip == "127.0.0.1"
    assert envelope.user_agent.startswith("grpc-python")
    assert not envelope.HasField("referer")
    assert not envelope.HasField("forwarded_host")


# --- atomicity ---------------------------------------------------------------------


def test_failed_append_leaves_no_dedup_key_and_a_retry_queues_once(
    stub: events_pb2_grpc.EventsServiceStub, rdb: redis.Redis, keys: KeySpace
) -> None:
    events = [ev(deduplication_id="a"), ev(deduplication_id="b"), ev()]
    partition = partition_for(events[0], keys.partitions)
    rdb.set(keys.stream(partition), "not a stream")  # the append will fail: WRONGTYPE
    with pytest.raises(grpc.RpcError) as caught:
        send(stub, *events)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "WRONGTYPE" in (caught.value.details() or "")
    assert list(rdb.scan_iter(match=keys.dedup_pattern())) == []

    rdb.delete(keys.stream(partition))  # heal
    assert statuses(send(stub, *events)) == [ACCEPTED, ACCEPTED, ACCEPTED]
    assert statuses(send(stub, *events[:2])) == [DUPLICATE, DUPLICATE]
    assert sorted(e.event.deduplication_id for _, e in queued(rdb, keys)) == ["", "a", "b"]


def test_refused_write_leaves_nothing_behind(
    stub: events_pb2_grpc.EventsServiceStub, full_valkey: redis.Redis, keys: KeySpace
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        send(stub, ev(deduplication_id="oom"))
    # Backpressure, not an outage: RESOURCE_EXHAUSTED (the bridge's 429 + Retry-After).
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "maxmemory" in (caught.value.details() or "")
    full_valkey.config_set("maxmemory", 0)  # heal
    assert list(full_valkey.scan_iter(match=keys.dedup_pattern())) == []
    assert queued(full_valkey, keys) == []
    assert statuses(send(stub, ev(deduplication_id="oom"))) == [ACCEPTED]
    assert statuses(send(stub, ev(deduplication_id="oom"))) == [DUPLICATE]
    assert len(queued(full_valkey, keys)) == 1


def test_script_is_reloaded_when_redis_lost_it(
    stub: events_pb2_grpc.EventsServiceStub, rdb: redis.Redis, keys: KeySpace
) -> None:
    rdb.script_flush()  # as after a restart without persistence
    assert statuses(send(stub, ev(deduplication_id="s"), ev())) == [ACCEPTED, ACCEPTED]
    assert len(queued(rdb, keys)) == 2


def test_connections_redis_closed_are_not_written_on_again(
    stub: events_pb2_grpc.EventsServiceStub, rdb: redis.Redis, keys: KeySpace
) -> None:
    assert statuses(send(stub, ev(deduplication_id="before"))) == [ACCEPTED]
    # Every connection but this one closed by Redis (as an operator's CLIENT KILL, or a
    # client timeout, would): the server's kept write connections are dead now.
    assert rdb.client_kill_filter(_type="normal", skipme=True) >= 1
    assert statuses(send(stub, ev(deduplication_id="after"))) == [ACCEPTED]
    assert statuses(send(stub, ev(deduplication_id="before"))) == [DUPLICATE]
    assert len(queued(rdb, keys)) == 2


# --- limits ------------------------------------------------------------------------


def test_max_events_per_request_are_queued_and_one_more_refuses_the_request(
    stub: events_pb2_grpc.EventsServiceStub, rdb: redis.Redis, keys: KeySpace, settings: Settings
) -> None:
    most = settings.max_events_per_request
    assert most == 500  # the documented default
    assert send(stub, *[ev(user_id=f"u-{i}") for i in range(most)]).accepted == most
    with pytest.raises(grpc.RpcError) as caught:
        send(stub, *[ev()] * (most + 1))
    [(field, reason, description)] = violation_details(caught.value)
    assert (field, reason) == ("events", "too_many_events")
    assert "501 events" in description
    assert "at most 500" in description
    assert "max_events_per_request" in description
    assert len(queued(rdb, keys)) == most


def test_an_event_of_max_event_bytes_is_queued_and_one_byte_more_is_refused(
    stub: events_pb2_grpc.EventsServiceStub, rdb: redis.Redis, keys: KeySpace, settings: Settings
) -> None:
    size, longest = settings.max_event_bytes, settings.max_string_length
    assert size == 32_768  # the documented default
    largest = event_of_size(size, longest, tenant="shop-a")
    assert statuses(send(stub, largest)) == [ACCEPTED]
    [(_, envelope)] = queued(rdb, keys)
    assert envelope.event == largest
    with pytest.raises(grpc.RpcError) as caught:
        send(stub, ev(), event_of_size(size + 1, longest, tenant="shop-a"))
    [(field, reason, description)] = violation_details(caught.value)
    assert (field, reason) == ("events[1]", "event_too_large")
    assert "32769 bytes" in description
    assert "at most 32768" in description
    assert "max_event_bytes" in description
    assert len(queued(rdb, keys)) == 1


def test_a_string_of_max_string_length_is_queued_and_one_character_more_is_refused(
    stub: events_pb2_grpc.EventsServiceStub, rdb: redis.Redis, keys: KeySpace, settings: Settings
) -> None:
    longest = settings.max_string_length
    assert longest == 8_192  # the documented default
    # Multi-byte characters: the limit counts characters, the event is 3x as many bytes.
    assert statuses(send(stub, ev(url="€" * longest))) == [ACCEPTED]
    with pytest.raises(grpc.RpcError) as caught:
        send(stub, ev(variant_ids=["a", "x" * (longest + 1)]))
    [(field, reason, description)] = violation_details(caught.value)
    assert (field, reason) == ("events[0].variant_ids[1]", "string_too_long")
    assert "8193 characters" in description
    assert "at most 8192" in description
    assert "max_string_length" in description
    assert len(queued(rdb, keys)) == 1


def test_small_limits_apply_as_configured(
    loop: LoopThread, settings: Settings, api_key: str, rdb: redis.Redis, keys: KeySpace
) -> None:
    limits = {"max_events_per_request": 3, "max_event_bytes": 200, "max_string_length": 50}
    with serving_stub(loop, settings, api_key, **limits) as (_, _, small):
        fitting = [event_of_size(200, 50, tenant="shop-a"), ev(url="x" * 50), ev()]
        assert statuses(send(small, *fitting)) == [ACCEPTED] * 3
        with pytest.raises(grpc.RpcError) as caught:
            send(small, *fitting, ev())
        assert [v[:2] for v in violation_details(caught.value)] == [("events", "too_many_events")]
        with pytest.raises(grpc.RpcError) as caught:
            send(small, event_of_size(201, 50, tenant="shop-a"), ev(url="x" * 51))
        assert [v[:2] for v in violation_details(caught.value)] == [
            ("events[0]", "event_too_large"),
            ("events[1].url", "string_too_long"),
        ]
    assert len(queued(rdb, keys)) == 3


def test_a_message_over_max_request_bytes_is_refused_by_grpc_itself(
    loop: LoopThread, settings: Settings, api_key: str, rdb: redis.Redis, keys: KeySpace
) -> None:
    with serving_stub(loop, settings, api_key, max_request_bytes=65_536) as (_, _, small):
        # Two events of 32764 bytes, each framed by 4 (a tag, a 3-byte length): 65536.
        fitting = [event_of_size(32_764, 8_192, tenant="shop-a")] * 2
        assert request_size(fitting) == 65_536
        assert statuses(send(small, *fitting)) == [ACCEPTED, ACCEPTED]
        over = [fitting[0], event_of_size(32_765, 8_192, tenant="shop-a")]
        assert request_size(over) == 65_537
        with pytest.raises(grpc.RpcError) as caught:
            send(small, *over)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "larger than max (65537 vs. 65536)" in (caught.value.details() or "")
    assert len(queued(rdb, keys)) == 2
