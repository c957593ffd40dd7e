"""Queue gauges read from Redis now and then, never per request.

Stream lengths, consumer group lag and pending counts, dedup keys.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

from prometheus_client.core import GaugeMetricFamily, Metric
from redis.asyncio import Redis, RedisCluster

from events_server.queue.keys import KeySpace

log = logging.getLogger(__name__)


class RedisSampler:
    """Reads queue sizes from Redis every ``interval`` seconds; exposes the last reading.

    Per partition: stream length, and for every consumer group (XINFO GROUPS) its
    lag and pending count. Plus the number of keys with a TTL in the Redis db,
    which is the dedup key count when the db is this service's own (nothing else
    we write expires). Read periodically, never per request; after a failed
    reading the series disappear rather than show stale figures.
    """

    def __init__(self, redis: Redis | RedisCluster, keys: KeySpace, interval: float) -> None:
        self._redis = redis
        self._keys = keys
        self._interval = interval
        # A cluster has only db 0.
        pool = None if isinstance(redis, RedisCluster) else redis.connection_pool
        self._db = str(pool.connection_kwargs.get("db", 0)) if pool is not None else "0"
        self._families: list[Metric] = []

    def collect(self) -> Iterable[Metric]:
        """The last reading (called by the scrape, from any thread)."""
        return list(self._families)

    async def sample(self) -> None:
        """Take one reading now."""
        streams = self._keys.streams()
        async with self._redis.pipeline(transaction=False) as pipe:
            for stream in streams:
                pipe.xlen(stream)
            for stream in streams:
                pipe.xinfo_groups(stream)
            if isinstance(self._redis, Redis):
                pipe.info("keyspace")
            replies: list[Any] = await pipe.execute(raise_on_error=False)
        lengths, groups = replies[: len(streams)], replies[len(streams) : 2 * len(streams)]
        if isinstance(self._redis, Redis):
            keyspaces = replies[2 * len(streams) :]
        else:
            # INFO has no key to route by: each primary's, for the keys it holds.
            keyspaces = await asyncio.gather(
                *(node.execute_command("INFO", "keyspace") for node in self._redis.get_primaries())
            )
        for reply in (*lengths, *keyspaces):
            if isinstance(reply, Exception):
                raise reply

        length = GaugeMetricFamily(
            "events_stream_length", "Entries in each partition stream.", labels=["partition"]
        )
        lag = GaugeMetricFamily(
            "events_group_lag",
            "Entries of a partition stream not yet delivered to a consumer group.",
            labels=["partition", "group"],
        )
        pending = GaugeMetricFamily(
            "events_group_pending",
            "Entries delivered to a consumer group but not yet acknowledged.",
            labels=["partition", "group"],
        )
        for partition, (count, infos) in enumerate(zip(lengths, groups, strict=True)):
            length.add_metric([str(partition)], float(count))
            if isinstance(infos, Exception):  # no such stream yet, so no groups either
                continue
            for info in infos:
                name = info["name"].decode(errors="replace")
                pending.add_metric([str(partition), name], float(info["pending"]))
                if info.get("lag") is not None:  # Redis cannot always tell (after deletions)
                    lag.add_metric([str(partition), name], float(info["lag"]))
        dedup = GaugeMetricFamily(
            "events_dedup_keys",
            "Keys with a TTL in the Redis db: the dedup keys, when the db is the service's own.",
        )
        expiring = sum(info.get(f"db{self._db}", {}).get("expires", 0) for info in keyspaces)
        dedup.add_metric([], float(expiring))
        self._families = [length, lag, pending, dedup]

    async def run(self) -> None:
        """Sample until cancelled; a failed reading clears the figures and is retried."""
        healthy = True
        while True:
            try:
                await self.sample()
                healthy = True
            except Exception as exc:  # whatever it is, the sampler must outlive it
                self._families = []
                if healthy:
                    log.warning("metrics: cannot read queue sizes from redis: %r", exc)
                healthy = False
            await asyncio.sleep(self._interval)
