"""Nothing acknowledged is lost, and nothing is queued twice, whatever Redis goes through.

Real Valkey killed for real, and blackholed by a TCP proxy of our own, under load.
Each test reports its figures (see the "figures" section at the end of the run).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import redis

from events_server.queue.keys import KeySpace
from events_server.server.auth import ApiKey
from tests.harness.data import batches, event
from tests.harness.keys import store_key
from tests.harness.load import Tally, acked_at_least, percentile, retrying_clients
from tests.harness.processes import deployed, events_env
from tests.harness.proxy import FaultProxy, proxy_to
from tests.harness.servers import LoopThread, bridged, own_settings, serving
from tests.harness.streams import Queue, stream_contents
from tests.harness.valkey import SessionValkey, valkey_process

Figures = Callable[[str], None]


# --- crash loop ------------------------------------------------------------------


@pytest.mark.slow
def test_crash_loop_loses_no_acknowledged_event_and_queues_each_once(
    session_key: tuple[ApiKey, str], loop: LoopThread, tmp_path: Path, figures: Figures
) -> None:
    total, size, workers, kills_wanted = 5000, 5, 8, 3
    with (
        valkey_process(tmp_path / "valkey", "--appendonly", "yes", "--appendfsync", "always") as vk,
        serving(loop, own_settings(vk.url, "crash", durability="fsync")) as (_, target),
        bridged(target, grpc_timeout_seconds=3.0) as url,
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


# --- blackhole, then refusal ---------------------------------------------------------


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
def test_blackholed_redis_is_refused_within_the_timeout_and_recovers(
    queue: Queue, valkey: SessionValkey, tmp_path: Path, figures: Figures
) -> None:
    timeout, pool, rate, fault_seconds = 0.5, 8, 100, 2.0
    with proxy_to(valkey.url) as proxy:
        # Server and bridge in processes of their own, as deployed: the figures are
        # theirs, not those of threads sharing the test's interpreter.
        env = events_env(
            queue.settings,
            REDIS_URL=proxy.url,
            EVENTS_REDIS_TIMEOUT_SECONDS=str(timeout),
            EVENTS_REDIS_MAX_CONNECTIONS=str(pool),
            EVENTS_HEALTH_INTERVAL_SECONDS="0.1",
        )
        with deployed(env, tmp_path) as (_, bridge):
            during, recovery = asyncio.run(
                blackhole_run(bridge.url, proxy, rate, fault_seconds, queue.api_key)
            )
            peak = proxy.peak_connections

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
    assert len(stream_contents(queue.rdb, queue.keys)) == 6
