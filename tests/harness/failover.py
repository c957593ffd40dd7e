"""A Valkey primary's death under load: the writers, the reader and the fault of
tests/reliability/cluster/test_failover.py.

Writers send batches of one partition each, every event with a deduplication_id, and
retry a batch until it is acknowledged; a consumer group reads all along; the replica of
the busiest primary is paused so that it lags, that primary is SIGKILLed, its replica
promoted, and a fresh replica takes the dead primary's place.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import redis

from events_server.consumer import Consumer, Message
from events_server.pb import events_pb2 as pb
from events_server.pb import events_pb2_grpc
from events_server.queue.connection import connect
from events_server.queue.keys import KeySpace
from events_server.server.auth import ApiKey
from events_server.server.routing import partition_for_tracked
from events_server.server.settings import Settings
from tests.harness.cluster import ValkeyCluster
from tests.harness.consumers import FAST, Entry
from tests.harness.data import ev, purchase
from tests.harness.keys import store_key
from tests.harness.rpc import keyed_channel
from tests.harness.servers import own_settings
from tests.harness.valkey import ValkeyProcess

PRODUCTION_VALKEY = (
    "--appendonly", "yes",
    # A primary without a replica in sync refuses writes at once (NOREPLICAS), rather than
    # after a WAIT that cannot succeed.
    "--min-replicas-to-write", "1",
    # Every acknowledged write is on the replica: it may always take over, however stale.
    "--cluster-replica-validity-factor", "0",
)  # fmt: skip
"""The Valkey settings of docs/scaling.md (cluster-node-timeout is the harness's 1 s)."""

RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED}
"""What a client retries (the bridge's 503 and 429); anything else is a failure."""

BURST_VARIANTS = [f"variant-{n:03d}-{'x' * 52}" for n in range(400)]
"""A long listing's worth of variant ids: about 24 KB of an event."""

READER = FAST.model_copy(update={"batch_size": 200, "max_deliveries": 100})
"""Quick reclaims; big batches to keep up with the writers; no dead letters (never fails)."""


@dataclass
class Writes:
    """What the writers saw, shared by their threads (under ``lock``)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    acked: set[str] = field(default_factory=set)
    last_ack: dict[int, float] = field(default_factory=dict)
    """Partition -> when a batch of it was last acknowledged (monotonic)."""
    acks: list[tuple[float, int]] = field(default_factory=list)
    """(monotonic, partition) of every acknowledged batch."""
    refused: list[tuple[float, int]] = field(default_factory=list)
    """(monotonic, partition) of every refused attempt."""
    codes: Counter[str] = field(default_factory=Counter)
    """Status codes of the refusals."""
    given_up: int = 0
    """Batches never acknowledged within the writers' bound (a failure)."""
    purchases: dict[str, tuple[float, float]] = field(default_factory=dict)
    """Transaction id -> when its purchase was first sent and when acknowledged."""


class Writers:
    """``count`` threads writing batches of ``batch`` events until stopped, each batch retried
    until acknowledged (or until ``bound`` seconds after the stop: then counted as given up);
    and one buying, each order to a partition of ``shard``, when it names some. During a
    ``burst`` the batches go to ``shard`` too, with larger events."""

    def __init__(
        self,
        target: str,
        secret: str,
        users: dict[int, str],
        *,
        count: int = 6,
        batch: int = 50,
        bound: float = 60.0,
        shard: Collection[int] = (),
    ) -> None:
        self.writes = Writes()
        self.burst = threading.Event()
        """Set: batches go to ``shard`` (when given) and carry BURST_VARIANTS (~24 KB an event)."""
        self._shard = sorted(shard)
        self._target, self._secret, self._users = target, secret, users
        self._batch, self._bound = batch, bound
        self._stop = threading.Event()
        self._give_up_at = float("inf")
        self._threads = [
            threading.Thread(target=self._write, args=(w,), daemon=True) for w in range(count)
        ]
        if shard:
            self._threads.append(threading.Thread(target=self._buy, args=(shard,), daemon=True))

    def start(self) -> None:
        """Start writing."""
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        """Finish the batches under way (within the bound) and stop."""
        self._give_up_at = time.monotonic() + self._bound
        self._stop.set()
        for thread in self._threads:
            thread.join(self._bound + 10)

    def _write(self, writer: int) -> None:
        partitions = sorted(self._users)
        with keyed_channel(self._target, self._secret) as channel:
            stub = events_pb2_grpc.EventsServiceStub(channel)
            n = 0
            while not self._stop.is_set():
                burst = self.burst.is_set()
                among = self._shard if burst and self._shard else partitions
                partition = among[(writer + n) % len(among)]
                ids = [f"w{writer}-{n}-{i}" for i in range(self._batch)]
                extra = {"variant_ids": BURST_VARIANTS} if burst else {}
                user = self._users[partition]
                events = [ev(user_id=user, deduplication_id=d, **extra) for d in ids]
                request = pb.CreateEventsRequest(events=events)
                if not self.send(stub.CreateEvents, request, partition):
                    return
                with self.writes.lock:
                    self.writes.acked.update(ids)
                    self.writes.last_ack[partition] = now = time.monotonic()
                    self.writes.acks.append((now, partition))
                n += 1

    def _buy(self, partitions: Collection[int]) -> None:
        """One purchase after another, each of a new transaction routed to ``partitions``,
        each resent until acknowledged (a shopper's thank-you page reloaded, or the shop's
        backend retrying)."""
        with keyed_channel(self._target, self._secret) as channel:
            stub = events_pb2_grpc.EventsServiceStub(channel)
            for n in itertools.count():
                if self._stop.is_set():
                    return
                order = purchase(transaction_id=f"T-{n}")
                partition = partition_for_tracked(order.purchase, len(self._users))
                if partition not in partitions:
                    continue
                sent = time.monotonic()
                if not self.send(stub.Track, pb.TrackRequest(events=[order]), partition):
                    return
                with self.writes.lock:
                    self.writes.purchases[order.purchase.transaction_id] = (sent, time.monotonic())
                time.sleep(0.01)

    def send(self, call: Any, request: Any, partition: int) -> bool:
        """Send until acknowledged: True; False when refused for good or past the bound."""
        while True:
            try:
                call(request, timeout=5)
                return True
            except grpc.RpcError as error:
                with self.writes.lock:
                    self.writes.refused.append((time.monotonic(), partition))
                    self.writes.codes[error.code().name] += 1
                    if error.code() not in RETRYABLE or time.monotonic() > self._give_up_at:
                        self.writes.given_up += 1
                        return False
                time.sleep(0.05)


class GroupReader:
    """One consumer of a group, in a thread with a loop of its own, counting what it handles."""

    def __init__(self, settings: Settings, keys: KeySpace, group: str) -> None:
        self.handled: Counter[Entry] = Counter()
        self._settings, self._keys, self._group = settings, keys, group
        self._consumer: Consumer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    def start(self) -> None:
        """Start consuming."""
        self._thread.start()
        assert self._ready.wait(10), "the consumer did not start"

    def stop(self) -> None:
        """Stop consuming (handled messages are acknowledged first)."""
        if self._loop is not None and self._consumer is not None:
            self._loop.call_soon_threadsafe(self._consumer.stop)
        self._thread.join(30)

    async def _main(self) -> None:
        client = connect(self._settings.redis)
        self._consumer = Consumer(client, self._keys, self._group, name="reader", settings=READER)
        self._loop = asyncio.get_running_loop()

        async def handle(message: Message) -> None:
            self.handled[(message.partition, message.entry_id)] += 1

        self._ready.set()
        try:
            await self._consumer.run(handle)
        finally:
            await client.aclose()


def pause(process: ValkeyProcess, paused: bool) -> None:
    """SIGSTOP (paused) or SIGCONT a Valkey process that runs."""
    if process.running():
        assert process.proc is not None
        os.kill(process.proc.pid, signal.SIGSTOP if paused else signal.SIGCONT)


@contextlib.contextmanager
def replicated_cluster(
    workdir: Path, key: ApiKey, prefix: str, **overrides: Any
) -> Iterator[tuple[ValkeyCluster, Settings]]:
    """3 primaries with a replica each at the Valkey settings of docs/scaling.md, holding
    ``key``; and server settings for it (16 partitions, ``overrides``)."""
    cluster = ValkeyCluster(workdir / "cluster", 3, *PRODUCTION_VALKEY)
    cluster.start()
    try:
        for index in range(len(cluster.nodes)):
            cluster.add_replica(index)
        settings = own_settings(cluster.url, prefix, redis_cluster=True, partitions=16, **overrides)
        store_key(redis.RedisCluster.from_url(cluster.url), prefix, key)
        yield cluster, settings
    finally:
        for replica in cluster.replicas:
            pause(replica, False)  # a stopped process would not stop
        cluster.stop()


def is_primary(process: ValkeyProcess) -> bool:
    """Whether the node calls itself a primary now."""
    try:
        with redis.Redis(port=process.port, socket_timeout=1) as client:
            role: str = client.info("replication")["role"]
            return role == "master"
    except redis.RedisError:
        return False


def fail_over(
    cluster: ValkeyCluster, index: int, wait: float, burst: threading.Event
) -> tuple[str, float]:
    """Pause node ``index``'s replica for a second (``burst`` set meanwhile), SIGKILL the node,
    and wait for the replica to take over: automatically within ``wait`` seconds, else by
    CLUSTER FAILOVER TAKEOVER. How it came, and when (monotonic).

    A SIGKILLed process's socket still delivers what the kernel holds of its replication
    stream, several MB on loopback (a dead host's would not): only what the primary's own
    buffer holds is lost. The writers' burst of larger events to that shard during the
    pause is what fills the kernel's buffers, so that the replica really lags.
    """
    replica = cluster.replicas[index]
    pause(replica, True)
    try:
        burst.set()
        time.sleep(1.0)  # writes go on to the primary alone: the replica lags
        cluster.nodes[index].kill()
    finally:
        pause(replica, False)
        burst.clear()
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if is_primary(replica):
            return "automatic", time.monotonic()
        time.sleep(0.05)
    with redis.Redis(port=replica.port, socket_timeout=5) as client:
        client.execute_command("CLUSTER", "FAILOVER", "TAKEOVER")
    while not is_primary(replica):
        assert time.monotonic() < deadline + 10, "the replica did not take over"
        time.sleep(0.05)
    return "takeover", time.monotonic()
