"""Rate limits and fair share: how much one caller (a key, or a storefront origin) may send.

Two bounds, each answered RESOURCE_EXHAUSTED (HTTP 429) with a retry-after:

- **Rates, shared by every server process and node**: requests/s and events/s with a
  burst, as a GCRA (the "virtual scheduling" token bucket) in Redis, one script call on
  the caller's own key. It runs before the write: a request spans partitions on
  several nodes, and a refused one must queue nothing, so the verdict comes first.
  A rate of 0 is no limit and costs no round trip.
- **Turns per caller, per process**: at most ``max_in_flight_per_caller`` of a caller's
  calls are worked on at once (parsed, validated, written); its further calls wait for
  a turn of their own, before any parsing, within the call's Redis budget (then
  UNAVAILABLE, as for a slow Redis). This is what sheds the heaviest caller first under
  overload: a flood's waiting calls cost no CPU and hold no Redis connection, while a
  light tenant finds its turn free, so it keeps its latency; and one caller can never
  hold more than its turns' worth of the Redis pool.
"""

from __future__ import annotations

import asyncio
import collections
import math
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
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


class FairTurns:
    """Turns at working on calls, shared fairly between callers.

    At most ``capacity`` calls are worked on at once in the process, at most ``per_caller``
    of them one caller's. When a turn frees up it goes to the waiting caller holding the
    fewest turns (round robin among equals), not to whoever queued first: a flood's
    hundred waiting calls do not stand in front of a light tenant's one.
    """

    def __init__(self, capacity: int, per_caller: int) -> None:
        self._capacity = capacity
        self._per_caller = per_caller
        self._active = 0
        self._held: dict[str, int] = {}
        self._waiting: collections.OrderedDict[str, collections.deque[asyncio.Future[None]]] = (
            collections.OrderedDict()
        )

    def _may_start(self, caller: str) -> bool:
        return self._active < self._capacity and self._held.get(caller, 0) < self._per_caller

    def _start(self, caller: str) -> None:
        self._active += 1
        self._held[caller] = self._held.get(caller, 0) + 1

    @asynccontextmanager
    async def turn(self, caller: str, deadline: float) -> AsyncIterator[None]:
        """Work on one of ``caller``'s calls, waiting until ``deadline`` for a turn."""
        if caller in self._waiting or not self._may_start(caller):
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiting.setdefault(caller, collections.deque()).append(future)
            try:
                async with asyncio.timeout_at(deadline):
                    await future
            except TimeoutError:
                if not self._forget(caller, future):
                    self._finish(caller)  # given as the time ran out: give it back
                raise StoreUnavailable(
                    f"{caller}: no turn came within the call's time (the server is busy with"
                    " this caller's other calls, max_in_flight_per_caller, or with others');"
                    " nothing was queued, retry later"
                ) from None
            except BaseException:
                if not self._forget(caller, future):
                    self._finish(caller)  # the turn was given, and is not taken
                raise
        else:
            self._start(caller)
        try:
            yield
        finally:
            self._finish(caller)

    def _forget(self, caller: str, future: asyncio.Future[None]) -> bool:
        """Take a waiter out of its queue; False when it had been given its turn already."""
        queue = self._waiting.get(caller)
        if queue is None or future not in queue:
            return False
        queue.remove(future)
        if not queue:
            del self._waiting[caller]
        return True

    def _finish(self, caller: str) -> None:
        self._active -= 1
        if (held := self._held[caller] - 1) == 0:
            del self._held[caller]
        else:
            self._held[caller] = held
        # Hand freed turns to the waiting caller holding the fewest (a light tenant before a
        # flood), ties round robin: a caller served goes to the back of the line.
        while self._active < self._capacity:
            ready = [c for c in self._waiting if self._held.get(c, 0) < self._per_caller]
            if not ready:
                break
            waiting = min(ready, key=lambda c: self._held.get(c, 0))
            queue = self._waiting[waiting]
            future = queue.popleft()
            if queue:
                self._waiting.move_to_end(waiting)  # served: to the back of the line
            else:
                del self._waiting[waiting]
            self._start(waiting)
            future.set_result(None)


class Limiter:
    """Checks callers against their rates (in Redis) and gives out fair turns (here)."""

    def __init__(
        self, redis: RedisClient, keys: KeySpace, *, capacity: int, per_caller: int
    ) -> None:
        self._redis = redis
        self._keys = keys
        self.turns = FairTurns(capacity, per_caller)

    def turn(self, caller_id: str, deadline: float) -> AbstractAsyncContextManager[None]:
        """Wait for a turn at working on one of the caller's calls (see FairTurns)."""
        return self.turns.turn(caller_id, deadline)

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
