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


def test_calls_arriving_together_share_one_lookup_and_one_giving_up_leaves_the_rest() -> None:
    fetched: list[str] = []
    release = asyncio.Event()

    async def fetch(name: str) -> str | None:
        fetched.append(name)
        await release.wait()
        return "record"

    async def scenario() -> list[str | None]:
        lookup = CachedLookup(fetch, ttl_seconds=60, what="API key")
        waiting = [asyncio.create_task(lookup("k")) for _ in range(100)]
        await asyncio.sleep(0)
        waiting[0].cancel()  # its deadline passed
        await asyncio.sleep(0)
        release.set()
        answers = await asyncio.gather(*waiting[1:])
        return [*answers, await lookup("k")]

    answers = asyncio.run(scenario())
    assert answers == ["record"] * 100
    assert fetched == ["k"]


def test_a_failed_shared_lookup_fails_every_waiter_and_the_next_call_asks_again() -> None:
    calls = 0

    async def fetch(name: str) -> str | None:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.01)
        if calls == 1:
            raise RedisConnectionError("down")
        return "record"

    async def scenario() -> tuple[list[BaseException | str | None], str | None]:
        lookup = CachedLookup(fetch, ttl_seconds=60, what="API key")
        together = await asyncio.gather(*(lookup("k") for _ in range(3)), return_exceptions=True)
        return together, await lookup("k")

    together, after = asyncio.run(scenario())
    assert all(isinstance(answer, StoreUnavailable) for answer in together)
    assert (after, calls) == ("record", 2)
