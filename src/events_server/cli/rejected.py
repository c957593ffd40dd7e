"""``events-server tail --rejected``: reading the rejected-request records back."""

from __future__ import annotations

import asyncio
import json
from typing import Any, TextIO

from events_server.cli.common import redis_for
from events_server.queue.connection import RedisClient
from events_server.queue.keys import F_AT, F_ERRORS, F_PAYLOAD, F_SIZE, F_SOURCE, F_TENANT, KeySpace
from events_server.queue.reading import entry_key
from events_server.server.settings import Settings


async def show_rejected(
    settings: Settings, tenant: str | None, count: int | None, follow: bool, out: TextIO
) -> None:
    """Print rejected-request records as JSON lines (the server's rejected record)."""
    async with redis_for(settings, timeout_seconds=10.0) as (redis, keys):
        await tail_rejected(redis, keys, tenant=tenant, count=count, follow=follow, out=out)


def record_to_dict(key: str, entry_id: bytes, fields: dict[bytes, bytes]) -> dict[str, Any]:
    """JSON form of one record, for people and for JSONL sinks."""
    payload = fields.get(F_PAYLOAD, b"")
    size = int(fields.get(F_SIZE, b"0"))
    return {
        "stream": key,
        "entry_id": entry_id.decode(),
        "tenant": fields.get(F_TENANT, b"").decode(errors="replace"),
        "at": fields.get(F_AT, b"").decode(),
        "source": fields.get(F_SOURCE, b"").decode(),
        "errors": json.loads(fields.get(F_ERRORS, b"[]")),
        # A cut may split a UTF-8 sequence (or the body was not UTF-8 at all).
        "payload": payload.decode(errors="replace"),
        "payload_size": size,
        "truncated": size > len(payload),
    }


async def _rejected_streams(redis: RedisClient, keys: KeySpace, tenant: str | None) -> list[str]:
    if tenant is not None:
        return [keys.rejected(tenant)]
    found: list[str] = []
    async for name in redis.scan_iter(match=keys.rejected_pattern(), count=1000, _type="STREAM"):
        found.append(name.decode())
    return sorted(found)


async def tail_rejected(
    redis: RedisClient,
    keys: KeySpace,
    *,
    tenant: str | None,
    count: int | None,
    follow: bool,
    out: TextIO,
    block_ms: int = 1000,
) -> None:
    """Print rejected-request records as JSON lines, oldest first (all, or the last count)."""

    def show(key: str, entry_id: bytes, fields: dict[bytes, bytes]) -> None:
        out.write(json.dumps(record_to_dict(key, entry_id, fields), ensure_ascii=False) + "\n")
        out.flush()

    # The streams are capped, so reading each one whole is bounded.
    found: list[tuple[tuple[int, int], str, bytes, dict[bytes, bytes]]] = []
    last_seen: dict[Any, Any] = {}
    for key in await _rejected_streams(redis, keys, tenant):
        if count is None:
            entries: Any = await redis.xrange(key)
        else:
            newest: Any = await redis.xrevrange(key, count=count)
            entries = list(reversed(newest))
        found.extend((entry_key(i), key, i, f) for i, f in entries)
        # Follow on from what was read, not from "$": nothing slips in between.
        last_seen[key] = entries[-1][0].decode() if entries else "0-0"
    found.sort()
    if count is not None:
        found = found[-count:] if count else []
    for _, key, entry_id, fields in found:
        show(key, entry_id, fields)

    while follow:
        if tenant is None:
            # New tenants' streams appear at any time.
            for key in await _rejected_streams(redis, keys, None):
                last_seen.setdefault(key, "0-0")
        if not last_seen:
            await asyncio.sleep(block_ms / 1000)
            continue
        reply: Any = await redis.xread(last_seen, block=block_ms)
        for raw_key, entries in reply or ():
            key = raw_key.decode()
            for entry_id, fields in entries:
                show(key, entry_id, fields)
                last_seen[key] = entry_id.decode()
