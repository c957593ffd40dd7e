"""Dedup + enqueue on Redis Streams: one Lua script call per partition batch.

The script is the only writer of events. Per event it checks the tenant-scoped
dedup key, appends the envelope to the partition stream, and only then sets the
key, so an append that fails never leaves a key behind and the client's retry is
not mistaken for a duplicate.

``EventStore`` turns events into script calls and replies into outcomes; how the
calls reach Redis (one server, or a cluster's nodes) is its transport's business.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any, Literal, Protocol

from redis.asyncio import RedisCluster

from events_server.queue.connection import RedisClient
from events_server.queue.keys import KeySpace
from events_server.server.cluster import ClusterTransport
from events_server.server.errors import IngestError, StoreUnavailable
from events_server.server.limits import Charge
from events_server.server.node import NodeTransport
from events_server.server.script import NO_CHARGE, REFUSED, Call

Item = tuple[int, str | None, bytes]
"""One event to queue: (partition, its dedup key or None, envelope bytes). The key (see
``KeySpace.dedup`` and ``KeySpace.transaction``) is in the partition's hash tag."""

Outcome = tuple[bool, str, int]
"""What happened to one event: (accepted now? else a duplicate, entry id, partition)."""

NOT_RUN: Outcome = (False, "", -1)


class Transport(Protocol):
    """How script calls reach Redis; raises StoreUnavailable or StoreFull, never RedisError."""

    one_node: bool
    """Every key on one server: a script may touch a caller's limiter key beside a
    partition's stream (on a cluster they hash to different slots)."""

    async def run(self, calls: Sequence[Call], *, partial: bool = False) -> list[Any]:
        """Each call's reply, in order; every call ran, or an error is raised (``partial``:
        a call Redis refused has an IngestError as its reply, the others stand)."""

    async def ping(self) -> bool:
        """True when Redis (on a cluster: any primary) answers."""

    async def info(self, *sections: str) -> dict[str, Any] | None:
        """INFO fields, or None where they cannot be had (ACLs, a cluster)."""

    async def forget_idle_connections(self) -> None:
        """Drop pooled sockets that may be dead (after a restart or a timeout)."""


class EventStore:
    """Appends envelopes to partition streams, dropping retried duplicates atomically."""

    def __init__(
        self,
        transport: Transport,
        keys: KeySpace,
        dedup_ttl_seconds: int,
        *,
        timeout_seconds: float,
    ) -> None:
        self.transport = transport
        self._keys = keys
        self._ttl = str(dedup_ttl_seconds).encode()
        self._timeout = timeout_seconds
        self.refusal: str | None = None
        """Why writes are refused before reaching Redis (set by the readiness probe), or None."""

    @property
    def keys(self) -> KeySpace:
        """The key names this store writes."""
        return self._keys

    def charges_in_write(self, items: Sequence[Item]) -> bool:
        """Whether a rate charge for these items can be taken in their write's own script:
        one partition batch, on one server."""
        return self.transport.one_node and len({item[0] for item in items}) == 1

    async def append(
        self, items: Sequence[Item], *, deadline: float | None = None
    ) -> list[Outcome]:
        """Queue items, in order per partition; one script call per partition, pipelined.

        ``deadline`` (loop time) ends the write sooner than the store's own timeout.
        """
        (written,) = await self.append_each([items], deadline=deadline)
        if isinstance(written, IngestError):
            raise written
        return written

    async def append_each(
        self,
        batches: Sequence[Sequence[Item]],
        *,
        deadline: float | None = None,
        charges: Sequence[Charge | None] = (),
    ) -> list[list[Outcome] | IngestError]:
        """Queue several requests' items in one round trip: one script call per partition for
        all of them, pipelined. Each request gets its outcomes, or the error of a partition
        batch of its that Redis refused (which wrote nothing). A failure of the whole write
        (Redis unreachable, no answer in time) is raised.

        ``charges``, by request (None: none): a rate charge taken in the request's own
        script call, before its writes (see ``charges_in_write``); a request its rate
        refuses gets the charge's RateLimited, and nothing of it is written.
        """
        groups: dict[tuple[int, int], tuple[list[tuple[int, int]], list[Any], list[Any]]] = {}
        for owner, items in enumerate(batches):
            charge = charges[owner] if owner < len(charges) else None
            for index, (partition, dedup_key, payload) in enumerate(items):
                # A charged request's batch is a script call of its own; the others share
                # one per partition.
                place = (partition, -1 if charge is None else owner)
                group = groups.get(place)
                if group is None:
                    keys: list[Any] = [self._keys.stream(partition)]
                    head: list[Any] = [self._ttl, *NO_CHARGE]
                    if charge is not None:
                        assert self.charges_in_write(items), "a charged batch spans partitions"
                        keys.append(charge.key)
                        head = [self._ttl, len(keys), *charge.args]
                    group = groups[place] = ([], keys, head)
                places, keys, args = group
                places.append((owner, index))
                if dedup_key is None:
                    args.append(0)
                else:
                    keys.append(dedup_key)
                    args.append(len(keys))
                args.append(payload)

        calls: list[Call] = [
            (partition, [len(keys), *keys, *args])
            for (partition, _), (_, keys, args) in groups.items()
        ]
        if self.refusal is not None:
            raise StoreUnavailable(self.refusal)
        if not calls:
            return [[] for _ in batches]
        try:
            # One bound for the whole write (connect, scripts, reload, WAITAOF): socket
            # timeouts apply per read, so a hung Redis could otherwise cost several.
            loop_deadline = asyncio.get_running_loop().time() + self._timeout
            if deadline is not None:
                loop_deadline = min(loop_deadline, deadline)
            async with asyncio.timeout_at(loop_deadline):
                replies = await self.transport.run(calls, partial=True)
        except TimeoutError as exc:
            await self.transport.forget_idle_connections()
            raise StoreUnavailable(
                f"redis: no answer within {self._timeout:g}s (the write may or may not have"
                " happened; retrying with the same deduplication_ids is safe)"
            ) from exc
        outcomes: list[list[Outcome]] = [[NOT_RUN] * len(items) for items in batches]
        failed: dict[int, IngestError] = {}
        for ((partition, charged), (places, _, _)), reply in zip(
            groups.items(), replies, strict=True
        ):
            if isinstance(reply, IngestError):
                for owner, _ in places:
                    failed.setdefault(owner, reply)
                continue
            if reply[0] == REFUSED:
                charge = charges[charged]
                assert charge is not None
                failed[charged] = charge.refused(int(reply[1]))
                continue
            for n, (owner, index) in enumerate(places):
                outcomes[owner][index] = (reply[2 * n] == 1, reply[2 * n + 1].decode(), partition)
        return [failed.get(owner, written) for owner, written in enumerate(outcomes)]

    async def ping(self) -> bool:
        """True when Redis answers."""
        return await self.transport.ping()

    async def info(self, *sections: str) -> dict[str, Any] | None:
        """Redis INFO fields of the given sections, or None when they cannot be had.

        Raises RedisError or TimeoutError when Redis does not answer.
        """
        return await self.transport.info(*sections)


def store_for(
    redis: RedisClient,
    keys: KeySpace,
    dedup_ttl_seconds: int,
    *,
    timeout_seconds: float = 2.0,
    observe_script: Callable[[float], None] | None = None,
    durability: Literal["none", "fsync"] = "none",
) -> EventStore:
    """The EventStore that fits the client: per-node pipelines for a RedisCluster."""
    transport: Transport
    if isinstance(redis, RedisCluster):
        transport = ClusterTransport(redis)
    else:
        transport = NodeTransport(
            redis,
            keys,
            observe_script=observe_script,
            timeout_seconds=timeout_seconds,
            durability=durability,
        )
    return EventStore(transport, keys, dedup_ttl_seconds, timeout_seconds=timeout_seconds)
