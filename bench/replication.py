"""What replica confirmation costs: the enqueue store on a primary with one replica, each
write acknowledged at once (EVENTS_CONFIRM_REPLICAS=0) or after WAIT 1 on its connection.

python -m bench.replication [--seconds S]   (make bench runs it last, as phase R)

The store's own write path (EventStore, one pipeline per request), at 1 and 100 events a
request, 32 requests in flight from one process, best of three interleaved runs each: the
ratios are what one WAIT per pipeline costs, a round trip to the replica on loopback.
Through the server the share is smaller (the same cost over more work per request).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import uvloop
from redis.asyncio import Redis

from events_server.queue.keys import KeySpace
from events_server.server.store import Item, store_for
from tests.harness.valkey import ValkeyProcess, start_replica

IN_FLIGHT = 32
PARTITIONS = 16
ROUNDS = 3


async def measure(
    url: str, batch: int, replicas: int, seconds: float, warmup: float
) -> dict[str, Any]:
    """Events/s and latency of ``IN_FLIGHT`` writers of ``batch`` events, confirmed by
    ``replicas`` replicas."""
    redis = Redis.from_url(url, max_connections=IN_FLIGHT * 2)
    keys = KeySpace("bench", PARTITIONS)
    store = store_for(redis, keys, 3600, replicas=replicas)
    ids = itertools.count()
    latencies: list[float] = []
    events = 0
    started = time.perf_counter()
    measuring_from = started + warmup
    until = measuring_from + seconds

    async def writer() -> None:
        nonlocal events
        while (now := time.perf_counter()) < until:
            items: list[Item] = [
                (n % PARTITIONS, keys.dedup(n % PARTITIONS, "bench", f"r{n}"), b"x" * 200)
                for n in itertools.islice(ids, batch)
            ]
            await store.append(items)
            if now >= measuring_from:
                latencies.append(time.perf_counter() - now)
                events += batch

    await asyncio.gather(*(writer() for _ in range(IN_FLIGHT)))
    await redis.flushall()
    await redis.aclose()
    latencies.sort()
    return {
        "batch": batch,
        "replicas": replicas,
        "events_per_s": events / seconds,
        "p50_ms": statistics.median(latencies) * 1000,
        "p99_ms": latencies[int(0.99 * (len(latencies) - 1))] * 1000,
    }


def run(seconds: float = 4.0, warmup: float = 1.0) -> dict[str, Any]:
    """Start a primary and its replica, measure, print the table; the rows and ratios."""
    with tempfile.TemporaryDirectory(prefix="bench-replication-") as tmp:
        primary = ValkeyProcess(Path(tmp) / "primary")
        primary.start()
        replica: ValkeyProcess | None = None
        try:
            replica = start_replica(primary, Path(tmp) / "replica")
            rows = []
            for batch in (1, 100):
                # Interleaved, best of ROUNDS: other work on the machine moves one row alone.
                tries = [
                    uvloop.run(measure(primary.url, batch, replicas, seconds, warmup))
                    for _ in range(ROUNDS)
                    for replicas in (0, 1)
                ]
                for replicas in (0, 1):
                    mine = [t for t in tries if t["replicas"] == replicas]
                    rows.append(max(mine, key=lambda t: float(t["events_per_s"])))
        finally:
            if replica is not None:
                replica.kill()
            primary.kill()
    ratios: dict[str, float] = {}
    for batch in (1, 100):
        by = {r["replicas"]: r for r in rows if r["batch"] == batch}
        ratios[f"R{batch} events/s"] = by[1]["events_per_s"] / by[0]["events_per_s"]
        ratios[f"R{batch} p50"] = by[1]["p50_ms"] / by[0]["p50_ms"]
    print(
        f"\nreplica confirmation (store on a primary + 1 replica, {IN_FLIGHT} requests in flight)"
    )
    print(f"{'batch':>5} {'confirmed by':>12} {'events/s':>10} {'p50 ms':>7} {'p99 ms':>7}")
    for row in rows:
        print(
            f"{row['batch']:>5} {row['replicas']:>12} {row['events_per_s']:>10,.0f}"
            f" {row['p50_ms']:>7.2f} {row['p99_ms']:>7.2f}"
        )
    print("confirmed (WAIT 1 per request) over unconfirmed, 1 = free:")
    for batch in (1, 100):
        print(
            f"  R{batch}: events/s x{ratios[f'R{batch} events/s']:.2f},"
            f" p50 latency x{ratios[f'R{batch} p50']:.2f}"
        )
    return {"rows": rows, "ratios": ratios}


def phase(args: argparse.Namespace) -> dict[str, Any] | None:
    """make bench's phase R (bench.run's EXTRAS: after the others, on a Valkey pair of its
    own): its rows and ratios, for the JSON results."""
    return run(min(args.seconds, 3.0), min(args.warmup, 0.5))


def main() -> int:
    """Run on its own."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=4.0, help="measured seconds per row")
    args = parser.parse_args()
    run(args.seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
