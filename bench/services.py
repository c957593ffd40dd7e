"""The processes `make bench` measures: one fresh Valkey, the server, the bridge, the naive peer.

Also what is read from them around each phase: CPU seconds from /proc, and the bridge's
gathered calls from its /metrics.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import redis

from bench.workload import TENANTS
from events_server.server.auth import new_key
from tests.harness.keys import store_key
from tests.harness.valkey import ValkeyProcess, free_port

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """CPU (user+system) of one process so far, from /proc (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def tree_cpu_seconds(pid: int) -> float:
    """CPU (user+system) of a process and all its descendants so far."""
    total = 0.0
    stack = [pid]
    while stack:
        current = stack.pop()
        total += cpu_seconds(current)
        try:
            for task in Path(f"/proc/{current}/task").iterdir():
                stack.extend(int(c) for c in (task / "children").read_text().split())
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


def wait_http(url: str, seconds: float = 30) -> None:
    """Wait until url answers 200."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not become ready")
        time.sleep(0.1)


class Bench:
    """The processes under test, started once per run against one fresh Valkey."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.valkey = ValkeyProcess(workdir / "valkey")
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.grpc_port = free_port()
        self.grpc_target = (
            f"unix:{workdir / 'events.sock'}" if args.uds else f"127.0.0.1:{self.grpc_port}"
        )
        self.bridge_port = free_port()
        self.naive_port = free_port()
        self.key, self.secret = new_key(TENANTS, label="bench")

    @property
    def bridge_url(self) -> str:
        return f"http://127.0.0.1:{self.bridge_port}"

    @property
    def naive_url(self) -> str:
        return f"http://127.0.0.1:{self.naive_port}"

    def start(self) -> None:
        """Valkey, events-server, rest-bridge and the naive peer, each ready to serve."""
        self.valkey.start()
        env = {
            **os.environ,
            "REDIS_URL": self.valkey.url,
            "EVENTS_LOG_LEVEL": "WARNING",
            "EVENTS_METRICS_ADDR": "127.0.0.1:0",
        }
        py = sys.executable
        workers = (
            ["--workers", str(self.args.server_workers)] if self.args.server_workers > 1 else []
        )
        bridge_workers = (
            ["--workers", str(self.args.bridge_workers)] if self.args.bridge_workers > 1 else []
        )

        def spawn(*argv: str) -> subprocess.Popen[bytes]:
            return subprocess.Popen([py, "-m", *argv], stdout=subprocess.DEVNULL, env=env)

        self.procs["server"] = spawn(
            "events_server", "serve", "--grpc-addr", self.grpc_target, *workers
        )
        self.procs["bridge"] = spawn(
            "rest_bridge", "--grpc-target", self.grpc_target,
            "--port", str(self.bridge_port), "--log-level", "warning", *bridge_workers,
        )  # fmt: skip
        self.procs["naive"] = spawn(
            "uvicorn", "bench.naive_peer:app", "--port", str(self.naive_port),
            "--log-level", "warning", "--no-access-log", *bridge_workers,
        )  # fmt: skip
        wait_http(f"{self.bridge_url}/readyz")
        wait_http(f"{self.naive_url}/openapi.json")

    def stop(self) -> None:
        """Stop everything this run started."""
        for proc in self.procs.values():
            proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.valkey.stop()

    def fresh(self) -> None:
        """An empty Valkey holding only the benchmark's key: every phase starts the same."""
        client = redis.Redis.from_url(self.valkey.url)
        client.flushall()
        store_key(client, "ev", self.key)
        client.close()

    def cpu(self) -> dict[str, float]:
        """CPU seconds so far of each process under test (with its workers)."""
        assert self.valkey.proc is not None
        pids = {"valkey": self.valkey.proc.pid, **{n: p.pid for n, p in self.procs.items()}}
        return {name: tree_cpu_seconds(pid) for name, pid in pids.items()}

    def gathered(self) -> tuple[float, float]:
        """The bridge's gathered calls so far, and the requests they carried (its /metrics)."""
        found = {
            "events_gathered_call_requests_count": 0.0,
            "events_gathered_call_requests_sum": 0.0,
        }
        try:
            with urllib.request.urlopen(f"{self.bridge_url}/metrics", timeout=5) as answer:
                for line in answer.read().decode().splitlines():
                    name, _, figure = line.partition(" ")
                    if name in found:
                        found[name] += float(figure)
        except OSError:
            pass
        return found["events_gathered_call_requests_count"], found[
            "events_gathered_call_requests_sum"
        ]
