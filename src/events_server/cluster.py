"""The enqueue path on Redis Cluster: per-node pipelines and script caches, partial outages.

Every key of a partition carries the partition's hash tag, so each script call runs
on the one node that serves that slot and never meets CROSSSLOT. A node that is down
fails only the calls that touch its partitions; calls for the other partitions go on.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, cast

from redis.asyncio import Redis, RedisCluster
from redis.asyncio.cluster import ClusterNode
from redis.exceptions import (
    ConnectionError,
    NoScriptError,
    RedisClusterException,
    RedisError,
    TimeoutError,
)

from events_server.errors import StoreUnavailable
from events_server.keys import KeySpace
from events_server.store import ENQUEUE_SCRIPT, ENQUEUE_SHA, EventStore, RedisClient

log = logging.getLogger(__name__)

REFRESH_INTERVAL_SECONDS = 1.0
"""At most one slot-map refresh per this interval while calls fail."""

CLUSTER_ERRORS = (RedisError, RedisClusterException)
"""What a cluster call can raise: RedisClusterException is not a RedisError."""


def store_for(
    redis: RedisClient, keys: KeySpace, dedup_ttl_seconds: int, **options: Any
) -> EventStore:
    """The EventStore that fits the client: the cluster one for a RedisCluster."""
    if isinstance(redis, RedisCluster):
        return ClusterEventStore(redis, keys, dedup_ttl_seconds, **options)
    return EventStore(redis, keys, dedup_ttl_seconds, **options)


class ClusterEventStore(EventStore):
    """EventStore on Redis Cluster: same script and results, cluster-aware transport."""

    def __init__(
        self, redis: RedisCluster, keys: KeySpace, dedup_ttl_seconds: int, **options: Any
    ) -> None:
        # The base class uses its client only in _run, ping, info and
        # _forget_idle_connections, all overridden here for the cluster client.
        super().__init__(cast(Redis, redis), keys, dedup_ttl_seconds, **options)
        self._cluster = redis
        self._down: list[str] = []
        self._refreshed_at = 0.0

    async def _run(self, calls: list[tuple[int, list[int], list[Any]]]) -> list[Any]:
        """EVALSHA every call (one pipeline per node); EVAL where a node lacks the script."""
        try:
            replies = await self._cluster_pipeline(calls, by_sha=True)
            redo = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
            if redo:
                # A node that restarted has an empty script cache. NOSCRIPT means the call
                # did not run; EVAL runs it and caches the script on that node. SCRIPT LOAD
                # would go to every primary and fail while any one of them is down.
                again = await self._cluster_pipeline([calls[i] for i in redo], by_sha=False)
                for i, reply in zip(redo, again, strict=True):
                    replies[i] = reply
        except CLUSTER_ERRORS as exc:
            # The nodes that did answer may have queued their partitions' events: the
            # client's retry finds those as duplicates (by deduplication_id).
            await self._forget_idle_connections()
            raise StoreUnavailable(f"redis: {type(exc).__name__}: {exc}") from exc
        failed = [reply for reply in replies if isinstance(reply, Exception)]
        if failed:
            if any(isinstance(reply, ConnectionError | TimeoutError) for reply in failed):
                await self._forget_idle_connections()
            first = failed[0]
            raise StoreUnavailable(f"redis: {type(first).__name__}: {first}") from first
        return replies

    async def _cluster_pipeline(
        self, calls: list[tuple[int, list[int], list[Any]]], *, by_sha: bool
    ) -> list[Any]:
        async with self._cluster.pipeline() as pipe:
            for _, _, argv in calls:
                if by_sha:
                    pipe.execute_command("EVALSHA", ENQUEUE_SHA, *argv)
                else:
                    pipe.execute_command("EVAL", ENQUEUE_SCRIPT, *argv)
            replies: list[Any] = await pipe.execute(raise_on_error=False)
            return replies

    async def ping(self) -> bool:
        """True while at least one primary answers: the other nodes' partitions still work."""
        try:
            await self._cluster.initialize()
        except CLUSTER_ERRORS:
            return False
        primaries = self._cluster.get_primaries()
        answers = await asyncio.gather(*(_ping(node) for node in primaries))
        down = sorted(node.name for node, up in zip(primaries, answers, strict=True) if not up)
        if down != self._down:
            if down:
                log.warning("redis cluster nodes not answering: %s", ", ".join(down))
            else:
                log.info("every redis cluster node answers")
            self._down = down
        if down:
            await self._refresh_slots()
        return len(down) < len(primaries)

    async def info(self, *sections: str) -> dict[str, Any] | None:
        """None: INFO is per node on a cluster, so the AOF and eviction checks are skipped."""
        return None

    async def _forget_idle_connections(self) -> None:
        # After a node restarts, every pooled socket to it is dead; dropping the idle
        # ones makes the next calls reconnect instead of each failing once.
        for node in self._cluster.get_nodes():
            await node.disconnect_free_connections()
        await self._refresh_slots()

    async def _refresh_slots(self) -> None:
        # With no retries configured, the cluster client does not re-read the slot map
        # after a failed pipeline. Without this, a replica promoted in place of a dead
        # primary would never be used: every call would still go to the dead address.
        now = time.monotonic()
        if now - self._refreshed_at < REFRESH_INTERVAL_SECONDS:
            return
        self._refreshed_at = now
        try:
            await self._cluster.nodes_manager.initialize()
        except CLUSTER_ERRORS as exc:
            log.debug("slot map refresh failed: %s", exc)


async def _ping(node: ClusterNode) -> bool:
    try:
        return bool(await node.execute_command("PING"))
    except (RedisError, OSError):
        await node.disconnect_free_connections()
        return False
