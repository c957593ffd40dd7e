"""Session-wide real servers (Valkey, gRPC, bridge) and per-test clean state."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import redis

from events_server.pb import events_pb2_grpc
from events_server.queue.keys import KeySpace
from events_server.server.app import EventsServer
from events_server.server.auth import ApiKey, new_key
from events_server.server.settings import Settings
from rest_bridge.config import BridgeSettings
from tests.harness.cluster import ValkeyCluster
from tests.harness.data import TEST_TENANTS
from tests.harness.keys import store_key
from tests.harness.rpc import keyed_channel
from tests.harness.servers import (
    LoopThread,
    bridge_settings_for,
    own_settings,
    serving_bridge,
    started_server,
    stop,
)
from tests.harness.streams import Queue
from tests.harness.valkey import SessionValkey, valkey_process
from tests.harness.web import keyed_client


@pytest.fixture(scope="session")
def valkey(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SessionValkey]:
    """A real Redis-compatible server: REDIS_URL if given, else our own valkey-server."""
    if url := os.environ.get("REDIS_URL"):
        yield SessionValkey(url, None)
        return
    with valkey_process(Path(tmp_path_factory.mktemp("valkey"))) as process:
        yield SessionValkey(process.url, process)


@pytest.fixture(scope="session")
def settings(valkey: SessionValkey) -> Settings:
    """Server settings for the session: a key prefix of its own, fast health probes."""
    return own_settings(
        valkey.url,
        f"test-{uuid.uuid4().hex[:8]}",
        shutdown_grace_seconds=1.0,
        metrics_addr="127.0.0.1:0",
        key_cache_seconds=1.0,  # the revocation test waits this long
        # Every test's refusals are the session key's: its share of rejected records would
        # run out over the suite (the share has tests of its own, on servers of their own).
        rejected_records_per_second=0,
    )


@pytest.fixture(scope="session")
def session_key() -> tuple[ApiKey, str]:
    """A key for every tenant the tests write to (TEST_TENANTS): its record and secret."""
    return new_key(TEST_TENANTS, label="tests")


@pytest.fixture(scope="session")
def api_key(valkey: SessionValkey, settings: Settings, session_key: tuple[ApiKey, str]) -> str:
    """The session key's secret; the key is in force (see ``rdb``)."""
    _keep_key(valkey, settings, session_key[0])
    return session_key[1]


def _keep_key(valkey: SessionValkey, settings: Settings, key: ApiKey) -> None:
    """Put the session key in force, and into the snapshot a restarted Valkey loads.

    The tests' Valkey persists nothing by itself; a real one would keep its keys. Loaded
    from the snapshot, the key is there before the restarted server answers anyone (a
    key written after it answers would race the first retried calls).
    """
    client = redis.Redis.from_url(valkey.url, socket_timeout=5)
    try:
        store_key(redis.Redis.from_url(valkey.url), settings.key_prefix, key)
        if valkey.process is not None:
            client.save()
    finally:
        client.close()


@pytest.fixture(scope="session")
def keys(settings: Settings) -> KeySpace:
    """The session's Redis key names."""
    return KeySpace(settings.key_prefix, settings.partitions)


@pytest.fixture(scope="session")
def loop() -> Iterator[LoopThread]:
    """The event loop the in-process servers run on."""
    thread = LoopThread()
    yield thread
    thread.close()


@pytest.fixture(scope="session")
def grpc_server(loop: LoopThread, settings: Settings) -> Iterator[tuple[EventsServer, int]]:
    """The real gRPC server on a free loopback port."""

    server, port = loop.run(started_server(settings))
    yield server, port
    stop(loop, server)


@pytest.fixture
def server(grpc_server: tuple[EventsServer, int]) -> EventsServer:
    """The session's gRPC server."""
    return grpc_server[0]


@pytest.fixture(scope="session")
def grpc_target(grpc_server: tuple[EventsServer, int]) -> str:
    """host:port of the session's gRPC server."""
    return f"127.0.0.1:{grpc_server[1]}"


@pytest.fixture(scope="session")
def channel(grpc_target: str, api_key: str) -> Iterator[grpc.Channel]:
    """A plain (sync) gRPC channel to the server that sends the session's key on every call."""
    with keyed_channel(grpc_target, api_key) as chan:
        yield chan


@pytest.fixture(scope="session")
def stub(channel: grpc.Channel) -> events_pb2_grpc.EventsServiceStub:
    """EventsService client."""
    return events_pb2_grpc.EventsServiceStub(channel)


@pytest.fixture(scope="session")
def bridge_settings(grpc_target: str) -> BridgeSettings:
    """Bridge settings pointing at the session's gRPC server."""
    # (rejected_reports_per_second: as the session server's share of records, see settings.)
    return bridge_settings_for(grpc_target, grpc_timeout_seconds=3.0, rejected_reports_per_second=0)


@pytest.fixture(scope="session")
def bridge(bridge_settings: BridgeSettings) -> Iterator[str]:
    """Base URL of the real bridge app served by uvicorn over loopback HTTP."""
    with serving_bridge(bridge_settings) as url:
        yield url


@pytest.fixture
def http(bridge: str, api_key: str) -> Iterator[httpx.Client]:
    """An HTTP client for the bridge that sends the session's key in the X-API-KEY header."""
    with keyed_client(bridge, api_key) as client:
        yield client


@pytest.fixture
def keyless(bridge: str) -> Iterator[httpx.Client]:
    """A client of the session's bridge that sends no key."""
    with httpx.Client(base_url=bridge, timeout=10) as client:
        yield client


@pytest.fixture
def rdb(
    valkey: SessionValkey, settings: Settings, session_key: tuple[ApiKey, str]
) -> Iterator[redis.Redis]:
    """A plain Redis client; every key of the session's prefix but the session API key's
    is gone before each test (a Valkey restarted by the test comes back in that state)."""
    client = redis.Redis.from_url(valkey.url, socket_timeout=5)
    _delete_prefix(client, settings.key_prefix)
    _keep_key(valkey, settings, session_key[0])
    yield client
    client.close()


@pytest.fixture
def queue(settings: Settings, keys: KeySpace, rdb: redis.Redis, api_key: str) -> Queue:
    """The session's settings, key names, clean Redis and key, together."""
    return Queue(settings, keys, rdb, api_key)


@pytest.fixture
def full_valkey(valkey: SessionValkey, rdb: redis.Redis) -> Iterator[redis.Redis]:
    """The session's Valkey past its maxmemory (writes refused with OOM), restored after."""
    valkey.killable()  # our own server: safe to reconfigure
    rdb.config_set("maxmemory", 1)
    try:
        yield rdb
    finally:
        rdb.config_set("maxmemory", 0)


def _delete_prefix(client: redis.Redis, prefix: str) -> None:
    keep = KeySpace(prefix, 1)
    api_keys = {keep.api_keys().encode(), keep.api_key_digests().encode()}
    for key in client.scan_iter(match=f"{prefix}:*", count=1000):
        if key not in api_keys:  # the session's API key outlives every test
            client.unlink(key)


# --- figures: what the fault and load tests measured, shown at the end of the run ----

FIGURES = pytest.StashKey[list[str]]()


@pytest.fixture
def figures(request: pytest.FixtureRequest) -> Callable[[str], None]:
    """Report a line of figures; they are printed in the run's summary (with or without -s)."""

    def report(line: str) -> None:
        request.config.stash.setdefault(FIGURES, []).append(f"{request.node.name}: {line}")

    return report


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    """Print every reported figure in a section of its own."""
    if lines := config.stash.get(FIGURES, []):
        terminalreporter.section("figures")
        for line in lines:
            terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def valkey_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ValkeyCluster]:
    """A real 3-node Valkey cluster on loopback (started only by the tests that ask for it)."""
    cluster = ValkeyCluster(Path(tmp_path_factory.mktemp("cluster")))
    cluster.start()
    yield cluster
    cluster.stop()
