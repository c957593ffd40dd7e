"""Is Redis there, and set up for what we promise? The readiness probe behind gRPC health.

Serving needs Redis to answer and, with ``durability=fsync``, to have its AOF on
(WAITAOF cannot confirm an fsync that never happens). Settings that make the
promise weaker without stopping us are reported as warnings, to be logged.
"""

from __future__ import annotations

from dataclasses import dataclass

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


NO_AOF_FOR_FSYNC = (
    "durability=fsync but the Redis server has AOF off (appendonly no): no write could be"
    " confirmed on disk, so none is acknowledged. Set appendonly yes on Redis, or"
    " durability=none"
)


async def probe(store: EventStore, durability: str) -> Readiness:
    """Ping Redis, then read its persistence and memory settings (INFO, not CONFIG)."""
    if not await store.ping():
        return Readiness(False, "redis does not answer")
    try:
        info = await store.info("persistence", "memory")
    except (RedisError, TimeoutError):
        return Readiness(False, "redis does not answer")
    if info is None:
        # INFO may be forbidden (ACLs, renamed commands): nothing to check, so trust
        # WAITAOF to refuse what it cannot confirm.
        return Readiness(True, warnings=("cannot read redis INFO: settings not checked",))
    aof = str(info.get("aof_enabled", "")) == "1"
    if durability == "fsync" and not aof:
        return Readiness(False, NO_AOF_FOR_FSYNC, misconfigured=True)
    warnings: list[str] = []
    policy = str(info.get("maxmemory_policy", "noeviction"))
    if policy != "noeviction":
        warnings.append(
            f"redis maxmemory-policy is {policy}, not noeviction: under memory pressure Redis"
            " may evict streams (losing queued events) or dedup keys (letting retries be"
            " queued twice). Set maxmemory-policy noeviction"
        )
    if not aof:
        warnings.append(
            "redis has AOF off (appendonly no): acknowledged events live only in memory until"
            " the next snapshot, and a Redis restart loses them. Set appendonly yes"
        )
    return Readiness(True, warnings=tuple(warnings))
