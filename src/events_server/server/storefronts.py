"""Storefronts: page origins registered for tenants, which may send events without a key.

Depict's browser client carries no secret: the tenant is in each event, and the page's
``Origin`` is all that says where it came from. A store registers its storefront origins
(``events-server storefronts add``); a keyless request from one of them may write the
tenants registered for it. A non-browser client can forge ``Origin``, so this is as
strong as a public write key (anyone may send events for that store), which is why the
rate limits bound it and keys stay for writes that must be attributable.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

from events_server.queue.connection import RedisClient
from events_server.queue.keys import KeySpace
from events_server.queue.scripts import LuaScript
from events_server.wire.origins import normalize_origin


@dataclass(frozen=True, slots=True)
class Storefront:
    """A registered origin and the tenants it may write without a key."""

    origin: str
    tenants: tuple[str, ...]
    created: str

    def to_json(self) -> str:
        """The stored form."""
        return json.dumps(asdict(self), separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_json(cls, raw: bytes | str) -> Storefront:
        """Read the stored form back."""
        data = json.loads(raw)
        data["tenants"] = tuple(data["tenants"])
        return cls(**data)


# One script per change: two operators editing one origin's tenants must not lose either
# edit, and a script works alike on one Redis and on a cluster (one hash, one slot).
ADD = LuaScript("""
local out = {}
for i = 3, #ARGV do
  local origin = ARGV[i]
  local raw = redis.call('HGET', KEYS[1], origin)
  local front
  if raw then
    front = cjson.decode(raw)
    local known = false
    for _, t in ipairs(front.tenants) do
      if t == ARGV[1] then known = true end
    end
    if not known then table.insert(front.tenants, ARGV[1]) end
  else
    front = {origin = origin, tenants = {ARGV[1]}, created = ARGV[2]}
  end
  local stored = cjson.encode(front)
  redis.call('HSET', KEYS[1], origin, stored)
  out[#out + 1] = stored
end
return out
""")

# ARGV[1] tenant, ARGV[2..] origins (none: every origin of the tenant). Returns the
# origins the tenant was removed from.
REMOVE = LuaScript("""
local chosen = {}
for i = 2, #ARGV do chosen[ARGV[i]] = true end
local all = #ARGV < 2
local removed = {}
local flat = redis.call('HGETALL', KEYS[1])
for i = 1, #flat, 2 do
  local origin = flat[i]
  if all or chosen[origin] then
    local front = cjson.decode(flat[i + 1])
    local rest = {}
    local hit = false
    for _, t in ipairs(front.tenants) do
      if t == ARGV[1] then hit = true else rest[#rest + 1] = t end
    end
    if hit then
      removed[#removed + 1] = origin
      if #rest == 0 then
        redis.call('HDEL', KEYS[1], origin)
      else
        front.tenants = rest
        redis.call('HSET', KEYS[1], origin, cjson.encode(front))
      end
    end
  end
end
return removed
""")


class StorefrontStore:
    """The registrations in Redis: one hash, origin -> Storefront, beside the keys' slot."""

    def __init__(self, redis: RedisClient, keys: KeySpace) -> None:
        self._redis = redis
        self._hash = keys.storefronts()

    async def add(self, tenant: str, origins: Sequence[str]) -> list[Storefront]:
        """Register ``origins`` for ``tenant`` (ValueError: an empty tenant, a malformed origin)."""
        if not tenant:
            raise ValueError("the tenant must not be empty")
        wanted = list(dict.fromkeys(normalize_origin(o) for o in origins))
        if not wanted:
            raise ValueError("give at least one --origin")
        now = datetime.now(UTC).isoformat(timespec="seconds")
        stored = await ADD(self._redis, [self._hash], [tenant, now, *wanted])
        return [Storefront.from_json(raw) for raw in stored]

    async def remove(self, tenant: str, origins: Sequence[str] = ()) -> list[str]:
        """Unregister ``origins`` (every one of the tenant's when empty); the origins removed."""
        chosen = [normalize_origin(o) for o in origins]
        removed = await REMOVE(self._redis, [self._hash], [tenant, *chosen])
        return sorted(r.decode() if isinstance(r, bytes) else r for r in removed)

    async def list(self) -> list[Storefront]:
        """Every registered origin, by origin."""
        raw = await self._redis.hvals(self._hash)
        return sorted((Storefront.from_json(r) for r in raw), key=lambda f: f.origin)

    async def find(self, origin: str) -> Storefront | None:
        """The registration of exactly this origin, if any."""
        raw = await self._redis.hget(self._hash, origin)
        return None if raw is None else Storefront.from_json(raw)
