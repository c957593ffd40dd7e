"""Prometheus metrics of the gRPC server, and what both processes share to expose theirs.

Every instance has a registry of its own (tests run several servers in one
process). With ``PROMETHEUS_MULTIPROC_DIR`` set in the environment before the
process starts, prometheus-client keeps every counter and histogram in files
there, and a scrape of any process adds up all processes that share the
directory (one directory per service: the bridge and the server must not share one).

Label values are bounded: event types, outcomes, reasons, methods and codes
come from fixed sets, and tenants are capped (``TenantLabels``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import operator
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    start_http_server,
)
from prometheus_client import values as prometheus_values
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from redis.asyncio import Redis

from events_server.codec import TYPE_NAMES
from events_server.errors import IngestError, InvalidEvents, StoreUnavailable
from events_server.keys import KeySpace
from events_server.pb import events_pb2 as pb

log = logging.getLogger(__name__)

M = TypeVar("M", Counter, Histogram)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

OTHER_TENANT = "_other"
"""Tenant label of every tenant past the cap (and of all of them when the cap is 0)."""

MAX_TENANT_LABEL_CHARS = 64

ACCEPTED, DUPLICATE, REJECTED = "accepted", "duplicate", "rejected"

BATCH_REJECTED = "batch_rejected"
"""Reason of a valid event refused because another event of its request was invalid."""

AUTH_FAILURE_KINDS = ("missing_key", "unknown_key", "tenant_not_allowed")
"""Kinds of ``events_auth_failures_total``: no key, a key we do not know, a key not for the
tenant. Counted once API keys are enforced (``ServerMetrics.auth_failure``)."""

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
SCRIPT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

_STATUS_OUTCOME = {
    pb.EventResult.STATUS_ACCEPTED: ACCEPTED,
    pb.EventResult.STATUS_DUPLICATE: DUPLICATE,
}
_TENANT_TYPE = operator.attrgetter("tenant", "type")
_FIELD_INDEX = re.compile(r"^events\[(\d+)\]")


def multiprocess_dir() -> str | None:
    """The directory of multiprocess mode, when this process runs in it."""
    return os.environ.get(MULTIPROC_ENV) or None


@contextlib.contextmanager
def shared_by_workers() -> Iterator[str]:
    """Multiprocess mode for the workers started inside: the given directory, or a temporary one.

    For a supervisor, before it forks or spawns workers. The directory is emptied
    first: files of an earlier run would be added to this one's figures.
    """
    given = multiprocess_dir()
    made = None if given else tempfile.mkdtemp(prefix="events-metrics-")
    directory = given or made
    assert directory is not None
    for stale in Path(directory).glob("*.db"):
        stale.unlink()
    os.environ[MULTIPROC_ENV] = directory
    # prometheus-client picks its value class on import, which has happened: pick
    # again, so that metrics made after a fork keep their values in files too.
    prometheus_values.ValueClass = prometheus_values.get_value_class()  # type: ignore[no-untyped-call]
    try:
        yield directory
    finally:
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)


def scrape_registry(own: CollectorRegistry, *local: Collector) -> CollectorRegistry:
    """What a scrape reads: ``own`` plus ``local`` collectors, or every process's metrics.

    ``local`` collectors report state that any one process can see whole (such as
    queue lengths read from Redis), so they are never added up across processes.
    """
    if multiprocess_dir() is None:
        ProcessCollector(registry=own)
        for collector in local:
            own.register(collector)
        return own
    merged = CollectorRegistry()
    MultiProcessCollector(merged)  # type: ignore[no-untyped-call]
    for collector in local:
        merged.register(collector)
    return merged


class LabelCache:
    """Labelled children by label values: ``labels()`` validates and locks on every call."""

    def __init__(self) -> None:
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}

    def get(self, metric: M, labels: tuple[str, ...]) -> M:
        """``metric.labels(*labels)``, looked up once."""
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child


class TenantLabels:
    """Bounded tenant label values: the first ``limit`` tenants seen keep their name."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._known: set[str] = set()

    def __call__(self, tenant: str, admit: bool = True) -> str:
        """The label for ``tenant``; only ``admit`` may take one of the free places."""
        if tenant in self._known:
            return tenant
        if admit and len(self._known) < self._limit and 0 < len(tenant) <= MAX_TENANT_LABEL_CHARS:
            self._known.add(tenant)
            return tenant
        return OTHER_TENANT


def _reasons(count: int, error: IngestError) -> list[str]:
    """Why each of ``count`` events of a failed request was refused."""
    if isinstance(error, InvalidEvents):
        reasons = [BATCH_REJECTED] * count
        seen: set[int] = set()
        for violation in error.violations:
            match = _FIELD_INDEX.match(violation.field)
            if match is not None and (index := int(match[1])) < count and index not in seen:
                seen.add(index)  # an event's first violation names it
                reasons[index] = violation.reason or "invalid"
        return reasons
    if isinstance(error, StoreUnavailable):
        return ["unavailable"] * count
    return ["error"] * count


class ServerMetrics:
    """The gRPC server's counters and histograms; cheap enough to update on every call."""

    def __init__(self, max_tenants: int, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.tenant_label = TenantLabels(max_tenants)
        self._children = LabelCache()
        self.events = Counter(
            "events",
            "Events by tenant, type and outcome (accepted, duplicate, rejected); reason says why"
            " one was rejected.",
            ["tenant", "type", "outcome", "reason"],
            registry=self.registry,
        )
        self.rpc_requests = Counter(
            "events_grpc_requests",
            "gRPC calls by method and status code.",
            ["method", "code"],
            registry=self.registry,
        )
        self.rpc_seconds = Histogram(
            "events_grpc_request_duration_seconds",
            "Time to answer a gRPC call, by method.",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.script_seconds = Histogram(
            "events_redis_script_duration_seconds",
            "Round trip of one pipeline of dedup+enqueue script calls to Redis.",
            buckets=SCRIPT_BUCKETS,
            registry=self.registry,
        )
        self.auth_failures = Counter(
            "events_auth_failures",
            "Refused API keys by kind: " + ", ".join(AUTH_FAILURE_KINDS) + ".",
            ["kind"],
            registry=self.registry,
        )
        for kind in AUTH_FAILURE_KINDS:  # present at 0 from the start, so rates work
            self.auth_failures.labels(kind)

    def count_events(
        self,
        events: Sequence[pb.Event],
        reply: pb.CreateEventsResponse | None,
        error: IngestError | None = None,
    ) -> None:
        """Count a call's events by outcome: from its reply, or from the error that ended it."""
        counts: dict[tuple[str, int, str, str], int] = {}
        if reply is not None and (reply.duplicates == 0 or reply.accepted == 0):
            # One outcome for all (the usual case): no need to walk the results.
            outcome = ACCEPTED if reply.duplicates == 0 else DUPLICATE
            for (tenant, kind), n in collections.Counter(map(_TENANT_TYPE, events)).items():
                counts[tenant, kind, outcome, ""] = n
        elif reply is not None:
            for event, result in zip(events, reply.results, strict=False):
                key = (event.tenant, event.type, _STATUS_OUTCOME.get(result.status, "unknown"), "")
                counts[key] = counts.get(key, 0) + 1
        elif error is not None:
            for event, reason in zip(events, _reasons(len(events), error), strict=True):
                key = (event.tenant, event.type, REJECTED, reason)
                counts[key] = counts.get(key, 0) + 1
        # One increment per distinct key, not per event.
        for (tenant, kind, outcome, reason), n in counts.items():
            labels = (
                self.tenant_label(tenant, admit=outcome != REJECTED),
                TYPE_NAMES.get(kind, "unknown"),
                outcome,
                reason,
            )
            self._children.get(self.events, labels).inc(n)

    def observe_rpc(self, method: str, code: str, seconds: float) -> None:
        """Count one finished gRPC call and its duration."""
        self._children.get(self.rpc_requests, (method, code)).inc()
        self._children.get(self.rpc_seconds, (method,)).observe(seconds)

    def observe_script(self, seconds: float) -> None:
        """Record one round trip of script calls to Redis."""
        self.script_seconds.observe(seconds)

    def auth_failure(self, kind: str) -> None:
        """Count one refused API key (``kind`` from AUTH_FAILURE_KINDS)."""
        self.auth_failures.labels(kind).inc()


class RedisSampler:
    """Reads queue sizes from Redis every ``interval`` seconds; exposes the last reading.

    Per partition: stream length, and for every consumer group (XINFO GROUPS) its
    lag and pending count. Plus the number of keys with a TTL in the Redis db,
    which is the dedup key count when the db is this service's own (nothing else
    we write expires). Read periodically, never per request; after a failed
    reading the series disappear rather than show stale figures.
    """

    def __init__(self, redis: Redis, keys: KeySpace, interval: float) -> None:
        self._redis = redis
        self._keys = keys
        self._interval = interval
        self._db = str(redis.connection_pool.connection_kwargs.get("db", 0))
        self._families: list[Metric] = []

    def collect(self) -> Iterable[Metric]:
        """The last reading (called by the scrape, from any thread)."""
        return list(self._families)

    async def sample(self) -> None:
        """Take one reading now."""
        streams = self._keys.streams()
        async with self._redis.pipeline(transaction=False) as pipe:
            for stream in streams:
                pipe.xlen(stream)
            for stream in streams:
                pipe.xinfo_groups(stream)
            pipe.info("keyspace")
            replies: list[Any] = await pipe.execute(raise_on_error=False)
        lengths, groups, keyspace = replies[: len(streams)], replies[len(streams) : -1], replies[-1]
        for reply in (*lengths, keyspace):
            if isinstance(reply, Exception):
                raise reply

        length = GaugeMetricFamily(
            "events_stream_length", "Entries in each partition stream.", labels=["partition"]
        )
        lag = GaugeMetricFamily(
            "events_group_lag",
            "Entries of a partition stream not yet delivered to a consumer group.",
            labels=["partition", "group"],
        )
        pending = GaugeMetricFamily(
            "events_group_pending",
            "Entries delivered to a consumer group but not yet acknowledged.",
            labels=["partition", "group"],
        )
        for partition, (count, infos) in enumerate(zip(lengths, groups, strict=True)):
            length.add_metric([str(partition)], float(count))
            if isinstance(infos, Exception):  # no such stream yet, so no groups either
                continue
            for info in infos:
                name = info["name"].decode(errors="replace")
                pending.add_metric([str(partition), name], float(info["pending"]))
                if info.get("lag") is not None:  # Redis cannot always tell (after deletions)
                    lag.add_metric([str(partition), name], float(info["lag"]))
        dedup = GaugeMetricFamily(
            "events_dedup_keys",
            "Keys with a TTL in the Redis db: the dedup keys, when the db is the service's own.",
        )
        dedup.add_metric([], float(keyspace.get(f"db{self._db}", {}).get("expires", 0)))
        self._families = [length, lag, pending, dedup]

    async def run(self) -> None:
        """Sample until cancelled; a failed reading clears the figures and is retried."""
        healthy = True
        while True:
            try:
                await self.sample()
                healthy = True
            except Exception as exc:  # whatever it is, the sampler must outlive it
                self._families = []
                if healthy:
                    log.warning("metrics: cannot read queue sizes from redis: %r", exc)
                healthy = False
            await asyncio.sleep(self._interval)


class MetricsEndpoint:
    """Serves a registry on its own HTTP port, in a thread (the gRPC server's /metrics)."""

    def __init__(self, addr: str, registry: CollectorRegistry) -> None:
        host, _, port = addr.rpartition(":")
        self._host = host.strip("[]")
        self._port = int(port)
        self._registry = registry
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The port it listens on (the chosen one when asked for port 0)."""
        return self._server.server_port if self._server is not None else self._port

    def start(self) -> None:
        """Listen; fails (OSError) when the port is taken."""
        self._server, self._thread = start_http_server(self._port, self._host, self._registry)

    def stop(self) -> None:
        """Stop listening."""
        if self._server is not None:
            with contextlib.suppress(OSError):
                self._server.shutdown()
                self._server.server_close()
            if self._thread is not None:
                self._thread.join(5)
