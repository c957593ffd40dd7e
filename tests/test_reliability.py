"""Nothing acknowledged is lost, and nothing is queued twice, whatever fails in between.

Real Valkey killed for real, a TCP proxy of our own for network faults, real
signals to a real server process. Each test reports its figures (see the
"figures" section at the end of the run). The slow ones run with
`make test-reliability`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import time
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
from tests.harness.data import batches, ev, event
from tests.harness.keys import store_key
from tests.harness.load import Tally, acked_at_least, fixed_rate, percentile, retrying_clients
from tests.harness.processes import BridgeProcess, ServerProcess
from tests.harness.proxy import FaultProxy, proxy_to
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
from tests.harness.servers import LoopThread, bridged, serving
from tests.harness.streams import orphan_dedup_keys, stream_contents
from tests.harness.valkey import SessionValkey, free_port, valkey_process
from tests.harness.waiting import eventually

Figures = Callable[[str], None]


def server_env(settings: Settings, **extra: object) -> dict[str, str]:
    """Environment of an events-server process on the session's key space, plus ``extra``."""
    return {
        "REDIS_URL": settings.redis_url,
        "EVENTS_KEY_PREFIX": settings.key_prefix,
        "EVENTS_PARTITIONS": str(settings.partitions),
        **{f"EVENTS_{name.upper()}": str(value) for name, value in extra.items()},
    }


def own_settings(url: str, prefix: str, **overrides: Any) -> Settings:
    """Server settings for a test's own Redis."""
    base: dict[str, Any] = {
        "redis_url": url,
        "grpc_addr": "127.0.0.1:0",
        "key_prefix": prefix,
        "partitions": 8,
        "redis_timeout_seconds": 1.0,
        "health_interval_seconds": 0.1,
        "shutdown_grace_seconds": 5.0,
    }
    return Settings(**{**base, **overrides})


# --- 1. crash loop ------------------------------------------------------------------


@pytest.mark.slow
def test_crash_loop_loses_no_acknowledged_event_and_queues_each_once(
    session_key: tuple[ApiKey, str], loop: LoopThread, tmp_path: Path, figures: Figures
) -> None:
    total, size, workers, kills_wanted = 5000, 5, 8, 3
    with (
        valkey_process(tmp_path / "valkey", "--appendonly", "yes", "--appendfsync", "always") as vk,
        serving(loop, own_settings(vk.url, "crash", durability="fsync")) as (_, target),
        bridged(target) as url,
    ):
        # In the AOF (appendfsync always) like everything else: it survives the kills.
        store_key(redis.Redis.from_url(vk.url), "crash", session_key[0])
        tally = Tally()
        kills = 0
        started = time.monotonic()

        async def crash_three_times(done: asyncio.Event) -> None:
            nonlocal kills
            for k in range(1, kills_wanted + 1):
                # At fixed points of progress, not of time: always mid-run.
                if not await acked_at_least(tally, total * k // (kills_wanted + 1), done):
                    return
                await asyncio.to_thread(vk.kill)
                await asyncio.sleep(0.2)
                await asyncio.to_thread(vk.start)
                kills += 1

        async def run() -> None:
            done = asyncio.Event()
            crasher = asyncio.create_task(crash_three_times(done))
            await retrying_clients(
                url, list(batches("crash", total, size)), tally, workers, session_key[1]
            )
            done.set()
            await crasher

        asyncio.run(run())
        elapsed = time.monotonic() - started
        # One more crash after the run: what was acknowledged must come back from disk.
        vk.kill()
        vk.start()
        client = redis.Redis.from_url(vk.url, socket_timeout=5)
        try:
            found = stream_contents(client, KeySpace("crash", 8))
        finally:
            client.close()

    duplicates = sum(len(ids) - 1 for ids in found.values())
    missing = [i for i in tally.acked if i not in found]
    wrong_entry = [i for i, r in tally.acked.items() if r["entry_id"] not in found.get(i, ())]
    lost_replies = sum(r["status"] == "duplicate" for r in tally.acked.values())
    figures(
        f"N={total} in {total // size} requests, {elapsed:.1f}s; kills={kills} during + 1 after;"
        f" refusals retried={tally.refusals} (statuses {dict(tally.statuses)});"
        f" acked={len(tally.acked)}, acked as duplicate (reply lost)={lost_replies};"
        f" in streams={len(found)}, duplicates={duplicates}, missing={len(missing)}"
    )
    assert tally.failures == []
    assert kills == kills_wanted
    assert tally.refusals > 0  # the crashes did hit requests
    assert set(tally.statuses) <= {200, 503}  # every failure a 503, never another 5xx
    assert len(tally.acked) == total
    assert missing == []
    assert wrong_entry == []
    assert len(found) == total
    assert duplicates == 0


# --- 2. reply lost after the write ---------------------------------------------------


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


# --- 3. append fails after the check ---------------------------------------------------


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
    # Duplicates write nothing, and their first copies came from other connections: a
    # barrier write per partition, then WAITAOF, covers those first copies too.
    assert again["cmdstat_waitaof"]["calls"] == 3 + 2
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


# --- 4. blackhole, then refusal ---------------------------------------------------------


async def blackhole_run(
    url: str, proxy: FaultProxy, rate: float, fault_seconds: float, api_key: str
) -> tuple[list[tuple[int, float, bool]], float]:
    """Warm up, blackhole Redis under an open-loop load, heal; (answers during, recovery s)."""
    async with httpx.AsyncClient(
        base_url=url, timeout=10, headers={"x-api-key": api_key}
    ) as client:

        async def one(n: int) -> tuple[int, float, bool]:
            started = time.monotonic()
            answer = await client.post("/create-events", json=[event("hole", n)])
            took = time.monotonic() - started
            return answer.status_code, took, "retry-after" in answer.headers

        for n in range(5):  # warm: connections pooled, script loaded
            assert (await one(-1 - n))[0] == 200
        proxy.set_mode("blackhole")
        # Open loop: a new request every 1/rate s whatever the others do, so a pile-up
        # would show as growing latency.
        calls = []
        for n in range(int(rate * fault_seconds)):
            calls.append(asyncio.create_task(one(n)))
            await asyncio.sleep(1 / rate)
        during = await asyncio.gather(*calls)

        proxy.set_mode("pass")
        healed = time.monotonic()
        n = 10_000
        while time.monotonic() - healed < 5:
            n += 1
            if (await one(n))[0] == 200:
                return during, time.monotonic() - healed
            await asyncio.sleep(0.05)
        return during, float("inf")


@pytest.mark.slow
def test_blackholed_redis_is_refused_within_the_timeout_and_recovers(  # noqa: PLR0917
    api_key: str,
    valkey: SessionValkey,
    settings: Settings,
    rdb: redis.Redis,
    keys: KeySpace,
    tmp_path: Path,
    figures: Figures,
) -> None:
    timeout, pool, rate, fault_seconds = 0.5, 8, 100, 2.0
    with proxy_to(valkey.url) as proxy:
        # Server and bridge in processes of their own, as deployed: the figures are
        # theirs, not those of threads sharing the test's interpreter.
        env = server_env(
            settings,
            redis_timeout_seconds=timeout,
            redis_max_connections=pool,
            health_interval_seconds=0.1,
        )
        server = ServerProcess({**env, "REDIS_URL": proxy.url}, tmp_path / "server.log")
        bridge: BridgeProcess | None = None
        try:
            bridge = BridgeProcess(server.start(), tmp_path / "bridge.log")
            bridge.start()
            during, recovery = asyncio.run(
                blackhole_run(bridge.url, proxy, rate, fault_seconds, api_key)
            )
            peak = proxy.peak_connections
        finally:
            if bridge is not None:
                bridge.stop()
            server.kill()

    latencies = [took for _, took, _ in during]
    p99 = percentile(latencies, 99)
    refused = sum(status == 503 and retry for status, _, retry in during)
    figures(
        f"timeout={timeout}s, pool={pool}; during the fault: {len(during)} requests at {rate}/s,"
        f" 503+Retry-After={refused}; latency p50={percentile(latencies, 50) * 1000:.0f}ms"
        f" p99={p99 * 1000:.0f}ms max={max(latencies) * 1000:.0f}ms; peak connections to redis"
        f"={peak}; first success {recovery:.2f}s after healing"
    )
    assert refused == len(during)
    assert p99 <= timeout + 0.1
    assert recovery <= 2.0
    assert peak <= pool + 1  # bounded by the pool (+1: a closing socket not yet noticed)
    # The refused requests never reached Redis: only the warm-up and the first success did.
    assert len(stream_contents(rdb, keys)) == 6


# --- 5. graceful shutdown under load ---------------------------------------------------


@pytest.mark.slow
def test_sigterm_under_load_loses_no_acknowledged_event(  # noqa: PLR0917
    api_key: str,
    settings: Settings,
    rdb: redis.Redis,
    keys: KeySpace,
    tmp_path: Path,
    figures: Figures,
) -> None:
    total, size, workers = 4000, 5, 8
    port = free_port()
    env = server_env(settings, shutdown_grace_seconds=5)
    first = ServerProcess(env, tmp_path / "server-1.log", f"127.0.0.1:{port}")
    second = ServerProcess(env, tmp_path / "server-2.log", f"127.0.0.1:{port}")
    tally = Tally()
    times: dict[str, float] = {}
    exit_codes: list[int] = []

    async def terminate_then_restart() -> None:
        await acked_at_least(tally, total // 3)
        # Hold writes in Redis a moment, so that calls are surely in flight in the server
        # when SIGTERM lands: they must complete (200), not be dropped.
        await asyncio.to_thread(rdb.client_pause, 400, all=False)
        await asyncio.sleep(0.15)
        times["sigterm"] = time.monotonic()
        first.signal(signal.SIGTERM)
        exit_codes.append(await asyncio.to_thread(first.wait, 15))
        await asyncio.sleep(0.3)  # clients meet a server that is gone, too
        await asyncio.to_thread(second.start)
        times["back"] = time.monotonic()

    async def run(url: str) -> None:
        pending = list(batches("term", total, size))
        await asyncio.gather(
            terminate_then_restart(), retrying_clients(url, pending, tally, workers, api_key)
        )

    try:
        first.start()
        with bridged(f"127.0.0.1:{port}") as url:
            asyncio.run(run(url))
    finally:
        rdb.client_unpause()
        first.kill()
        second.stop()

    found = stream_contents(rdb, keys)
    missing = [i for i in tally.acked if i not in found]
    duplicates = sum(len(ids) - 1 for ids in found.values())
    sigterm, back = times["sigterm"], times["back"]
    in_flight_ok = sum(s < sigterm < e and status == 200 for s, e, status in tally.attempts)
    refused = sum(status == 503 and s >= sigterm for s, _, status in tally.attempts)
    first_ok = min(e for s, e, status in tally.attempts if status == 200 and s >= back)
    figures(
        f"N={total}; SIGTERM after {total // 3} acked; in flight at SIGTERM, then 200:"
        f" {in_flight_ok}; 503s after SIGTERM: {refused}; first 200 {first_ok - back:.2f}s"
        f" after the restart; exit code {exit_codes}; acked={len(tally.acked)},"
        f" missing={len(missing)}, duplicates={duplicates}"
    )
    assert exit_codes == [0]
    assert tally.failures == []
    assert set(tally.statuses) <= {200, 503}
    assert in_flight_ok > 0  # calls in flight at SIGTERM completed
    assert refused > 0  # new calls were refused, retryably, while the server was going
    assert "shutting down: draining" in first.log()
    assert len(tally.acked) == total
    assert missing == []
    assert duplicates == 0


# --- 7. soak -------------------------------------------------------------------------------


@pytest.mark.slow
def test_soak_at_a_fixed_rate_without_errors_or_memory_growth(  # noqa: PLR0917
    api_key: str,
    settings: Settings,
    rdb: redis.Redis,
    keys: KeySpace,
    tmp_path: Path,
    figures: Figures,
) -> None:
    seconds = float(os.environ.get("SOAK_SECONDS", "120"))
    warmup, rate, size = min(20.0, seconds / 6), 100, 10
    server = ServerProcess(server_env(settings), tmp_path / "server.log")
    bridge: BridgeProcess | None = None
    try:
        bridge = BridgeProcess(server.start(), tmp_path / "bridge.log")
        bridge.start()
        soak = asyncio.run(
            fixed_rate(
                bridge.url, seconds, rate, size, pids=(server.pid, bridge.pid), api_key=api_key
            )
        )
    finally:
        if bridge is not None:
            bridge.stop()
        server.stop()

    queued = sum(int(rdb.xlen(stream)) for stream in keys.streams())
    after_warmup = [s for s in soak.samples if s[0] >= warmup]
    base, last = after_warmup[0], after_warmup[-1]
    server_growth = (last[1] - base[1]) / base[1]
    bridge_growth = (last[2] - base[2]) / base[2]
    figures(
        f"{seconds:.0f}s at {rate} req/s x {size} events: sent {soak.sent * size} events,"
        f" accepted {soak.accepted}, errors {len(soak.errors)}, stream length {queued}; RSS"
        f" after {warmup:.0f}s warm-up -> end: server {base[1] / 1024:.1f}->{last[1] / 1024:.1f}"
        f" MiB ({server_growth:+.1%}), bridge {base[2] / 1024:.1f}->{last[2] / 1024:.1f} MiB"
        f" ({bridge_growth:+.1%})"
    )
    assert soak.errors == []
    assert soak.accepted == soak.sent * size
    assert queued == soak.accepted
    assert server_growth < 0.10
    assert bridge_growth < 0.10
