"""CachedLookup: answers reused for a while; a flood of misses never evicts the hits."""

from __future__ import annotations

import asyncio

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from events_server.server.errors import StoreUnavailable
from events_server.server.lookups import CACHE_LIMIT, CachedLookup


def test_a_flood_of_made_up_names_leaves_the_real_ones_cached() -> None:
    fetched: list[str] = []

    async def fetch(name: str) -> str | None:
        fetched.append(name)
        return "record" if name == "real" else None

    async def scenario() -> None:
        lookup = CachedLookup(fetch, ttl_seconds=60, what="API key")
        assert await lookup("real") == "record"
        for n in range(2 * CACHE_LIMIT):
            assert await lookup(f"made-up-{n}") is None
        assert await lookup("real") == "record"
        assert await lookup("made-up-0") is None  # misses are cached too, then start over

    asyncio.run(scenario())
    assert fetched.count("real") == 1
    assert len(fetched) == 1 + 2 * CACHE_LIMIT + 1


def test_a_redis_failure_is_unavailable_not_not_found() -> None:
    async def fetch(name: str) -> str | None:
        raise RedisConnectionError("down")

    async def scenario() -> None:
        with pytest.raises(StoreUnavailable, match="checking the API key"):
            await CachedLookup(fetch, ttl_seconds=60, what="API key")("k")

    asyncio.run(scenario())
