"""Consumer groups on the partition streams: create, inspect, dead-letter, replay, trim.

Each script here touches one partition's keys only (they share its hash tag), so all
of them run unchanged on Redis Cluster.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import ResponseError

from events_server.queue.connection import RedisClient
from events_server.queue.keys import KeySpace
from events_server.queue.scripts import LuaScript

# KEYS[1] partition stream, KEYS[2] the group's dead-letter stream of that partition
# ARGV[1] group, ARGV[2] entry id, ARGV[3] deliveries so far, ARGV[4] why
# Returns 1 when the entry moved, 0 when it was no longer pending for the group.
DEAD_LETTER = LuaScript("""#!lua
local stream, dead = KEYS[1], KEYS[2]
local group, id = ARGV[1], ARGV[2]
-- Someone else may have settled it since we looked: then there is nothing to move.
if #redis.call('XPENDING', stream, group, id, id, 1) == 0 then
  return 0
end
local entry = redis.call('XRANGE', stream, id, id)[1]
if entry then
  local payload = ''
  for i = 1, #entry[2], 2 do
    if entry[2][i] == 'e' then payload = entry[2][i + 1] end
  end
  -- Copied before the ack: if the copy fails, the entry stays pending, not lost.
  redis.call('XADD', dead, '*', 'e', payload, 'id', id, 'group', group,
             'deliveries', ARGV[3], 'error', ARGV[4])
end
redis.call('XACK', stream, group, id)
return 1
""")

# KEYS[1] the group's dead-letter stream of a partition, KEYS[2] the partition stream
# ARGV[1] group, ARGV[2] how many (oldest first). Returns how many moved.
REPLAY = LuaScript("""#!lua
local moved = 0
for _, entry in ipairs(redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', ARGV[2])) do
  local fields = {}
  for i = 1, #entry[2], 2 do fields[entry[2][i]] = entry[2][i + 1] end
  -- 'g' limits the retry to this group: the others handled the entry already.
  redis.call('XADD', KEYS[2], '*', 'e', fields['e'], 'g', ARGV[1], 'o', fields['id'])
  redis.call('XDEL', KEYS[1], entry[1])
  moved = moved + 1
end
return moved
""")

# KEYS[1] partition stream. Removes the entries that every group has acknowledged:
# those before each group's oldest pending entry and not after what it was last given.
# A stream with no group keeps everything: nobody has read it yet.
# Returns {entries removed, the first id kept (or '')}.
TRIM = LuaScript("""#!lua
local stream = KEYS[1]
if redis.call('TYPE', stream)['ok'] ~= 'stream' then return {0, ''} end
local groups = redis.call('XINFO', 'GROUPS', stream)
if #groups == 0 then return {0, ''} end
local function before(a, b)
  local am, as = string.match(a, '^(%d+)-(%d+)$')
  local bm, bs = string.match(b, '^(%d+)-(%d+)$')
  am, as, bm, bs = tonumber(am), tonumber(as), tonumber(bm), tonumber(bs)
  return am < bm or (am == bm and as < bs)
end
local keep
for _, list in ipairs(groups) do
  local group = {}
  for i = 1, #list, 2 do group[list[i]] = list[i + 1] end
  -- The first id this group has not been given yet.
  local ms, seq = string.match(group['last-delivered-id'], '^(%d+)-(%d+)$')
  local need = ms .. '-' .. string.format('%d', tonumber(seq) + 1)
  if group['pending'] > 0 then
    local oldest = redis.call('XPENDING', stream, group['name'])[2]
    if before(oldest, need) then need = oldest end
  end
  if keep == nil or before(need, keep) then keep = need end
end
return {redis.call('XTRIM', stream, 'MINID', keep), keep}
""")


async def ensure_group(redis: RedisClient, keys: KeySpace, partition: int, group: str) -> None:
    """Create ``group`` on the partition stream, reading from its first entry, if missing."""
    try:
        await redis.xgroup_create(keys.stream(partition), group, id="0", mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


async def dead_letter(
    redis: RedisClient,
    keys: KeySpace,
    partition: int,
    group: str,
    *,
    entry_id: str,
    deliveries: int,
    why: str,
) -> bool:
    """Move a pending entry to the group's dead letters; False if it was settled meanwhile."""
    moved = await DEAD_LETTER(
        redis,
        [keys.stream(partition), keys.dead_letters(partition, group)],
        [group, entry_id, deliveries, why[:1000]],
    )
    return bool(moved)


async def replay_dead_letters(
    redis: RedisClient,
    keys: KeySpace,
    group: str,
    partitions: Iterable[int] | None = None,
    batch: int = 100,
) -> dict[int, int]:
    """Move ``group``'s dead letters back onto their partition streams; count per partition."""
    moved: dict[int, int] = {}
    for partition in range(keys.partitions) if partitions is None else partitions:
        total = 0
        while True:
            count = int(
                await REPLAY(
                    redis,
                    [keys.dead_letters(partition, group), keys.stream(partition)],
                    [group, batch],
                )
            )
            total += count
            if count < batch:
                break
        if total:
            moved[partition] = total
    return moved


async def trim(redis: RedisClient, keys: KeySpace) -> dict[int, int]:
    """Remove from every partition stream what all its groups acknowledged; count per partition."""
    removed: dict[int, int] = {}
    for partition in range(keys.partitions):
        count, _ = await TRIM(redis, [keys.stream(partition)], [])
        if count:
            removed[partition] = int(count)
    return removed


@dataclass(frozen=True, slots=True)
class PartitionState:
    """One group on one partition."""

    partition: int
    pending: int
    lag: int | None  # None: Redis cannot tell (entries deleted past the group's position)
    last_delivered_id: str
    dead_letters: int
    owner: str | None


@dataclass(frozen=True, slots=True)
class GroupState:
    """A consumer group over all partitions."""

    group: str
    partitions: list[PartitionState] = field(default_factory=list)

    @property
    def pending(self) -> int:
        """Entries delivered to a consumer and not acknowledged yet."""
        return sum(p.pending for p in self.partitions)

    @property
    def lag(self) -> int | None:
        """Entries not delivered yet; None when a partition cannot tell."""
        lags = [p.lag for p in self.partitions]
        return None if None in lags else sum(lag or 0 for lag in lags)

    @property
    def dead_letters(self) -> int:
        """Entries the group gave up on, waiting for a replay."""
        return sum(p.dead_letters for p in self.partitions)

    @property
    def consumers(self) -> list[str]:
        """The consumers owning a partition right now."""
        return sorted({p.owner for p in self.partitions if p.owner})

    def as_dict(self) -> dict[str, Any]:
        """JSON form for ``events-server groups --json``."""
        return {
            "group": self.group,
            "pending": self.pending,
            "lag": self.lag,
            "dead_letters": self.dead_letters,
            "consumers": self.consumers,
            "partitions": [
                {
                    "partition": p.partition,
                    "pending": p.pending,
                    "lag": p.lag,
                    "last_delivered_id": p.last_delivered_id,
                    "dead_letters": p.dead_letters,
                    "owner": p.owner,
                }
                for p in self.partitions
            ],
        }


async def group_states(redis: RedisClient, keys: KeySpace) -> list[GroupState]:
    """Every group found on the partition streams, by name."""
    states: dict[str, GroupState] = {}
    for partition in range(keys.partitions):
        stream = keys.stream(partition)
        if await redis.type(stream) != b"stream":
            continue
        info: Any
        for info in await redis.xinfo_groups(stream):
            name = text(info["name"])
            owner = await redis.get(keys.owner(partition, name))
            state = PartitionState(
                partition=partition,
                pending=int(info["pending"]),
                lag=None if info.get("lag") is None else int(info["lag"]),
                last_delivered_id=text(info["last-delivered-id"]),
                dead_letters=int(await redis.xlen(keys.dead_letters(partition, name))),
                owner=None if owner is None else text(owner),
            )
            states.setdefault(name, GroupState(name)).partitions.append(state)
    return [states[name] for name in sorted(states)]


async def hand_back(
    redis: RedisClient,
    keys: KeySpace,
    partition: int,
    group: str,
    consumer: str,
    *,
    unread: set[str],
    most: int,
    idle_ms: int,
) -> None:
    """Make a leaving consumer's pending entries of a partition claimable by the next owner."""
    # Entries we were given but did not handle would wait claim_idle_seconds before
    # the next owner may take them. Marking them that idle lets it take them at once:
    # we know we are not working on them. Those the handler never saw get their
    # delivery count back (they were read, not delivered); JUSTID keeps the others'.
    stream = keys.stream(partition)
    pending: Any = await redis.xpending_range(stream, group, "-", "+", most, consumername=consumer)
    ids = [text(p["message_id"]) for p in pending]
    for chosen, retrycount in (
        ([i for i in ids if i not in unread], None),
        ([i for i in ids if i in unread], 0),
    ):
        if chosen:
            await redis.xclaim(
                stream,
                group,
                consumer,
                0,
                chosen,  # type: ignore[arg-type]
                idle=idle_ms,
                retrycount=retrycount,
                justid=True,
            )


def text(value: bytes | str) -> str:
    """A reply value as text (clients may or may not decode responses)."""
    return value.decode() if isinstance(value, bytes) else value
