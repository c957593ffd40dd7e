"""The enqueue path on Redis Cluster: per-node pipelines and script caches, partial outages.

Every key of a partition carries the partition's hash tag, so each script call runs
on the one node that serves that slot and never meets CROSSSLOT. A node that is down,
or whose writes its replicas do not confirm, fails only the calls that touch its
partitions; calls for the other partitions go on.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any

from redis.asyncio import RedisCluster
from redis.asyncio.cluster import ClusterNode, PipelineCommand
from redis.exceptions import ConnectionError, MovedError, RedisError, ResponseError, TimeoutError

from events_server.queue.connection import CLUSTER_ERRORS
from events_server.queue.scripts import Command
from events_server.server.confirm import Confirmation
from events_server.server.errors import StoreUnavailable
from events_server.server.script import ENQUEUE, Call

log = logging.getLogger(__name__)

REFRESH_INTERVAL_SECONDS = 1.0
"""At most one slot-map refresh per this interval while calls fail."""


class ClusterTransport:
    """Script calls on a Redis Cluster: one pipeline per node, partial outages contained."""

    one_node = False

    def __init__(
        self, redis: RedisCluster, confirmation: Confirmation, *, timeout_seconds: float = 2.0
    ) -> None:
        self._cluster = redis
        self._confirmation = confirmation
        self._timeout = timeout_seconds
        self._down: list[str] = []
        self._refreshed_at = 0.0

    async def run(
        self, calls: Sequence[Call], *, partial: bool = False, deadline: float | None = None
    ) -> list[Any]:
        """Every call, pipelined per node; EVAL where a node lacks the script.

        ``partial``: a call that failed (its node down, refusing, or not confirming the
        write) has a StoreUnavailable as its reply instead of failing the others.
        """

        async def send(commands: list[Command]) -> list[Any]:
            return await self._pipeline(commands, deadline)

        try:
            replies = await ENQUEUE.run_all(send, [argv for _, argv in calls])
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
                raise _unavailable(failed[0])
            return [_unavailable(r) if isinstance(r, Exception) else r for r in replies]
        return replies

    async def _pipeline(self, commands: list[Command], deadline: float | None) -> list[Any]:
        """Each node's commands back to back on one of its connections, then their
        confirmation on that same connection (redis-py's cluster pipeline would send a WAIT
        to some other node). Replies in order, errors as exceptions; a MOVED call is sent
        once more, to the node the redirection names."""
        await self._cluster.initialize()
        replies: list[Any] = [None] * len(commands)
        todo = list(range(len(commands)))
        for attempt in range(2):
            by_node: dict[str, tuple[ClusterNode, list[int]]] = {}
            for i in todo:
                try:
                    node = self._cluster.nodes_manager.get_node_from_slot(
                        self._cluster.keyslot(commands[i][3])  # (EVALSHA, sha, numkeys, key)
                    )
                except CLUSTER_ERRORS as exc:
                    replies[i] = exc
                    continue
                by_node.setdefault(node.name, (node, []))[1].append(i)
            answers = await asyncio.gather(
                *(self._node_pipeline(node, [commands[i] for i in at], deadline)
                  for node, at in by_node.values())
            )  # fmt: skip
            for (_, at), answered in zip(by_node.values(), answers, strict=True):
                for i, reply in zip(at, answered, strict=True):
                    replies[i] = reply
            moved = [i for i in todo if isinstance(replies[i], MovedError)]
            if not moved or attempt:
                break
            for i in moved:
                await self._cluster.nodes_manager.move_slot(replies[i])
            todo = moved
        return replies

    async def _node_pipeline(
        self, node: ClusterNode, commands: list[Command], deadline: float | None
    ) -> list[Any]:
        """One node's commands and their confirmation: replies, errors as exceptions (every
        write the node's confirmation does not cover answered with its refusal)."""
        stack = [PipelineCommand(n, *command) for n, command in enumerate(commands)]
        confirm = self._confirmation.command(deadline)
        if confirm is not None:
            stack.append(PipelineCommand(len(stack), *confirm))
        try:
            await node.execute_pipeline(stack)
        except (*CLUSTER_ERRORS, OSError) as exc:
            return [exc] * len(commands)
        replies = [command.result for command in stack[: len(commands)]]
        if confirm is None:
            return replies
        outcome: Any = stack[-1].result
        if isinstance(outcome, Exception) and not isinstance(outcome, ResponseError):
            refusal: Exception | None = outcome  # the connection failed: not a confirmation
        else:
            refusal = self._confirmation.check(node.name, outcome)
        if refusal is None:
            return replies
        return [r if isinstance(r, Exception) else refusal for r in replies]

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

    async def info(self, *sections: str) -> dict[str, dict[str, Any]] | None:
        """INFO fields of every primary that answers, by node name; None when one refuses
        INFO (ACLs). Raises RedisError when none answers."""
        await self._cluster.initialize()
        primaries = self._cluster.get_primaries()
        async with asyncio.timeout(self._timeout):
            answers = await asyncio.gather(
                *(node.execute_command("INFO", *sections) for node in primaries),
                return_exceptions=True,
            )
        found: dict[str, dict[str, Any]] = {}
        for node, answer in zip(primaries, answers, strict=True):
            if isinstance(answer, ResponseError):
                return None
            if isinstance(answer, dict):
                found[node.name] = answer
        if not found:
            raise RedisError("no redis cluster primary answers INFO")
        return found

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
    if isinstance(reply, StoreUnavailable):
        return reply
    error = StoreUnavailable(f"redis: {type(reply).__name__}: {reply}")
    error.__cause__ = reply
    return error


async def _ping(node: ClusterNode) -> bool:
    try:
        return bool(await node.execute_command("PING"))
    except (RedisError, OSError):
        await node.disconnect_free_connections()
        return False
