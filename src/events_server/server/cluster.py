"""The enqueue path on Redis Cluster: per-node pipelines and script caches, partial outages.

Every key of a partition carries the partition's hash tag, so each script call runs
on the one node that serves that slot and never meets CROSSSLOT. A node that is down
fails only the calls that touch its partitions; calls for the other partitions go on.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any

from redis.asyncio import RedisCluster
from redis.asyncio.cluster import ClusterNode
from redis.exceptions import ConnectionError, RedisError, TimeoutError

from events_server.queue.connection import CLUSTER_ERRORS
from events_server.queue.scripts import Command
from events_server.server.errors import StoreUnavailable
from events_server.server.script import ENQUEUE, Call

log = logging.getLogger(__name__)

REFRESH_INTERVAL_SECONDS = 1.0
"""At most one slot-map refresh per this interval while calls fail."""


class ClusterTransport:
    """Script calls on a Redis Cluster: one pipeline per node, partial outages contained."""

    one_node = False

    def __init__(self, redis: RedisCluster) -> None:
        self._cluster = redis
        self._down: list[str] = []
        self._refreshed_at = 0.0

    async def run(self, calls: Sequence[Call], *, partial: bool = False) -> list[Any]:
        """Every call, pipelined per node; EVAL where a node lacks the script.

        ``partial``: a call that failed (its node down, or refusing) has a StoreUnavailable
        as its reply instead of failing the others.
        """
        try:
            replies = await ENQUEUE.run_all(self._pipeline, [argv for _, argv in calls])
        except CLUSTER_ERRORS as exc:
            # The nodes that did answer may have queued their partitions' events: the
            # client's retry finds those as duplicates (by deduplication_id).
            await self.forget_idle_connections()
            raise StoreUnavailable(f"redis: {type(exc).__name__}: {exc}") from exc
        failed = [reply for reply in replies if isinstance(reply, Exception)]
        if failed:
            if any(isinstance(reply, ConnectionError | TimeoutError) for reply in failed):
                await self.forget_idle_connections()
            if not partial:
                first = failed[0]
                raise StoreUnavailable(f"redis: {type(first).__name__}: {first}") from first
            return [_unavailable(r) if isinstance(r, Exception) else r for r in replies]
        return replies

    async def _pipeline(self, commands: list[Command]) -> list[Any]:
        async with self._cluster.pipeline() as pipe:
            for command in commands:
                pipe.execute_command(*command)
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

    async def forget_idle_connections(self) -> None:
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


def _unavailable(reply: Exception) -> StoreUnavailable:
    error = StoreUnavailable(f"redis: {type(reply).__name__}: {reply}")
    error.__cause__ = reply
    return error


async def _ping(node: ClusterNode) -> bool:
    try:
        return bool(await node.execute_command("PING"))
    except (RedisError, OSError):
        await node.disconnect_free_connections()
        return False
