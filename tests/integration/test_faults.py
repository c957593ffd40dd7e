"""Nothing acknowledged is lost, and nothing is queued twice: the quick faults.

A reply lost after the write, an append failing mid-request, a full Redis, a body
over the limit, durability=fsync. Each test reports its figures (see the "figures"
section at the end of the run). The slow fault and load tests are tests/reliability/'s.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import redis

from events_server.pb import events_pb2_grpc
from events_server.queue.keys import KeySpace
from events_server.server.auth import ApiKey
from events_server.server.routing import partition_for
from events_server.server.script import ENQUEUE_SCRIPT
from events_server.server.settings import Settings
from rest_bridge.config import BridgeSettings
from tests.harness.data import ev, event
from tests.harness.keys import store_key
from tests.harness.proxy import proxy_to
from tests.harness.rpc import (
    ACCEPTED,
    DUPLICATE,
    NOT_SERVING,
    SERVING,
    health_of,
    keyed_channel,
    send,
    statuses,
)
from tests.harness.servers import LoopThread, own_settings, serving
from tests.harness.streams import orphan_dedup_keys, stream_contents
from tests.harness.valkey import SessionValkey, valkey_process
from tests.harness.waiting import eventually

Figures = Callable[[str], None]


# --- reply lost after the write ---------------------------------------------------


def test_reply_lost_after_the_write_retry_is_a_duplicate(  # noqa: PLR0917
    api_key: str,
    loop: LoopThread,
    valkey: SessionValkey,
    settings: Settings,
    rdb: redis.Redis,
    keys: KeySpace,
    figures: Figures,
) -> None:
    rdb.script_load(ENQUEUE_SCRIPT)  # a NOSCRIPT reply would be cut instead of the script's
    # One user per request: its five events go to one partition, one script call.
    requests = [
        [ev(deduplication_id=f"lost-{r}-{i}", user_id=f"user-{r}") for i in range(5)]
        for r in range(100)
    ]
    with (
        proxy_to(valkey.url) as proxy,
        serving(loop, settings.model_copy(update={"redis_url": proxy.url})) as (_, target),
        keyed_channel(target, api_key) as channel,
    ):
        stub = events_pb2_grpc.EventsServiceStub(channel)
        proxy.set_mode("cut_reply")
        codes = set()
        for events in requests:
            with pytest.raises(grpc.RpcError) as caught:
                send(stub, *events)
            codes.add(caught.value.code())
        queued_unacknowledged = stream_contents(rdb, keys)

        proxy.set_mode("pass")
        retried = [send(stub, *events) for events in requests]
    final = stream_contents(rdb, keys)

    retry_statuses = [s for reply in retried for s in statuses(reply)]
    same_entry = all(
        result.entry_id in final[event.deduplication_id]
        for events, reply in zip(requests, retried, strict=True)
        for event, result in zip(events, reply.results, strict=True)
    )
    figures(
        f"events=500 in 100 requests; replies cut={proxy.cuts}; queued before any ack="
        f"{len(queued_unacknowledged)}; retries as duplicate={retry_statuses.count(DUPLICATE)};"
        f" in stream={len(final)}, extra copies={sum(len(v) - 1 for v in final.values())}"
    )
    assert codes == {grpc.StatusCode.UNAVAILABLE}
    assert proxy.cuts == 100
    assert len(queued_unacknowledged) == 500  # the scripts ran: only the replies were lost
    assert retry_statuses == [DUPLICATE] * 500
    assert same_entry
    assert sorted(len(ids) for ids in final.values()) == [1] * 500


# --- append fails after the check ---------------------------------------------------


def test_append_failing_mid_request_leaves_no_orphan_and_retry_queues_each_once(
    stub: events_pb2_grpc.EventsServiceStub, rdb: redis.Redis, keys: KeySpace, figures: Figures
) -> None:
    events = [ev(deduplication_id=f"mid-{n}", user_id=f"user-{n}") for n in range(200)]
    partition = [partition_for(e, keys.partitions) for e in events]
    broken = partition[100]
    # The scripts of the other partitions run; this one's finds a string where its
    # stream should be, after its dedup checks, and must fail without writing.
    rdb.set(keys.stream(broken), "not a stream")
    with pytest.raises(grpc.RpcError) as caught:
        send(stub, *events)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    half = stream_contents(rdb, keys)
    orphans_after_failure = orphan_dedup_keys(rdb, keys)
    dedup_keys_of_broken = [
        e.deduplication_id
        for e, p in zip(events, partition, strict=True)
        if p == broken and rdb.exists(keys.dedup(p, e.tenant, e.deduplication_id))
    ]

    rdb.delete(keys.stream(broken))  # heal
    retry = send(stub, *events)
    final = stream_contents(rdb, keys)
    failed = sum(p == broken for p in partition)
    figures(
        f"events=200 over {len(set(partition))} partitions; failed partition held {failed};"
        f" queued by the failed request={len(half)};"
        f" orphan dedup keys={len(orphans_after_failure)}; retry: accepted={retry.accepted},"
        f" duplicates={retry.duplicates}; in streams={len(final)}"
    )
    assert 0 < failed < len(events)
    assert orphans_after_failure == []
    assert dedup_keys_of_broken == []
    assert set(half) == {
        e.deduplication_id for e, p in zip(events, partition, strict=True) if p != broken
    }
    assert statuses(retry) == [ACCEPTED if p == broken else DUPLICATE for p in partition]
    assert sorted(len(ids) for ids in final.values()) == [1] * 200
    assert orphan_dedup_keys(rdb, keys) == []


def test_full_redis_is_backpressure_429_with_retry_after_and_nothing_queued(
    http: httpx.Client, full_valkey: redis.Redis, keys: KeySpace
) -> None:
    body = [event("oom", n) for n in range(50)]  # over several partitions
    answer = http.post("/create-events", json=body)
    assert answer.status_code == 429
    assert answer.headers["retry-after"] == "1"
    assert "maxmemory" in answer.json()["detail"]
    assert stream_contents(full_valkey, keys) == {}
    assert list(full_valkey.scan_iter(match=keys.dedup_pattern())) == []

    full_valkey.config_set("maxmemory", 0)  # heal
    answer = http.post("/create-events", json=body)
    assert answer.status_code == 200
    assert answer.json()["accepted"] == 50


def test_one_byte_over_the_body_limit_queues_nothing_and_its_halves_are_all_accepted(
    http: httpx.Client, rdb: redis.Redis, keys: KeySpace
) -> None:
    limit = BridgeSettings().max_body_bytes
    events = [event("big", n) for n in range(200)]
    text = json.dumps(events).encode()
    assert len(text) < limit
    over = text + b" " * (limit + 1 - len(text))  # real events, padded one byte past
    answer = http.post("/create-events", content=over, headers={"content-type": "application/json"})
    assert answer.status_code == 413
    assert f"limit of {limit} bytes (max_body_bytes)" in answer.json()["detail"]
    # Nothing of it reached Redis: no entry, and no dedup key that would turn the
    # client's retry into "duplicate".
    assert stream_contents(rdb, keys) == {}
    assert list(rdb.scan_iter(match=keys.dedup_pattern())) == []
    # The client splits the batch and retries: every event is queued, once.
    for half in (events[:100], events[100:]):
        answer = http.post("/create-events", json=half)
        assert answer.status_code == 200
        assert answer.json()["accepted"] == 100
    assert sorted(len(ids) for ids in stream_contents(rdb, keys).values()) == [1] * 200


# --- durability and readiness -------------------------------------------------------


def test_fsync_without_aof_is_not_serving_says_why_and_refuses_writes(  # noqa: PLR0917
    api_key: str,
    loop: LoopThread,
    settings: Settings,
    rdb: redis.Redis,
    keys: KeySpace,
    caplog: pytest.LogCaptureFixture,
) -> None:
    assert rdb.config_get("appendonly")["appendonly"] == "no"
    fsync = settings.model_copy(update={"durability": "fsync"})
    with (
        caplog.at_level(logging.WARNING, logger="events_server"),
        serving(loop, fsync) as (_, target),
        keyed_channel(target, api_key) as channel,
    ):
        assert health_of(channel) == NOT_SERVING
        with pytest.raises(grpc.RpcError) as caught:
            send(events_pb2_grpc.EventsServiceStub(channel), ev(deduplication_id="no-aof"))
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "appendonly" in (caught.value.details() or "")
    assert any(
        "NOT_SERVING: durability=fsync but the Redis server has AOF off" in r.getMessage()
        for r in caplog.records
    )
    # Refused before the script: nothing queued that could never be acknowledged.
    assert stream_contents(rdb, keys) == {}


def test_fsync_pipelines_one_waitaof_after_the_scripts_of_each_request(
    session_key: tuple[ApiKey, str], loop: LoopThread, tmp_path: Path
) -> None:
    with valkey_process(tmp_path / "valkey", "--appendonly", "yes") as vk:
        client = redis.Redis.from_url(vk.url, socket_timeout=5)
        store_key(redis.Redis.from_url(vk.url), "fsync", session_key[0])
        api_key = session_key[1]
        try:
            client.script_load(ENQUEUE_SCRIPT)  # no NOSCRIPT round: exact command counts
            client.config_resetstat()
            with (
                serving(loop, own_settings(vk.url, "fsync", durability="fsync")) as (_, target),
                keyed_channel(target, api_key) as channel,
            ):
                assert health_of(channel) == SERVING
                stub = events_pb2_grpc.EventsServiceStub(channel)
                requests = [
                    [ev(deduplication_id=f"d{r}-{n}", user_id=f"u{n}") for n in range(20)]
                    for r in range(3)
                ]
                for events in requests:
                    assert statuses(send(stub, *events)) == [ACCEPTED] * 20
                written = client.info("commandstats")
                assert statuses(send(stub, *requests[0])) == [DUPLICATE] * 20
            again: Any = client.info("commandstats")
        finally:
            client.close()
    stats: Any = written
    partitions = len({partition_for(e, 8) for e in requests[0]})
    # One WAITAOF per request, after its scripts (one per partition) in the same
    # pipeline: it waits for exactly the writes of that connection.
    assert stats["cmdstat_waitaof"]["calls"] == 3
    assert stats["cmdstat_evalsha"]["calls"] == 3 * partitions
    assert stats["cmdstat_set"]["calls"] == 60  # the dedup keys, set inside the scripts
    # Duplicates' first copies came from other connections: each script with a dedup hit
    # writes its partition's barrier, so the request's one WAITAOF covers them too.
    assert again["cmdstat_waitaof"]["calls"] == 3 + 1
    assert again["cmdstat_set"]["calls"] == 60 + partitions


def test_eviction_policy_other_than_noeviction_is_warned_about(
    valkey: SessionValkey, rdb: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    valkey.killable()  # our own server: safe to reconfigure
    with caplog.at_level(logging.WARNING, logger="events_server"):
        rdb.config_set("maxmemory-policy", "allkeys-lru")
        try:
            eventually(
                lambda: any(
                    "maxmemory-policy is allkeys-lru, not noeviction" in r.getMessage()
                    for r in caplog.records
                )
            )
        finally:
            rdb.config_set("maxmemory-policy", "noeviction")
