"""What every command shares: opening Redis for one command, and argument types."""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace

from events_server.queue.connection import RedisClient, connect
from events_server.queue.keys import KeySpace
from events_server.server.settings import Settings

REDIS_FLAGS = ("redis_url", "redis_cluster", "key_prefix", "partitions", "redis_timeout_seconds")
"""The settings every queue command needs."""


@asynccontextmanager
async def redis_for(
    settings: Settings, *, timeout_seconds: float | None = None
) -> AsyncIterator[tuple[RedisClient, KeySpace]]:
    """A Redis client and the key names, for as long as one command runs."""
    config = settings.redis
    if timeout_seconds is not None:
        config = replace(config, timeout_seconds=timeout_seconds)
    redis = connect(config)
    try:
        yield redis, KeySpace(settings.key_prefix, settings.partitions)
    finally:
        await redis.aclose()


def non_negative(text: str) -> int:
    """An argparse type: a whole number, 0 or more."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be 0 or more")
    return value


def positive(text: str) -> int:
    """An argparse type: a whole number, 1 or more."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be 1 or more")
    return value
