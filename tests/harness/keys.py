"""API keys put in force in Redis the way ``events-server keys create`` does, and storefront
origins registered the way ``events-server storefronts add`` does."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import replace

import redis

from events_server.queue.connection import RedisConfig, connect
from events_server.queue.keys import KeySpace
from events_server.server.auth import ApiKey, key_writes, new_key
from events_server.server.settings import Settings
from events_server.server.storefronts import StorefrontStore


def create_key(
    redis_url: str,
    prefix: str,
    tenants: Sequence[str],
    label: str = "",
    origins: Sequence[str] = (),
    *,
    requests_per_second: float | None = None,
) -> str:
    """Create an API key in Redis the way ``events-server keys create`` does; its secret."""
    key, secret = new_key(tenants, label, origins)
    key = replace(key, requests_per_second=requests_per_second)
    store_key(redis.Redis.from_url(redis_url), prefix, key)
    return secret


def store_key(client: redis.Redis | redis.RedisCluster, prefix: str, key: ApiKey) -> None:
    """Put a key in force (again: a restarted Valkey has lost it) and close the client."""
    names = KeySpace(prefix, 1)
    try:
        for name, field, value in key_writes(key, names.api_keys(), names.api_key_digests()):
            client.hset(name, field, value)
    finally:
        client.close()


def register_storefront(settings: Settings, tenant: str, origin: str) -> None:
    """Register a storefront origin for ``tenant`` (in this process: no command to start)."""

    async def add() -> None:
        client = connect(RedisConfig(url=settings.redis_url))
        try:
            await StorefrontStore(client, KeySpace(settings.key_prefix, 1)).add(tenant, [origin])
        finally:
            await client.aclose()

    asyncio.run(add())
