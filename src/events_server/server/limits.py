"""Rate limits and fair share: how much one caller (a key, or a storefront origin) may send.

Two bounds, each answered RESOURCE_EXHAUSTED (HTTP 429) with a retry-after:

- **Rates, shared by every server process and node**: requests/s and events/s with a
  burst, as a GCRA (the "virtual scheduling" token bucket) in Redis, one script call on
  the caller's own key. It runs before the write: a request spans partitions on
  several nodes, and a refused one must queue nothing, so the verdict comes first.
  A rate of 0 is no limit and costs no round trip.
- **A share of the Redis pool per caller, per process**: a caller's writes hold at most
  ``caller_pool_share`` of the connections at once; its further calls wait for one of
  its own (within the Redis timeout, then UNAVAILABLE, as for a slow Redis). This is
  what sheds the heaviest caller first under overload: a flood waits on its own share
  while a light tenant finds connections free, so it keeps its latency, and the pool
  never runs out for everyone.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from events_server.queue.connection import CLUSTER_ERRORS, RedisClient
from events_server.queue.keys import KeySpace
from events_server.queue.scripts import LuaScript
from events_server.server.errors import RateLimited, StoreUnavailable


@dataclass(frozen=True, slots=True)
class Rates:
    """A caller's allowance: per second, with bursts of ``burst_seconds`` worth at once."""

    requests_per_second: float = 0.0
    events_per_second: float = 0.0
    burst_seconds: float = 1.0

    @property
    def unlimited(self) -> bool:
        """No rate to enforce: no Redis round trip."""
        return self.requests_per_second <= 0 and self.events_per_second <= 0


# KEYS[1]  the caller's limiter hash (fields r, e: theoretical arrival times, ms)
# ARGV     requests/s, events/s, burst seconds, events in this request
# Returns  {1, 0} when allowed (both rates charged), {0, ms to wait} when refused (neither).
GCRA = LuaScript("""
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local burst = tonumber(ARGV[3]) * 1000
local wait, new, ttl = 0, {}, 1
for i, field in ipairs({'r', 'e'}) do
  local rate = tonumber(ARGV[i])
  if rate > 0 then
    local cost = (i == 1) and 1 or tonumber(ARGV[4])
    local interval = 1000 / rate
    local tat = tonumber(redis.call('HGET', KEYS[1], field) or '0')
    if tat < now then tat = now end
    local next_tat = tat + cost * interval
    -- Allowed while the schedule runs at most `burst` ahead of now.
    local over = next_tat - now - math.max(burst, interval)
    if over > 0 then
      wait = math.max(wait, math.ceil(over))
    end
    new[field] = next_tat
    ttl = math.max(ttl, math.ceil(next_tat - now))
  end
end
if wait > 0 then
  return {0, wait}
end
for field, value in pairs(new) do
  redis.call('HSET', KEYS[1], field, string.format('%.3f', value))
end
redis.call('PEXPIRE', KEYS[1], ttl)
return {1, 0}
""")


class Limiter:
    """Checks callers against their rates (in Redis) and their share of the pool (here)."""

    def __init__(self, redis: RedisClient, keys: KeySpace, share: int) -> None:
        self._redis = redis
        self._keys = keys
        self._share = share
        self._shares: dict[str, tuple[asyncio.Semaphore, int]] = {}

    @asynccontextmanager
    async def share_of_pool(self, caller_id: str, deadline: float) -> AsyncIterator[None]:
        """Hold one of the caller's connections' worth of Redis work, waiting until
        ``deadline`` (loop time) while the caller's whole share is in use."""
        semaphore, users = self._shares.get(caller_id) or (asyncio.Semaphore(self._share), 0)
        self._shares[caller_id] = (semaphore, users + 1)
        try:
            try:
                async with asyncio.timeout_at(deadline):
                    await semaphore.acquire()
            except TimeoutError:
                raise StoreUnavailable(
                    f"{caller_id}: its share of the Redis connections ({self._share}) stayed in"
                    " use by its other calls; nothing was queued, retry later"
                ) from None
            try:
                yield
            finally:
                semaphore.release()
        finally:
            semaphore, users = self._shares[caller_id]
            if users == 1:
                del self._shares[caller_id]  # idle callers cost nothing
            else:
                self._shares[caller_id] = (semaphore, users - 1)

    async def charge(self, caller_id: str, rates: Rates, events: int, deadline: float) -> None:
        """Take one request and ``events`` events from the caller's allowance, or RateLimited."""
        if rates.unlimited:
            return
        if rates.events_per_second > 0:
            room = rates.events_per_second * max(rates.burst_seconds, 1 / rates.events_per_second)
            if events > room:
                raise RateLimited(
                    f"{caller_id}: a request of {events} events is more than its burst of"
                    f" {math.floor(room)} allows at once; send smaller requests",
                    retry_after_seconds=1.0,
                    retryable=False,
                )
        argv = (rates.requests_per_second, rates.events_per_second, rates.burst_seconds, events)
        try:
            async with asyncio.timeout_at(deadline):
                allowed, wait_ms = await GCRA(self._redis, [self._keys.limiter(caller_id)], argv)
        except TimeoutError:
            raise StoreUnavailable("redis: no answer in time (checking the rate limit)") from None
        except CLUSTER_ERRORS as error:
            raise StoreUnavailable(
                f"redis: {type(error).__name__}: {error} (checking the rate limit)"
            ) from error
        if not allowed:
            raise RateLimited(
                f"{caller_id}: over its rate limit ({_rates(rates)}); retry in {int(wait_ms)} ms",
                retry_after_seconds=int(wait_ms) / 1000,
            )


def _rates(rates: Rates) -> str:
    parts = []
    if rates.requests_per_second > 0:
        parts.append(f"{rates.requests_per_second:g} requests/s")
    if rates.events_per_second > 0:
        parts.append(f"{rates.events_per_second:g} events/s")
    return ", ".join(parts) + f", bursts of {rates.burst_seconds:g} s"
