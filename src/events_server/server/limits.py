"""Rate limits and fair share: how much one caller (a key, or a storefront origin) may send.

Two bounds, each answered RESOURCE_EXHAUSTED (HTTP 429) with a retry-after:

- **Rates, shared by every server process and node**: requests/s and events/s with a
  burst, as a GCRA (the "virtual scheduling" token bucket) in Redis, on the caller's
  own key. A request that writes one partition batch on one Redis server (every
  single event, there) is charged inside its enqueue script: one round trip, charge and
  write one atomic step. Elsewhere (several partitions, or a cluster, where the
  caller's key lives on another node) the charge is a script call before the write,
  as a refused request must queue nothing. A rate of 0 is no limit and costs nothing.
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
from contextlib import AbstractAsyncContextManager
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


GCRA_FUNCTION = """
-- The caller's limiter hash (fields r, e: theoretical arrival times, ms); rates per
-- second, burst in seconds, events in this request. Returns 0 when allowed (both rates
-- charged), else the ms to wait (neither charged).
local function gcra(key, requests_rate, events_rate, burst_seconds, events)
  local t = redis.call('TIME')
  local now = t[1] * 1000 + math.floor(t[2] / 1000)
  local burst = tonumber(burst_seconds) * 1000
  local wait, new, ttl = 0, {}, 1
  local rates = {tonumber(requests_rate), tonumber(events_rate)}
  for i, field in ipairs({'r', 'e'}) do
    local rate = rates[i]
    if rate > 0 then
      local cost = (i == 1) and 1 or tonumber(events)
      local interval = 1000 / rate
      local tat = tonumber(redis.call('HGET', key, field) or '0')
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
    return wait
  end
  for field, value in pairs(new) do
    redis.call('HSET', key, field, string.format('%.3f', value))
  end
  redis.call('PEXPIRE', key, ttl)
  return 0
end
"""
"""The GCRA (the "virtual scheduling" token bucket), shared by the limiter's own script
and the enqueue script that charges a rate in the write itself (see ``Charge``)."""

# KEYS[1]  the caller's limiter hash
# ARGV     requests/s, events/s, burst seconds, events in this request
# Returns  {1, 0} when allowed (both rates charged), {0, ms to wait} when refused (neither).
GCRA = LuaScript(
    GCRA_FUNCTION
    + """
local wait = gcra(KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4])
if wait > 0 then
  return {0, wait}
end
return {1, 0}
"""
)


@dataclass(frozen=True, slots=True)
class Charge:
    """One request's rate charge: its limiter key and the GCRA's arguments.

    Taken in its own script call (``Limiter.charge``), or, where the request writes one
    partition batch on one Redis server, inside that batch's enqueue script: then the
    charge and the write are one round trip and one atomic step (a refused request
    writes nothing; a write Redis refuses charges nothing).
    """

    caller_id: str
    rates: Rates
    key: str
    events: int

    @property
    def args(self) -> tuple[float, float, float, int]:
        """The GCRA's ARGV: requests/s, events/s, burst seconds, events."""
        rates = self.rates
        return rates.requests_per_second, rates.events_per_second, rates.burst_seconds, self.events

    def refused(self, wait_ms: int) -> RateLimited:
        """The error of a request its rate refused, ``wait_ms`` before it would fit."""
        return RateLimited(
            f"{self.caller_id}: over its rate limit ({_rates(self.rates)}); retry in {wait_ms} ms",
            retry_after_seconds=wait_ms / 1000,
        )


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

    def turn(self, caller: str, deadline: float) -> AbstractAsyncContextManager[None]:
        """Work on one of ``caller``'s calls, waiting until ``deadline`` for a turn."""
        return _Turn(self, caller, deadline)

    async def _begin(self, caller: str, deadline: float) -> None:
        """Take a turn: at once when one is free for the caller, else when given one."""
        if caller not in self._waiting and self._may_start(caller):
            self._start(caller)
            return
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


class _Turn:
    """One call's turn (``FairTurns.turn``): a class, not a generator's context manager,
    which cost a few µs more on every call."""

    __slots__ = ("_caller", "_deadline", "_turns")

    def __init__(self, turns: FairTurns, caller: str, deadline: float) -> None:
        self._turns = turns
        self._caller = caller
        self._deadline = deadline

    async def __aenter__(self) -> None:
        await self._turns._begin(self._caller, self._deadline)

    async def __aexit__(self, *_: object) -> None:
        self._turns._finish(self._caller)


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

    def charge_for(self, caller_id: str, rates: Rates, events: int) -> Charge:
        """The charge of a request of ``events`` events, for ``rates`` that are not
        unlimited (an unlimited caller is charged nothing, and costs no round trip).

        Raises RateLimited (not retryable) for a request larger than the burst allows.
        """
        if rates.events_per_second > 0:
            room = rates.events_per_second * max(rates.burst_seconds, 1 / rates.events_per_second)
            if events > room:
                raise RateLimited(
                    f"{caller_id}: a request of {events} events is more than its burst of"
                    f" {math.floor(room)} allows at once; send smaller requests",
                    retry_after_seconds=1.0,
                    retryable=False,
                )
        return Charge(caller_id, rates, self._keys.limiter(caller_id), events)

    async def charge(self, charge: Charge, deadline: float) -> None:
        """Take the charge in a round trip of its own, before the write (or RateLimited)."""
        try:
            async with asyncio.timeout_at(deadline):
                allowed, wait_ms = await GCRA(self._redis, [charge.key], charge.args)
        except TimeoutError:
            raise StoreUnavailable("redis: no answer in time (checking the rate limit)") from None
        except CLUSTER_ERRORS as error:
            raise StoreUnavailable(
                f"redis: {type(error).__name__}: {error} (checking the rate limit)"
            ) from error
        if not allowed:
            raise charge.refused(int(wait_ms))


def _rates(rates: Rates) -> str:
    parts = []
    if rates.requests_per_second > 0:
        parts.append(f"{rates.requests_per_second:g} requests/s")
    if rates.events_per_second > 0:
        parts.append(f"{rates.events_per_second:g} events/s")
    return ", ".join(parts) + f", bursts of {rates.burst_seconds:g} s"
