"""Who reads which partition: one consumer of a group per partition, by expiring leases.

Consumer groups alone hand a stream's entries to whichever consumer asks first, so two
consumers would handle one user's events side by side, out of order. A lease per
(partition, group) names the single consumer that reads the partition; it lapses
unless renewed, so a dead consumer's partitions pass to the others. A membership set
tells each consumer how many live peers share the partitions.

Every time here is Redis's own clock (TIME, PX), so consumers' clocks need not agree.
"""

from __future__ import annotations

from events_server.queue.connection import RedisClient
from events_server.queue.keys import KeySpace
from events_server.queue.scripts import LuaScript

# KEYS[1] the lease; ARGV[1] consumer name, ARGV[2] lease length, ms. 1: held by us now.
CLAIM = LuaScript("""
local owner = redis.call('GET', KEYS[1])
if owner == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if not owner then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
""")

# KEYS[1] the lease; ARGV[1] consumer name. Deletes it only if it is still ours.
RELEASE = LuaScript("""
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
""")

# KEYS[1] the group's members; ARGV[1] consumer name, ARGV[2] membership length, ms.
# Returns how many consumers are live, this one included.
JOIN = LuaScript("""
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('ZADD', KEYS[1], ms + tonumber(ARGV[2]), ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ms)
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return redis.call('ZCARD', KEYS[1])
""")


class Ownership:
    """One consumer's view of the leases and membership of its group."""

    def __init__(self, redis: RedisClient, keys: KeySpace, group: str, name: str) -> None:
        self._redis = redis
        self._keys = keys
        self._group = group
        self._name = name

    async def claim(self, partition: int, lease_ms: int) -> bool:
        """Take the partition's lease if free, or extend it if ours; False if another holds it."""
        held = await CLAIM(
            self._redis, [self._keys.owner(partition, self._group)], [self._name, lease_ms]
        )
        return bool(held)

    async def release(self, partition: int) -> None:
        """Give the lease up (only if it is still ours)."""
        await RELEASE(self._redis, [self._keys.owner(partition, self._group)], [self._name])

    async def join(self, lease_ms: int) -> int:
        """Say this consumer is live for lease_ms more; returns the live consumer count."""
        return int(
            await JOIN(self._redis, [self._keys.members(self._group)], [self._name, lease_ms])
        )

    async def leave(self) -> None:
        """Stop counting as live, so the others take this consumer's share at once."""
        await self._redis.zrem(self._keys.members(self._group), self._name)
