"""Acknowledged means on two nodes: one primary and its replica, EVENTS_CONFIRM_REPLICAS=1.

Each request's scripts are followed by one WAIT on the same connection; a replica that
does not confirm in time makes the outcome unknown, so the write is refused as retryable
(UNAVAILABLE, the bridge's 503), counted by node and logged; the retry is deduplicated,
and its dedup hit writes the partition's barrier so that its WAIT covers the first copy.
The cluster and failover cases are tests/reliability/cluster/test_failover.py's.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis

from events_server.pb import events_pb2_grpc
from events_server.queue.keys import KeySpace
from events_server.server.auth import ApiKey
from events_server.server.routing import partition_for
from events_server.server.script import ENQUEUE_SCRIPT
from tests.harness.data import ev
from tests.harness.keys import store_key
from tests.harness.rpc import (
    ACCEPTED,
    DUPLICATE,
    NOT_SERVING,
    SERVING,
    health_of,
    keyed_channel,
    send,
    statuses,
)
from tests.harness.servers import LoopThread, own_settings, serving
from tests.harness.streams import stream_contents
from tests.harness.valkey import ValkeyProcess, start_replica
from tests.harness.waiting import eventually

PREFIX = "replicated"


@pytest.fixture
def primary(tmp_path: Path, session_key: tuple[ApiKey, str]) -> Iterator[ValkeyProcess]:
    """A Valkey of the test's own, holding the session's API key."""
    process = ValkeyProcess(tmp_path / "primary")
    process.start()
    store_key(redis.Redis.from_url(process.url), PREFIX, session_key[0])
    try:
        yield process
    finally:
        process.kill()


@pytest.fixture
def replica(primary: ValkeyProcess, tmp_path: Path) -> Iterator[ValkeyProcess]:
    """A replica of ``primary``, in sync (resumed and killed however the test ends)."""
    process = start_replica(primary, tmp_path / "replica")
    try:
        yield process
    finally:
        assert process.proc is not None
        process.proc.send_signal(signal.SIGCONT)
        process.kill()


def sample(server: Any, name: str, **labels: str) -> float | None:
    """A sample of the server's /metrics, as a scrape would read it."""
    value: float | None = server.scrape.get_sample_value(name, labels)
    return value


def acknowledged(stub: events_pb2_grpc.EventsServiceStub, dedup_id: str) -> bool:
    """Whether an event with this deduplication_id is acknowledged now."""
    try:
        send(stub, ev(deduplication_id=dedup_id))
    except grpc.RpcError as error:
        if error.code() != grpc.StatusCode.UNAVAILABLE:
            raise
        return False
    return True


def test_one_wait_per_request_and_a_lagging_replica_refuses_as_retryable(
    primary: ValkeyProcess,
    replica: ValkeyProcess,
    session_key: tuple[ApiKey, str],
    loop: LoopThread,
    caplog: pytest.LogCaptureFixture,
) -> None:
    client = redis.Redis.from_url(primary.url, socket_timeout=5)
    client.script_load(ENQUEUE_SCRIPT)  # no NOSCRIPT round: exact command counts
    settings = own_settings(primary.url, PREFIX, confirm_replicas=1)
    keys = KeySpace(PREFIX, settings.partitions)
    node = f"127.0.0.1:{primary.port}"
    assert replica.proc is not None
    with (
        caplog.at_level(logging.INFO, logger="events_server"),
        serving(loop, settings) as (server, target),
        keyed_channel(target, session_key[1]) as channel,
    ):
        stub = events_pb2_grpc.EventsServiceStub(channel)
        assert health_of(channel) == SERVING
        assert sample(server, "events_redis_replicas_in_sync", node=node) == 1
        assert sample(server, "events_redis_primaries_short_of_replicas") == 0
        client.config_resetstat()
        events = [ev(deduplication_id=f"r-{n}", user_id=f"u{n}") for n in range(20)]
        assert statuses(send(stub, *events)) == [ACCEPTED] * 20
        stats: Any = client.info("commandstats")
        # One WAIT per request, after its scripts (one per partition) on the same connection.
        assert stats["cmdstat_wait"]["calls"] == 1
        assert stats["cmdstat_evalsha"]["calls"] == len({partition_for(e, 8) for e in events})

        os.kill(replica.proc.pid, signal.SIGSTOP)
        lagging = ev(deduplication_id="while-lagging")
        with pytest.raises(grpc.RpcError) as caught:
            send(stub, lagging)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "0 of the 1 replicas required" in (caught.value.details() or "")
        # Unknown, not failed: the primary has it, which is why the retry must be safe.
        assert list(stream_contents(client, keys)).count("while-lagging") == 1
        assert sample(server, "events_redis_confirmations_timed_out_total", node=node) == 1
        assert any(
            f"redis {node}: redis confirmed the write on 0 of the 1 replicas" in r.getMessage()
            for r in caplog.records
        )

        os.kill(replica.proc.pid, signal.SIGCONT)
        client.config_resetstat()
        assert statuses(send(stub, lagging)) == [DUPLICATE]
        stats = client.info("commandstats")
        # The duplicate's first copy was written by another request: the dedup hit wrote
        # the partition's barrier, which the retry's WAIT covers, and so the first copy.
        assert stats["cmdstat_set"]["calls"] == 1
        assert stats["cmdstat_wait"]["calls"] == 1
        assert any("confirms writes again" in r.getMessage() for r in caplog.records)
    with redis.Redis(port=replica.port, socket_timeout=5) as on_replica:
        assert (
            stream_contents(on_replica, keys)["while-lagging"]
            == stream_contents(client, keys)["while-lagging"]
        )
    client.close()


def test_a_primary_without_the_replicas_writes_need_is_not_serving_and_refuses_them(
    primary: ValkeyProcess,
    session_key: tuple[ApiKey, str],
    loop: LoopThread,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = own_settings(primary.url, PREFIX, confirm_replicas=1, redis_timeout_seconds=0.5)
    node = f"127.0.0.1:{primary.port}"
    with (
        caplog.at_level(logging.WARNING, logger="events_server"),
        serving(loop, settings) as (server, target),
        keyed_channel(target, session_key[1]) as channel,
    ):
        stub = events_pb2_grpc.EventsServiceStub(channel)
        # Asked for a replica it does not have: never a silent unreplicated acknowledgement.
        assert health_of(channel) == NOT_SERVING
        assert any(
            "NOT_SERVING: no redis primary has the 1 replicas in sync" in r.getMessage()
            for r in caplog.records
        )
        assert any(
            "redis has 0 replicas in sync, and writes need 1" in r.getMessage()
            for r in caplog.records
        )
        assert sample(server, "events_redis_replicas_in_sync", node=node) == 0
        assert sample(server, "events_redis_primaries_short_of_replicas") == 1
        with pytest.raises(grpc.RpcError) as caught:
            send(stub, ev(deduplication_id="alone"))
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE

        replica = start_replica(primary, tmp_path / "replica")
        try:
            eventually(lambda: health_of(channel) == SERVING)
            assert sample(server, "events_redis_primaries_short_of_replicas") == 0
            # The retry is safe: the refused write may have been stored. (A replica just
            # in sync may take a moment to answer its first acknowledgement request.)
            eventually(lambda: acknowledged(stub, "alone"))
            assert statuses(send(stub, ev(deduplication_id="alone"))) == [DUPLICATE]
        finally:
            replica.kill()


def test_one_redis_without_replicas_acknowledges_as_before_by_default(
    primary: ValkeyProcess, session_key: tuple[ApiKey, str], loop: LoopThread
) -> None:
    # make run: one embedded Valkey, no replica, and nothing to configure.
    settings = own_settings(primary.url, PREFIX)
    assert settings.replicas_to_confirm == 0
    client = redis.Redis.from_url(primary.url, socket_timeout=5)
    with (
        serving(loop, settings) as (_, target),
        keyed_channel(target, session_key[1]) as channel,
    ):
        assert health_of(channel) == SERVING
        client.config_resetstat()
        stub = events_pb2_grpc.EventsServiceStub(channel)
        assert statuses(send(stub, ev(deduplication_id="one"))) == [ACCEPTED]
        assert statuses(send(stub, ev(deduplication_id="one"))) == [DUPLICATE]
        stats: Any = client.info("commandstats")
        assert "cmdstat_wait" not in stats
    client.close()
