"""A real 3-node Valkey cluster on loopback (no valkey-cli), and the fixtures that use it.

A conftest.py that imports the fixtures below puts the cluster in place of the
session's single Valkey (settings, keys, grpc_server, channel, stub, rdb) for the
tests of its folder.
"""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import redis
from redis.cluster import RedisCluster
from redis.crc import key_slot

from events_server.pb import events_pb2_grpc
from events_server.queue.keys import KeySpace
from events_server.server.app import EventsServer
from events_server.server.auth import ApiKey
from events_server.server.routing import partition_for
from events_server.server.settings import Settings
from tests.harness.data import ev
from tests.harness.keys import store_key
from tests.harness.rpc import keyed_channel
from tests.harness.servers import LoopThread, own_settings, started_server, stop
from tests.harness.valkey import ValkeyProcess, free_port, wait_for_first_ack

SLOTS = 16384


def _fields(reply: bytes) -> dict[str, str]:
    """CLUSTER INFO's ``name:value`` lines as a dict."""
    pairs = (line.partition(":") for line in reply.decode().splitlines() if ":" in line)
    return {name: value.strip() for name, _, value in pairs}


def _options(bus_port: int) -> list[str]:
    """valkey-server flags of one cluster node."""
    options = {
        "cluster-enabled": "yes",
        "cluster-config-file": "nodes.conf",
        # The default bus port (port + 10000) may be taken, or past 65535.
        "cluster-port": str(bus_port),
        # Short, so the survivors mark a killed node as failed within the test.
        "cluster-node-timeout": "1000",
        # Without this, one node down makes every node refuse every key (CLUSTERDOWN),
        # not only the keys of the slots that node served.
        "cluster-require-full-coverage": "no",
    }
    return [arg for name, value in options.items() for arg in (f"--{name}", value)]


class ValkeyCluster:
    """``size`` cluster-enabled Valkey primaries, each owning an equal range of the slots.

    ``extra`` valkey-server flags go to every node, replicas included.
    """

    def __init__(self, workdir: Path, size: int = 3, *extra: str) -> None:
        self.bus_ports = [free_port() for _ in range(size)]
        self.extra = extra
        self.nodes = [
            ValkeyProcess(workdir / f"node{i}", *_options(bus), *extra)
            for i, bus in enumerate(self.bus_ports)
        ]
        self.replicas: list[ValkeyProcess] = []
        self.workdir = workdir
        bounds = [SLOTS * i // size for i in range(size + 1)]
        self.ranges = [(bounds[i], bounds[i + 1] - 1) for i in range(size)]

    @property
    def url(self) -> str:
        """A URL naming one node; the cluster client discovers the others."""
        return f"redis://127.0.0.1:{self.nodes[0].port}/0"

    def client(self, index: int) -> redis.Redis:
        """A plain (non-cluster) client of one node."""
        return redis.Redis(port=self.nodes[index].port, socket_timeout=5)

    def start(self) -> None:
        """Start the nodes, assign the slots, join them, and wait until all agree."""
        try:
            for node in self.nodes:
                node.start()
            for index, (first, last) in enumerate(self.ranges):
                with self.client(index) as client:
                    client.execute_command("CLUSTER", "ADDSLOTSRANGE", first, last)
            with self.client(0) as first_node:
                for node, bus_port in zip(self.nodes[1:], self.bus_ports[1:], strict=True):
                    first_node.execute_command("CLUSTER", "MEET", "127.0.0.1", node.port, bus_port)
            self.wait_until_healthy()
        except BaseException:
            self.stop()
            raise

    def wait_until_healthy(self, timeout: float = 20.0) -> None:
        """Until every node is up, knows every other and reports cluster_state:ok."""
        deadline = time.monotonic() + timeout
        while not self._healthy():
            if time.monotonic() > deadline:
                raise RuntimeError("the cluster did not converge")
            time.sleep(0.05)

    def _healthy(self) -> bool:
        for index in range(len(self.nodes)):
            try:
                with self.client(index) as client:
                    info = _fields(client.execute_command("CLUSTER", "INFO"))
                    nodes = client.execute_command("CLUSTER", "NODES").decode().splitlines()
            except redis.ConnectionError:
                return False
            if info.get("cluster_state") != "ok" or info.get("cluster_slots_ok") != str(SLOTS):
                return False
            # <id> <addr> <flags> <primary> <ping> <pong> <epoch> <link-state> <slots>...
            states = [line.split() for line in nodes]
            if len(states) != len(self.nodes) + len(self.replicas):
                return False
            if any("fail" in s[2] or s[7] != "connected" for s in states):
                return False
        return True

    def node_of_slot(self, slot: int) -> int:
        """Index of the node that serves ``slot``."""
        for index, (first, last) in enumerate(self.ranges):
            if first <= slot <= last:
                return index
        raise ValueError(slot)

    def add_replica(self, index: int) -> ValkeyProcess:
        """Start a replica of node ``index``, join it, and wait until it is in sync."""
        return self.add_replica_of(self.nodes[index].port)

    def add_replica_of(self, port: int) -> ValkeyProcess:
        """Start a fresh replica of the primary on ``port``, join it, wait until it is in sync."""
        bus_port = free_port()
        replica = ValkeyProcess(
            self.workdir / f"replica{len(self.replicas)}", *_options(bus_port), *self.extra
        )
        self.replicas.append(replica)
        replica.start()
        with redis.Redis(port=port, socket_timeout=5) as primary:
            primary_id = primary.execute_command("CLUSTER", "MYID").decode()
            primary.config_set("repl-diskless-sync-delay", 0)  # sync at once, not after 5 s
        with redis.Redis(port=replica.port, socket_timeout=5) as client:
            # Any node up will do: the others learn of the newcomer through the bus.
            live = next(i for i, node in enumerate(self.nodes) if node.running())
            client.execute_command(
                "CLUSTER", "MEET", "127.0.0.1", self.nodes[live].port, self.bus_ports[live]
            )
            deadline = time.monotonic() + 20
            while True:
                try:
                    # Refused until the replica has learnt of the primary through the bus.
                    client.execute_command("CLUSTER", "REPLICATE", primary_id)
                    break
                except redis.ResponseError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            while client.info("replication").get("master_link_status") != "up":
                if time.monotonic() > deadline:
                    raise RuntimeError("the replica did not sync")
                time.sleep(0.05)
        wait_for_first_ack(port, self.key_of(port))
        return replica

    def key_of(self, port: int) -> str:
        """A key of a slot the primary on ``port`` serves."""
        with redis.Redis(port=port, socket_timeout=5) as primary:
            myself = next(
                line.split()
                for line in primary.execute_command("CLUSTER", "NODES").decode().splitlines()
                if "myself" in line.split()[2]
            )
        # <id> <addr> <flags> <primary> <ping> <pong> <epoch> <link-state> <slot ranges>...
        ranges = [
            (int(first), int(last or first))
            for first, _, last in (r.partition("-") for r in myself[8:] if r[0].isdigit())
        ]
        for n in itertools.count():
            slot = key_slot((key := f"{{h{n}}}").encode())
            if any(first <= slot <= last for first, last in ranges):
                return key
        raise AssertionError("unreachable")

    def restart(self, index: int) -> None:
        """Start a killed node again; it rejoins from its nodes.conf (same id, same slots)."""
        self.nodes[index].start()
        self.wait_until_healthy()

    def stop(self) -> None:
        """Stop every node."""
        for node in [*self.nodes, *self.replicas]:
            node.stop()


def node_of(cluster: ValkeyCluster, keys: KeySpace, partition: int) -> int:
    """Index of the node serving the partition."""
    return cluster.node_of_slot(key_slot(keys.stream(partition).encode()))


def user_per_partition(keys: KeySpace) -> dict[int, str]:
    """A user id (of tenant shop-a) routed to each partition."""
    users: dict[int, str] = {}
    n = 0
    while len(users) < keys.partitions:
        user = f"user-{n}"
        users.setdefault(partition_for(ev(user_id=user), keys.partitions), user)
        n += 1
    return users


def crossslot_errors(cluster: ValkeyCluster) -> list[int]:
    """CROSSSLOT replies each node sent since its stats were last reset."""
    counts = []
    for index in range(len(cluster.nodes)):
        with cluster.client(index) as node:
            stats = node.info("errorstats").get("errorstat_CROSSSLOT", {"count": 0})
            counts.append(int(stats["count"]))
    return counts


# --- fixtures: the cluster in place of the single Valkey ------------------------------


@pytest.fixture(scope="module")
def settings(valkey_cluster: ValkeyCluster) -> Settings:
    """Server settings for the cluster: 16 partitions over 3 nodes."""
    return own_settings(
        valkey_cluster.url,
        f"test-{uuid.uuid4().hex[:8]}",
        redis_cluster=True,
        # These clusters have no replicas (tests/reliability/cluster/test_failover.py starts
        # its own with them): writes must not wait for replicas here.
        confirm_replicas=0,
        partitions=16,
        shutdown_grace_seconds=1.0,
        metrics_addr="",  # no fixed port: the session server may hold the default one
    )


@pytest.fixture(scope="module")
def keys(settings: Settings) -> KeySpace:
    """The module's Redis key names."""
    return KeySpace(settings.key_prefix, settings.partitions)


@pytest.fixture(scope="module")
def grpc_server(
    loop: LoopThread, settings: Settings, session_key: tuple[ApiKey, str]
) -> Iterator[tuple[EventsServer, int]]:
    """A real gRPC server queuing on the cluster, which holds the session's API key."""
    store_key(redis.RedisCluster.from_url(settings.redis_url), settings.key_prefix, session_key[0])
    server, port = loop.run(started_server(settings))
    yield server, port
    stop(loop, server)


@pytest.fixture(scope="module")
def channel(
    session_key: tuple[ApiKey, str], grpc_server: tuple[EventsServer, int]
) -> Iterator[grpc.Channel]:
    """A gRPC channel to the cluster-backed server, sending the session's key."""
    with keyed_channel(f"127.0.0.1:{grpc_server[1]}", session_key[1]) as chan:
        yield chan


@pytest.fixture(scope="module")
def stub(channel: grpc.Channel) -> events_pb2_grpc.EventsServiceStub:
    """EventsService client of the cluster-backed server."""
    return events_pb2_grpc.EventsServiceStub(channel)


@pytest.fixture
def rdb(
    valkey_cluster: ValkeyCluster, settings: Settings, session_key: tuple[ApiKey, str]
) -> Iterator[RedisCluster]:
    """A cluster client; every key of the module's prefix is gone before each test, but for
    the session's API key, which is in force."""
    client = RedisCluster.from_url(valkey_cluster.url, socket_timeout=5)
    for key in client.scan_iter(match=f"{settings.key_prefix}:*", count=1000):
        client.unlink(key)
    store_key(RedisCluster.from_url(valkey_cluster.url), settings.key_prefix, session_key[0])
    yield client
    client.close()
