"""Assembles the grpc.aio server: EventsService, health checking, reflection."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from events_server.cluster import store_for
from events_server.config import Settings
from events_server.keys import KeySpace
from events_server.pb import events_pb2, events_pb2_grpc
from events_server.service import EventsService
from events_server.store import EventStore, RedisClient, connect

log = logging.getLogger(__name__)

SERVICE_NAME = events_pb2.DESCRIPTOR.services_by_name["EventsService"].full_name
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class EventsServer:
    """A started-or-not gRPC server plus what it owns: the Redis client and the readiness probe."""

    def __init__(
        self,
        server: grpc.aio.Server,
        health_servicer: health.aio.HealthServicer,
        store: EventStore,
        redis: RedisClient,
        settings: Settings,
    ) -> None:
        self.grpc = server
        self._health = health_servicer
        self._store = store
        self._redis = redis
        self._settings = settings
        self._watcher: asyncio.Task[None] | None = None
        self._stopping = False

    async def start(self) -> None:
        """Start serving; readiness follows Redis from here on."""
        await self._set_health(await self._store.ping())
        await self.grpc.start()
        self._watcher = asyncio.create_task(self._watch_redis(), name="redis-readiness")

    async def stop(self, grace: float | None = None) -> None:
        """Drain: report NOT_SERVING, refuse new calls, let in-flight ones finish within grace."""
        if self._stopping:
            return
        self._stopping = True
        await self._health.enter_graceful_shutdown()
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        await self.grpc.stop(self._settings.shutdown_grace_seconds if grace is None else grace)
        await self._redis.aclose()

    async def wait_for_termination(self) -> None:
        """Block until the server has stopped."""
        await self.grpc.wait_for_termination()

    async def _set_health(self, serving: bool) -> None:
        status = SERVING if serving else NOT_SERVING
        await self._health.set("", status)
        await self._health.set(SERVICE_NAME, status)

    async def _watch_redis(self) -> None:
        was_serving: bool | None = None
        while True:
            serving = await self._store.ping()
            if serving != was_serving:
                if serving:
                    log.info("redis answers: SERVING")
                else:
                    log.warning("redis does not answer: NOT_SERVING")
                await self._set_health(serving)
                was_serving = serving
            await asyncio.sleep(self._settings.health_interval_seconds)


async def create_server(
    settings: Settings, *, redis: RedisClient | None = None
) -> tuple[EventsServer, int]:
    """Build the server bound to settings.grpc_addr (port 0 picks a free one); not started."""
    redis = redis if redis is not None else connect(settings)
    store = store_for(
        redis, KeySpace(settings.key_prefix, settings.partitions), settings.dedup_ttl_seconds
    )
    server = grpc.aio.server(
        # grpcio sets SO_REUSEPORT by default on Linux: a second server on the same
        # port would silently take half the traffic. Multi-process mode opts back in.
        options=[("grpc.so_reuseport", 0)],
    )
    events_pb2_grpc.add_EventsServiceServicer_to_server(
        EventsService(store, settings.partitions, settings.forwarded_hops), server
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    port = server.add_insecure_port(settings.grpc_addr)
    return EventsServer(server, health_servicer, store, redis, settings), port
