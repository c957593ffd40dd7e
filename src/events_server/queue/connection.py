"""Connecting to Redis: one server or a Redis Cluster, with no silent retries."""

from __future__ import annotations

from dataclasses import dataclass

from redis.asyncio import Redis, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException, RedisError

RedisClient = Redis | RedisCluster
"""Either client the service runs on: one Redis server, or a Redis Cluster (see ``connect``)."""

CLUSTER_ERRORS = (RedisError, RedisClusterException)
"""What a call can raise: on a cluster, RedisClusterException, which is not a RedisError."""


@dataclass(frozen=True, slots=True)
class RedisConfig:
    """Where Redis is and how long to wait for it: what every process needs to connect."""

    url: str = "redis://127.0.0.1:6379/0"
    cluster: bool = False
    timeout_seconds: float = 2.0
    max_connections: int = 64
    """Pool size (per node, on a cluster)."""


def connect(config: RedisConfig) -> RedisClient:
    """A Redis (or, with ``cluster``, a cluster) client bounded by the configured timeout."""
    if config.cluster:
        return RedisCluster.from_url(
            config.url,
            socket_timeout=config.timeout_seconds,
            socket_connect_timeout=config.timeout_seconds,
            max_connections=config.max_connections,
            # As below, no silent retries. The cluster client still follows MOVED/ASK
            # redirects: those replies mean the command did not run.
            retry=Retry(NoBackoff(), 0),
            # With one node down its slots are unreachable; the others must keep serving.
            require_full_coverage=False,
        )
    return Redis.from_url(
        config.url,
        socket_timeout=config.timeout_seconds,
        socket_connect_timeout=config.timeout_seconds,
        max_connections=config.max_connections,
        # No silent retries: after a lost reply the script may already have run,
        # and re-running it would queue id-less events twice. The caller's retry
        # (with the same deduplication_ids) is the safe one.
        retry=Retry(NoBackoff(), 0),
    )
