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
from rest_bridge.config import BridgeSettings
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


SERVER_LOG = "server.log"
BRIDGE_LOG = "bridge.log"
"""Where the services' log lines go (in the run's working directory)."""


def log_environment(args: argparse.Namespace) -> dict[str, str]:
    """The services' log settings the options change (none: their defaults)."""
    env = {}
    if args.log_level:
        env["EVENTS_LOG_LEVEL"] = args.log_level
    if args.access_log_sample is not None:
        env["EVENTS_ACCESS_LOG_SAMPLE"] = f"{args.access_log_sample:g}"
    return env


def log_settings(args: argparse.Namespace) -> str:
    """The services' log level and access-line sample, as the run sets them."""
    env = {**os.environ, **log_environment(args)}
    fields = BridgeSettings.model_fields
    level = env.get("EVENTS_LOG_LEVEL", str(fields["log_level"].default)).upper()
    sample = fields.get("access_log_sample")  # absent from code older than the setting
    default = "all" if sample is None else f"{sample.default:g}"
    return f"log level {level}, access-line sample {env.get('EVENTS_ACCESS_LOG_SAMPLE', default)}"


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
        self.workdir = workdir
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
        # Logging as an operator gets it (the defaults, unless --log-level or
        # --access-log-sample say otherwise), each service's to a file, as to a collector.
        env = {
            **os.environ,
            "REDIS_URL": self.valkey.url,
            "EVENTS_METRICS_ADDR": "127.0.0.1:0",
            **log_environment(self.args),
        }
        py = sys.executable
        workers = (
            ["--workers", str(self.args.server_workers)] if self.args.server_workers > 1 else []
        )
        bridge_workers = (
            ["--workers", str(self.args.bridge_workers)] if self.args.bridge_workers > 1 else []
        )

        def spawn(*argv: str, log: str | None = None) -> subprocess.Popen[bytes]:
            stderr = (self.workdir / log).open("ab") if log else None
            try:
                return subprocess.Popen(
                    [py, "-m", *argv], stdout=subprocess.DEVNULL, stderr=stderr, env=env
                )
            finally:
                if stderr is not None:
                    stderr.close()  # the child has its own copy

        self.procs["server"] = spawn(
            "events_server", "serve", "--grpc-addr", self.grpc_target, *workers, log=SERVER_LOG
        )
        self.procs["bridge"] = spawn(
            "rest_bridge", "--grpc-target", self.grpc_target,
            "--port", str(self.bridge_port), *bridge_workers, log=BRIDGE_LOG,
        )  # fmt: skip
        self.procs["naive"] = spawn(
            "uvicorn", "bench.naive_peer:app", "--port", str(self.naive_port),
            "--log-level", "warning", "--no-access-log", *bridge_workers,
        )  # fmt: skip
        try:
            wait_http(f"{self.bridge_url}/readyz")
        except RuntimeError:
            for log in (SERVER_LOG, BRIDGE_LOG):
                tail = (self.workdir / log).read_text(errors="replace")[-2000:]
                print(f"--- the end of {log}:\n{tail}", file=sys.stderr)
            raise
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
