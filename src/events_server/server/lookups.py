"""A cached Redis lookup (an API key, a storefront origin): reused, found or not, for a while."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from redis.exceptions import RedisError

from events_server.server.errors import StoreUnavailable

T = TypeVar("T")

CACHE_LIMIT = 10_000
"""Cached lookups per process; past it the cache starts over (a flood of made-up names)."""


class CachedLookup(Generic[T]):
    """``fetch(name)`` from Redis, each answer (None too) reused for ``ttl_seconds``.

    The time bounds how long a revoked key keeps working, and how long a new one may be
    refused after a client tried it before it existed. A Redis failure is
    StoreUnavailable, never "not found": the name may well be good, and the client
    should retry.
    """

    def __init__(
        self, fetch: Callable[[str], Awaitable[T | None]], ttl_seconds: float, what: str
    ) -> None:
        self._fetch = fetch
        self._ttl = ttl_seconds
        self._what = what
        # Found and not found apart: a flood of made-up names fills (and starts over) only
        # the second, so the names in real use stay cached whatever it sends.
        self._found: dict[str, tuple[float, T | None]] = {}
        self._missing: dict[str, tuple[float, T | None]] = {}
        self._pending: dict[str, asyncio.Future[T | None]] = {}

    def found_before(self, name: str) -> bool:
        """Whether ``name`` was found when last looked up (its answer may have expired)."""
        return name in self._found

    def fresh(self, name: str) -> tuple[float, T | None] | None:
        """The cached answer for ``name`` while it is fresh (when it expires, and the answer
        itself: None when not found); None when there is none (a lookup is due)."""
        cached = self._found.get(name) or self._missing.get(name)
        if cached is not None and cached[0] > time.monotonic():
            return cached
        return None

    async def __call__(self, name: str, *, fetch: bool = True) -> T | None:
        """The answer for ``name``; without ``fetch``, only a cached one (else None)."""
        if (cached := self.fresh(name)) is not None:
            return cached[1]
        if not fetch:
            return None
        # One lookup per name at a time: a hundred calls of a key arriving together (a
        # client's start, or every call once its cache entry expires) share one.
        pending = self._pending.get(name)
        if pending is None:
            pending = self._pending[name] = asyncio.ensure_future(self._look_up(name))
            pending.add_done_callback(functools.partial(self._landed, name))
        # Shielded: one caller giving up (its deadline) does not cancel the others' lookup.
        return await asyncio.shield(pending)

    async def _look_up(self, name: str) -> T | None:
        try:
            found = await self._fetch(name)
        except RedisError as error:
            raise StoreUnavailable(
                f"redis: {type(error).__name__}: {error} (checking the {self._what})"
            ) from error
        cache = self._found if found is not None else self._missing
        if len(cache) >= CACHE_LIMIT:
            cache.clear()
        self._found.pop(name, None)
        self._missing.pop(name, None)
        cache[name] = (time.monotonic() + self._ttl, found)
        return found

    def _landed(self, name: str, lookup: asyncio.Future[T | None]) -> None:
        del self._pending[name]
        if not lookup.cancelled():
            lookup.exception()  # retrieved: every caller may have given up waiting
