"""Running a Lua script by its SHA on a single Redis or on a cluster node."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

from redis.exceptions import NoScriptError

from events_server.store import RedisClient


class LuaScript:
    """A script run with EVALSHA, falling back to EVAL where the server lacks it."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    async def __call__(self, redis: RedisClient, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """Run on the node that serves ``keys`` (which must share one hash slot)."""
        try:
            return await redis.execute_command("EVALSHA", self.sha, len(keys), *keys, *args)
        except NoScriptError:
            # NOSCRIPT means nothing ran. EVAL runs it and caches it on this node; SCRIPT
            # LOAD on a cluster would go to every primary and fail while one is down.
            return await redis.execute_command("EVAL", self.source, len(keys), *keys, *args)
