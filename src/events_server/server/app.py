"""Assembles the grpc.aio server: EventsService, health checking, reflection."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from events_server.ops.access_log import AccessLog
from events_server.ops.exposition import MetricsEndpoint, scrape_registry
from events_server.pb import events_pb2 as pb
from events_server.pb import events_pb2_grpc
from events_server.queue.connection import RedisClient, connect
from events_server.queue.keys import KeySpace
from events_server.server.access import ACCESS_LOGGER, AccessInterceptor
from events_server.server.admission import AdmittingOrigins
from events_server.server.auth import Authenticator, Caller, KeyStore
from events_server.server.batch_link import BatchLinks, link_host
from events_server.server.gathered import GatheredService
from events_server.server.gathered_stream import GatheredStreams
from events_server.server.identity import BridgeIdentity
from events_server.server.limits import Limiter, Rates
from events_server.server.lookups import CachedLookup
from events_server.server.metrics import ServerMetrics
from events_server.server.readiness import Readiness, ReplicaGauges, probe
from events_server.server.rejected import RejectedLog, RejectedServicer
from events_server.server.sampler import RedisSampler
from events_server.server.service import EventsService
from events_server.server.settings import Settings
from events_server.server.store import EventStore, store_for
from events_server.server.storefronts import StorefrontStore
from events_server.server.tls import server_credentials
from events_server.wire.metadata import (
    BRIDGE_INGEST_SERVICE_NAME,
    ORIGINS_SERVICE_NAME,
    REJECTED_SERVICE_NAME,
    SERVICE_NAME,
)
from events_server.wire.rejected import MAX_RECORD_BYTES
from events_server.wire.validation import Limits

log = logging.getLogger(__name__)

GATHER_ROOM = 4 * 1024 * 1024 + 65_536
"""What a gathered call may hold past max_request_bytes: the bridge's default bound on a
call's events (grpc_gather_max_bytes), and its sub-requests' metadata."""

TASK_STOP_SECONDS = 0.5
"""How long a background task has to end once cancelled before it is cancelled again."""

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class EventsServer:
    """A started-or-not gRPC server plus what it owns: Redis client, readiness probe, metrics."""

    def __init__(
        self,
        server: grpc.aio.Server,
        health_servicer: health.aio.HealthServicer,
        store: EventStore,
        redis: RedisClient,
        settings: Settings,
        *,
        metrics: ServerMetrics,
        rejected: RejectedLog | None = None,
        streams: GatheredStreams | None = None,
        links: BatchLinks | None = None,
    ) -> None:
        self.grpc = server
        self.streams = streams
        """The bridge's gathered streams (None: a server built without them)."""
        self.links = links
        """The bridge's batch link (None: a server built without it)."""
        self.metrics = metrics
        self.sampler = RedisSampler(redis, store.keys, settings.metrics_sample_interval_seconds)
        self.replicas = ReplicaGauges()
        self.scrape = scrape_registry(metrics.registry, self.sampler, self.replicas)
        self.metrics_endpoint = (
            MetricsEndpoint(settings.metrics_addr, self.scrape) if settings.metrics_addr else None
        )
        self._health = health_servicer
        self._store = store
        self._redis = redis
        self._settings = settings
        self._tasks: list[asyncio.Task[None]] = []
        self._rejected = rejected
        self._stopping = False
        self._readiness: Readiness | None = None
        self._metrics_listening = False

    def listen_for_metrics(self) -> None:
        """Take the metrics port (OSError when it is taken), before anything else listens."""
        if self.metrics_endpoint is not None and not self._metrics_listening:
            self.metrics_endpoint.start()
            self._metrics_listening = True

    async def start(self) -> None:
        """Start serving (and /metrics); readiness and metrics follow Redis from here on."""
        await self._apply(await self._probe())
        self.listen_for_metrics()
        await self.grpc.start()
        if self.links is not None:
            await self.links.start()
        self._tasks = [asyncio.create_task(self._watch_redis(), name="redis-readiness")]
        if self.metrics_endpoint is not None:  # nobody else would see its readings
            self._tasks.append(asyncio.create_task(self.sampler.run(), name="metrics-sampler"))

    async def stop(self, grace: float | None = None) -> None:
        """Drain: report NOT_SERVING, refuse new calls, let in-flight ones finish within grace."""
        if self._stopping:
            return
        self._stopping = True
        await self._health.enter_graceful_shutdown()
        if self.streams is not None:  # the bridge's streams take no more batches
            self.streams.drain()
        if self.links is not None:  # nor its links
            self.links.drain()
        await stop_tasks(self._tasks)
        grace = self._settings.shutdown_grace_seconds if grace is None else grace
        if self.links is not None:  # the links' batches drain beside the calls
            await asyncio.gather(self.grpc.stop(grace), self.links.wait(grace))
        else:
            await self.grpc.stop(grace)
        if self.metrics_endpoint is not None:
            # Its shutdown waits for the serving thread's next poll: not on the loop.
            await asyncio.to_thread(self.metrics_endpoint.stop)
        if self._rejected is not None:
            await self._rejected.close()
        await self._redis.aclose()

    async def wait_for_termination(self) -> None:
        """Block until the server has stopped."""
        await self.grpc.wait_for_termination()

    async def _set_health(self, serving: bool) -> None:
        status = SERVING if serving else NOT_SERVING
        await self._health.set("", status)
        await self._health.set(SERVICE_NAME, status)

    async def _apply(self, now: Readiness) -> None:
        """Report a probe's result: health, the store's refusal, a log line for each change."""
        was = self._readiness
        self._readiness = now
        self.replicas.update(now)
        # A Redis set up against our promise gets no writes at all: with fsync asked and
        # AOF off, a write would be queued but never acknowledged, and retried forever.
        self._store.refusal = now.reason if now.misconfigured else None
        if was is None or now.serving != was.serving or now.reason != was.reason:
            if now.serving:
                log.info("redis answers: SERVING")
            else:
                log.warning("NOT_SERVING: %s", now.reason)
            await self._set_health(now.serving)
        for warning in now.warnings:
            if was is None or warning not in was.warnings:
                log.warning("%s", warning)

    async def _watch_redis(self) -> None:
        while True:
            await asyncio.sleep(self._settings.health_interval_seconds)
            await self._apply(await self._probe())

    async def _probe(self) -> Readiness:
        settings = self._settings
        return await probe(self._store, settings.durability, settings.replicas_to_confirm)


async def stop_tasks(tasks: Iterable[asyncio.Task[None]]) -> None:
    """Cancel ``tasks`` and wait until they are done. A cancellation that comes as a probe's
    timeout fires can be taken for the timeout (Python 3.11's asyncio.timeout), and the
    task's loop goes on: a stop waited for it for good. Such a task is cancelled again at
    its next wait."""
    pending = set(tasks)
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=TASK_STOP_SECONDS)


def rates_for(caller: Caller, settings: Settings) -> Rates:
    """A caller's rates: a key's own where set, else the server's defaults for its kind."""
    if caller.key is None:
        return Rates(
            settings.storefront_requests_per_second,
            settings.storefront_events_per_second,
            settings.rate_burst_seconds,
        )
    key = caller.key
    return Rates(
        settings.key_requests_per_second
        if key.requests_per_second is None
        else key.requests_per_second,
        settings.key_events_per_second if key.events_per_second is None else key.events_per_second,
        settings.rate_burst_seconds if key.burst_seconds is None else key.burst_seconds,
    )


async def create_server(
    settings: Settings, *, redis: RedisClient | None = None
) -> tuple[EventsServer, int]:
    """Build the server bound to settings.grpc_addr (port 0 picks a free one); not started.

    TlsFilesError (before anything is opened) when a configured TLS file cannot be read.
    """
    credentials = server_credentials(settings)
    redis = redis if redis is not None else connect(settings.redis)
    metrics = ServerMetrics(settings.metrics_max_tenants)
    keys = KeySpace(settings.key_prefix, settings.partitions)
    store = store_for(
        redis,
        keys,
        settings.dedup_ttl_seconds,
        timeout_seconds=settings.redis_timeout_seconds,
        durability=settings.durability,
        replicas=settings.replicas_to_confirm,
        on_unconfirmed=metrics.unconfirmed_write,
        observe_script=metrics.observe_script,
    )
    # Bounded in bytes as well as in count: records have a most size of their own.
    maxlen = min(settings.rejected_maxlen, settings.rejected_max_bytes // MAX_RECORD_BYTES)
    rejected = RejectedLog(
        redis, keys, maxlen, settings.redis_timeout_seconds, settings.rejected_records_per_second
    )
    auth = Authenticator(
        KeyStore(redis, keys),
        settings.key_cache_seconds,
        settings.cors_origins,
        CachedLookup(
            StorefrontStore(redis, keys).find, settings.key_cache_seconds, "storefront origin"
        ),
        peer_unknown_keys_per_second=settings.peer_unknown_keys_per_second,
    )
    bridge = BridgeIdentity(
        settings.bridge_token.get_secret_value() if settings.bridge_token else None,
        client_certificates=bool(settings.tls_client_ca_file),
        names=settings.tls_bridge_names,
    )
    if warning := bridge.startup_warning(settings.grpc_addr):
        log.warning("%s", warning)
    # One sample for the process: calls' and gathered requests' lines alike.
    access = AccessLog(ACCESS_LOGGER, settings.access_log_sample)
    server = grpc.aio.server(
        interceptors=[
            AccessInterceptor(
                metrics, settings.log_client_ip, settings.forwarded_hops, bridge, access
            )
        ],
        # Past it gRPC refuses a call at once (RESOURCE_EXHAUSTED) instead of queueing it.
        maximum_concurrent_rpcs=settings.max_concurrent_calls,
        # grpcio sets SO_REUSEPORT by default on Linux: a second server on the same
        # port would silently take half the traffic. Only our own workers share one.
        options=[
            ("grpc.so_reuseport", 1 if settings.workers > 1 else 0),
            # gRPC's own refusal (RESOURCE_EXHAUSTED) of a message too big to parse at all:
            # with room for the bridge's gathered calls; EventsService holds each request
            # (alone or gathered) to max_request_bytes itself, in gRPC's words.
            ("grpc.max_receive_message_length", settings.max_request_bytes + GATHER_ROOM),
        ],
    )
    events = EventsService(
        store,
        auth,
        settings.partitions,
        settings.forwarded_hops,
        metrics,
        limits=Limits(
            settings.max_events_per_request, settings.max_event_bytes, settings.max_string_length
        ),
        limiter=Limiter(
            redis,
            keys,
            capacity=settings.max_calls_in_progress,
            # Never more than half the pool: the other callers keep connections to use.
            per_caller=max(
                1, min(settings.max_in_flight_per_caller, settings.redis_max_connections // 2)
            ),
        ),
        rates=lambda caller: rates_for(caller, settings),
        write_seconds=settings.redis_timeout_seconds,
        max_request_bytes=settings.max_request_bytes,
        rejected=rejected,
    )
    # Not the generated add_EventsServiceServicer_to_server: CreateEvents (and Track) take
    # the raw request bytes (no request_deserializer), so that the caller is authenticated and
    # the events counted before gRPC would have built every message.
    gathered = GatheredService(events, metrics, settings.log_client_ip, access)
    streams = GatheredStreams(gathered, metrics, settings.log_client_ip, access)
    links = BatchLinks(
        streams,
        link_host(settings.grpc_addr) if settings.batch_link and credentials is None else None,
        settings.max_request_bytes + GATHER_ROOM,
        settings.log_client_ip,
        metrics,
    )
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                SERVICE_NAME,
                {
                    "CreateEvents": grpc.unary_unary_rpc_method_handler(
                        events.CreateEvents,
                        response_serializer=pb.CreateEventsResponse.SerializeToString,
                    ),
                    "Track": grpc.unary_unary_rpc_method_handler(
                        events.Track,
                        response_serializer=pb.CreateEventsResponse.SerializeToString,
                    ),
                },
            ),
            # The bridge's gathered calls: raw bytes too, each sub-request's events parsed
            # only once its caller is admitted.
            grpc.method_handlers_generic_handler(
                BRIDGE_INGEST_SERVICE_NAME,
                {
                    "CreateEventsGathered": grpc.unary_unary_rpc_method_handler(
                        gathered.CreateEventsGathered,
                        response_serializer=pb.GatheredResponse.SerializeToString,
                    ),
                    "StreamGathered": grpc.stream_stream_rpc_method_handler(
                        streams.StreamGathered,
                        response_serializer=pb.GatheredResponse.SerializeToString,
                    ),
                    "OpenBatchLink": grpc.unary_unary_rpc_method_handler(
                        links.OpenBatchLink,
                        request_deserializer=pb.BatchLinkRequest.FromString,
                        response_serializer=pb.BatchLinkOffer.SerializeToString,
                    ),
                },
            ),
        )
    )
    events_pb2_grpc.add_RejectedEventsServicer_to_server(RejectedServicer(rejected, auth), server)
    events_pb2_grpc.add_OriginsServicer_to_server(
        AdmittingOrigins(auth, metrics, settings.forwarded_hops), server
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (
            SERVICE_NAME,
            BRIDGE_INGEST_SERVICE_NAME,
            REJECTED_SERVICE_NAME,
            ORIGINS_SERVICE_NAME,
            health.SERVICE_NAME,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    built = EventsServer(
        server,
        health_servicer,
        store,
        redis,
        settings,
        metrics=metrics,
        rejected=rejected,
        streams=streams,
        links=links,
    )
    built.listen_for_metrics()
    try:
        if credentials is None:
            port = server.add_insecure_port(settings.grpc_addr)
        else:
            port = server.add_secure_port(settings.grpc_addr, credentials)
    except RuntimeError:
        if built.metrics_endpoint is not None:
            built.metrics_endpoint.stop()
        raise
    transport = (
        "mutual TLS" if settings.tls_client_ca_file else "TLS" if credentials else "plaintext"
    )
    log.info(
        "gRPC over %s; the REST bridge is known by %s",
        transport,
        bridge.describe(),
        extra={"transport": transport, "bridge_identity": bridge.mode},
    )
    return built, port
