"""Acknowledged means on two nodes: no acknowledged event lost when a Valkey primary dies.

A 3-primary + 3-replica cluster at the Valkey settings docs/scaling.md gives, the server
(a process of its own) at its production settings (EVENTS_REDIS_CLUSTER=true, replica
confirmation at its default), six writers whose events all carry a deduplication_id and
are retried until acknowledged, one resending purchases until acknowledged, and a
consumer group reading all along. The replica of the busiest primary is paused for a
second, while the writers send larger events to that shard (on loopback the kernel's
socket buffers, which survive a killed process, would otherwise hold the whole lag: see
tests/harness/failover.py), so that it lags; that primary is SIGKILLed;
its replica takes over (automatically, or by CLUSTER FAILOVER TAKEOVER when that does not
come in time), a fresh replica replaces the dead primary, and writing goes on. Then every
acknowledged event and purchase is in the streams exactly once, and the consumers
handled each entry.

The same fault with EVENTS_CONFIRM_REPLICAS=0 must lose acknowledged events: without
that, the fault would prove nothing. This folder's conftest.py is not used here: each run
has a cluster of its own.
"""

from __future__ import annotations

import itertools
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis

from events_server.queue.keys import KeySpace
from events_server.server.auth import ApiKey
from events_server.server.script import ENQUEUE_SCRIPT
from events_server.server.settings import Settings
from tests.harness.cluster import ValkeyCluster, node_of, user_per_partition
from tests.harness.data import ev
from tests.harness.failover import (
    GroupReader,
    Writers,
    fail_over,
    is_primary,
    replicated_cluster,
)
from tests.harness.processes import ServerProcess, events_env
from tests.harness.rpc import ACCEPTED, DUPLICATE, SERVING, health_of, send, statuses
from tests.harness.servers import LoopThread, serving_stub
from tests.harness.streams import dump
from tests.harness.valkey import in_sync_replicas
from tests.harness.waiting import eventually

Figures = Callable[[str], None]

AUTOMATIC_FAILOVER_WAIT = 10.0
"""How long the replica may take to be elected before the test sends TAKEOVER."""


@dataclass
class Run:
    """What one run found."""

    acked: int
    missing: int
    twice: int
    refused_seconds: float
    silent_seconds: float
    failover: str
    failover_seconds: float
    unhandled: int
    handled_again: int
    codes: Counter[str]
    given_up: int
    purchases: int
    purchases_missing: int
    purchases_twice: int
    purchases_across: int
    """Purchases first sent before the kill and acknowledged after the takeover."""

    def line(self) -> str:
        """The run's figures, for the summary."""
        return (
            f"{self.acked:,} events acknowledged, {self.missing:,} of them missing after the"
            f" failover, {self.twice} queued twice; the dead primary's shard refused writes for"
            f" {self.refused_seconds:.1f}s and acknowledged none for {self.silent_seconds:.1f}s"
            f" ({self.failover} failover {self.failover_seconds:.1f}s after the kill);"
            f" consumers: {self.unhandled} entries never handled, {self.handled_again} handled"
            f" again; refusals {dict(self.codes)}; purchases to that shard: {self.purchases}"
            f" acknowledged ({self.purchases_across} resent across the failover),"
            f" {self.purchases_missing} missing, {self.purchases_twice} queued twice"
        )


def stage(workdir: Path, session_key: tuple[ApiKey, str], **env: str) -> Run:
    """One run of the fault, the server started with ``env`` on top of its defaults."""
    with replicated_cluster(workdir, session_key[0], "failover") as (cluster, settings):
        keys = KeySpace(settings.key_prefix, settings.partitions)
        server = ServerProcess(
            events_env(settings, EVENTS_REDIS_CLUSTER="true", EVENTS_METRICS_ADDR="", **env),
            workdir / "server.log",
        )
        try:
            return fault(cluster, server.start(), settings, keys, session_key[1])
        finally:
            server.stop()


def fault(
    cluster: ValkeyCluster, target: str, settings: Settings, keys: KeySpace, secret: str
) -> Run:
    """Write, read, kill the busiest primary, write on; then count."""
    shards = Counter(node_of(cluster, keys, p) for p in range(keys.partitions))
    busiest = shards.most_common(1)[0][0]
    theirs = {p for p in range(keys.partitions) if node_of(cluster, keys, p) == busiest}
    writers = Writers(target, secret, user_per_partition(keys), shard=theirs)
    reader = GroupReader(settings, keys, "failover")
    reader.start()
    writers.start()
    try:
        time.sleep(2.0)
        killed = time.monotonic() + 1.0
        how, promoted = fail_over(cluster, busiest, AUTOMATIC_FAILOVER_WAIT, writers.burst)
        # Not the dead primary restarted with its old data: a fresh replica in its place.
        cluster.add_replica_of(cluster.replicas[busiest].port)
        deadline = time.monotonic() + 30
        while min(writers.writes.last_ack.get(p, 0.0) for p in theirs) < promoted:
            assert time.monotonic() < deadline, "the shard never took writes again"
            time.sleep(0.1)
        time.sleep(2.0)  # writing on
    finally:
        writers.stop()
    writes = writers.writes
    client = redis.RedisCluster.from_url(cluster.url, socket_timeout=5)
    stored = dump(client, keys)
    copies = Counter(e.event.deduplication_id for _, _, e in stored if e.HasField("event"))
    orders = Counter(e.purchase.transaction_id for _, _, e in stored if e.HasField("purchase"))
    entries = {(partition, entry_id) for partition, entry_id, _ in stored}
    deadline = time.monotonic() + 60
    while not entries <= set(reader.handled) and time.monotonic() < deadline:
        time.sleep(0.2)
    reader.stop()
    client.close()
    refusals = [at for at, partition in writes.refused if partition in theirs]
    acks = sorted(at for at, partition in writes.acks if partition in theirs)
    return Run(
        acked=len(writes.acked),
        missing=len(writes.acked - set(copies)),
        twice=sum(1 for n in copies.values() if n > 1),
        refused_seconds=max(refusals) - min(refusals) if refusals else 0.0,
        silent_seconds=max(b - a for a, b in itertools.pairwise(acks)),
        failover=how,
        failover_seconds=promoted - killed,
        unhandled=len(entries - set(reader.handled)),
        handled_again=sum(1 for e in entries if reader.handled[e] > 1),
        codes=writes.codes,
        given_up=writes.given_up,
        purchases=len(writes.purchases),
        purchases_missing=len(set(writes.purchases) - set(orders)),
        purchases_twice=sum(1 for n in orders.values() if n > 1),
        purchases_across=sum(
            1 for sent, acked in writes.purchases.values() if sent < killed and acked > promoted
        ),
    )


@pytest.mark.slow
def test_no_acknowledged_event_is_lost_when_a_primary_dies(
    session_key: tuple[ApiKey, str], tmp_path: Path, figures: Figures
) -> None:
    run = stage(tmp_path, session_key)  # the production default: EVENTS_CONFIRM_REPLICAS=1
    figures(f"replica confirmation on: {run.line()}")
    assert run.given_up == 0
    assert set(run.codes) <= {"UNAVAILABLE", "RESOURCE_EXHAUSTED"}
    assert run.missing == 0
    assert run.twice == 0
    # The same for purchases, deduplicated on (tenant, transaction_id): the one in flight
    # at the kill was resent until acknowledged, and is queued once.
    assert run.purchases_across >= 1
    assert run.purchases_missing == 0
    assert run.purchases_twice == 0
    # At least once across the failover: a group's position may move back, never past an
    # entry it did not handle.
    assert run.unhandled == 0


@pytest.mark.slow
def test_without_replica_confirmation_the_same_fault_loses_acknowledged_events(
    session_key: tuple[ApiKey, str], tmp_path: Path, figures: Figures
) -> None:
    # Whether an unconfirmed write is lost depends on what the replica had read off its
    # socket when its primary died (loopback buffers hold megabytes): the fault is staged
    # up to three times, and must lose acknowledged events in one of them.
    for attempt in range(1, 4):
        workdir = tmp_path / str(attempt)
        workdir.mkdir()
        run = stage(workdir, session_key, EVENTS_CONFIRM_REPLICAS="0")
        figures(f"replica confirmation off (attempt {attempt}): {run.line()}")
        assert run.given_up == 0
        assert run.unhandled == 0
        if run.missing > 0:
            break
    # What the test above guards against: if this fault lost nothing, it proved nothing.
    assert run.missing > 0, "the fault lost no acknowledged event: it is too mild to prove a thing"


@pytest.mark.slow
def test_fsync_on_a_cluster_waits_for_each_primarys_disk_and_its_replicas(
    session_key: tuple[ApiKey, str], tmp_path: Path, loop: LoopThread
) -> None:
    with replicated_cluster(
        tmp_path,
        session_key[0],
        "fsync",
        durability="fsync",
        # appendfsync everysec: a disk may confirm a second later, so more than the
        # tests' usual 1 s (the production default is 2 s).
        redis_timeout_seconds=3.0,
    ) as (cluster, settings):
        keys = KeySpace(settings.key_prefix, settings.partitions)
        users = user_per_partition(keys)
        with serving_stub(loop, settings, session_key[1]) as (_, channel, stub):
            assert health_of(channel) == SERVING
            for index in range(len(cluster.nodes)):
                with cluster.client(index) as node:
                    node.script_load(ENQUEUE_SCRIPT)  # no NOSCRIPT round: exact counts
                    node.config_resetstat()
            everywhere = [ev(user_id=u, deduplication_id=f"f{p}") for p, u in users.items()]
            assert statuses(send(stub, *everywhere)) == [ACCEPTED] * len(everywhere)
            for index in range(len(cluster.nodes)):
                with cluster.client(index) as node:
                    stats: Any = node.info("commandstats")
                # One WAITAOF 1 1 per node the request touched, after its scripts there.
                assert stats["cmdstat_waitaof"]["calls"] == 1
            # WAITAOF counts only replicas that fsync: one without its AOF confirms nothing.
            with redis.Redis(port=cluster.replicas[0].port, socket_timeout=5) as replica:
                replica.config_set("appendonly", "no")
            mine = {p for p in users if node_of(cluster, keys, p) == 0}
            with pytest.raises(grpc.RpcError) as caught:
                send(stub, ev(user_id=users[min(mine)], deduplication_id="not-on-its-disk"))
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "disk of 0 of the 1 replicas" in (caught.value.details() or "")
            others = min(set(users) - mine)
            assert statuses(send(stub, ev(user_id=users[others]))) == [ACCEPTED]


@pytest.mark.slow
def test_a_graceful_failover_refuses_nothing_the_server_follows_moved(
    session_key: tuple[ApiKey, str], tmp_path: Path, loop: LoopThread
) -> None:
    with replicated_cluster(tmp_path, session_key[0], "moved") as (cluster, settings):
        keys = KeySpace(settings.key_prefix, settings.partitions)
        users = user_per_partition(keys)
        user = users[min(p for p in users if node_of(cluster, keys, p) == 1)]
        with serving_stub(loop, settings, session_key[1]) as (_, _, stub):
            assert statuses(send(stub, ev(user_id=user, deduplication_id="a"))) == [ACCEPTED]
            old, new = cluster.nodes[1], cluster.replicas[1]
            with redis.Redis(port=new.port, socket_timeout=5) as replica:
                replica.execute_command("CLUSTER", "FAILOVER")  # both up: a planned switch
            # Until the old primary is the new one's replica, in sync, writes are refused.
            eventually(lambda: is_primary(new) and in_sync_replicas(new.port) == 1, within=20)
            # The server's slot map still names the old primary, which answers MOVED: the
            # call follows it to the new one, and no request sees a 503.
            assert not is_primary(old)
            assert statuses(send(stub, ev(user_id=user, deduplication_id="b"))) == [ACCEPTED]
            assert statuses(send(stub, ev(user_id=user, deduplication_id="a"))) == [DUPLICATE]
