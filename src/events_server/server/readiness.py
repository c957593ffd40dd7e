"""Is Redis there, and set up for what we promise? The readiness probe behind gRPC health.

Serving needs Redis to answer; with ``durability=fsync``, every primary to have its AOF
on (WAITAOF cannot confirm an fsync that never happens); and, when writes must be
confirmed by replicas, a primary with that many replicas in sync (on a cluster: at
least one; the others' partitions are refused until theirs are back, as a dead node's
are). Settings that make the promise weaker without stopping us are reported as
warnings, to be logged. INFO is read from every primary of a cluster.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from prometheus_client.core import GaugeMetricFamily, Metric
from redis.exceptions import RedisError

from events_server.server.store import EventStore


@dataclass(frozen=True, slots=True)
class Readiness:
    """What a probe found: serving or not (and why not), plus warnings."""

    serving: bool
    reason: str = ""
    """Why not serving; empty when serving."""
    misconfigured: bool = False
    """True when Redis answers but its settings rule out serving (writes are then refused)."""
    warnings: tuple[str, ...] = ()
    in_sync: tuple[tuple[str, int], ...] = ()
    """Replicas in sync by primary (node name), where INFO could be read."""
    short: tuple[str, ...] = ()
    """The primaries with fewer replicas in sync than writes need confirmed."""


def no_aof_for_fsync(where: str) -> str:
    """Why fsync durability cannot serve with ``where`` (a server) having AOF off."""
    return (
        f"durability=fsync but {where} has AOF off (appendonly no): no write could be"
        " confirmed on disk, so none is acknowledged. Set appendonly yes on Redis, or"
        " durability=none"
    )


async def probe(store: EventStore, durability: str, replicas: int = 0) -> Readiness:
    """Ping Redis, then read each primary's persistence, memory and replication (INFO, not
    CONFIG); ``replicas``: how many replicas must confirm each write."""
    if not await store.ping():
        return Readiness(False, "redis does not answer")
    try:
        info = await store.info("persistence", "memory", "replication")
    except (RedisError, TimeoutError):
        return Readiness(False, "redis does not answer")
    if info is None:
        # INFO may be forbidden (ACLs, renamed commands): nothing to check, so trust
        # WAIT / WAITAOF to refuse what they cannot confirm.
        return Readiness(True, warnings=("cannot read redis INFO: settings not checked",))
    one = store.transport.one_node
    warnings: list[str] = []
    for node, fields in sorted(info.items()):
        where = "the Redis server" if one else f"the Redis primary {node}"
        aof = str(fields.get("aof_enabled", "")) == "1"
        if durability == "fsync" and not aof:
            return Readiness(False, no_aof_for_fsync(where), misconfigured=True)
        warnings.extend(_warnings(fields, "redis" if one else f"redis primary {node}"))
    in_sync = tuple((node, _in_sync(fields)) for node, fields in sorted(info.items()))
    short = tuple(node for node, count in in_sync if count < replicas)
    for node, count in in_sync:
        if count < replicas:
            where = "redis" if one else f"redis primary {node}"
            warnings.append(
                f"{where} has {count} replicas in sync, and writes need {replicas}"
                " (EVENTS_CONFIRM_REPLICAS): writes to its partitions cannot be confirmed,"
                " so they are refused (503, retry later) until enough replicas are in sync"
            )
    if short and len(short) == len(in_sync):
        reason = f"no redis primary has the {replicas} replicas in sync that writes need"
        return Readiness(False, reason, warnings=tuple(warnings), in_sync=in_sync, short=short)
    return Readiness(True, warnings=tuple(warnings), in_sync=in_sync, short=short)


def _warnings(fields: dict[str, Any], where: str) -> list[str]:
    """What in one primary's settings makes the promise weaker."""
    warnings: list[str] = []
    policy = str(fields.get("maxmemory_policy", "noeviction"))
    if policy != "noeviction":
        warnings.append(
            f"{where}: maxmemory-policy is {policy}, not noeviction: under memory pressure Redis"
            " may evict streams (losing queued events) or dedup keys (letting retries be"
            " queued twice). Set maxmemory-policy noeviction"
        )
    if str(fields.get("aof_enabled", "")) != "1":
        warnings.append(
            f"{where} has AOF off (appendonly no): acknowledged events live only in memory"
            " until the next snapshot, and a Redis restart loses them. Set appendonly yes"
        )
    return warnings


def _in_sync(fields: dict[str, Any]) -> int:
    """Replicas INFO lists as online (connected and past their initial sync)."""
    return sum(
        1
        for name, value in fields.items()
        if name.startswith("slave") and isinstance(value, dict) and value.get("state") == "online"
    )


class ReplicaGauges:
    """The last probe's replicas, for /metrics: every process probes, so this is a local
    collector (never added up across processes)."""

    def __init__(self) -> None:
        self._last = Readiness(True)

    def update(self, readiness: Readiness) -> None:
        """Keep the probe's figures."""
        self._last = readiness

    def collect(self) -> Iterable[Metric]:
        """The gauges of the last probe; none when it could not read INFO (rather than
        stale figures)."""
        if not self._last.in_sync:
            return []
        in_sync = GaugeMetricFamily(
            "events_redis_replicas_in_sync",
            "Replicas in sync of each Redis primary, as its INFO lists them (read by readiness).",
            labels=["node"],
        )
        for node, count in self._last.in_sync:
            in_sync.add_metric([node], float(count))
        short = GaugeMetricFamily(
            "events_redis_primaries_short_of_replicas",
            "Redis primaries with fewer replicas in sync than writes need confirmed"
            " (EVENTS_CONFIRM_REPLICAS): their partitions' writes are refused.",
        )
        short.add_metric([], float(len(self._last.short)))
        return [in_sync, short]
