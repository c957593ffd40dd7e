"""Pieces of the fault and load tests: servers as child processes, a retrying client, figures."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
import redis

from events_server.pb import events_pb2 as pb
from events_server.queue.keys import ENVELOPE_FIELD, KeySpace
from events_server.server.app import EventsServer
from events_server.server.settings import Settings
from rest_bridge.config import BridgeSettings
from tests.proxy import FaultProxy
from tests.support import LoopThread, UvicornThread, ValkeyProcess, free_port, started_server

RETRYABLE_HTTP = frozenset({503, 429})


class ServerProcess:
    """``events-server serve`` as a child process: real signals, its own memory."""

    def __init__(self, env: dict[str, str], log_path: Path, grpc_addr: str = "127.0.0.1:0") -> None:
        self.env = {**os.environ, **env}
        self.log_path = log_path
        self.grpc_addr = grpc_addr
        self.proc: subprocess.Popen[str] | None = None
        self.target = ""

    def start(self) -> str:
        """Start it and return the address it listens on."""
        with self.log_path.open("a") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "events_server", "serve", "--grpc-addr", self.grpc_addr],
                env=self.env,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
            )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        listening = re.match(r"events-server listening on (\S+) \(pid \d+\)$", line)
        if listening is None:
            self.kill()
            raise RuntimeError(f"events-server did not start: {line!r}; see {self.log_path}")
        self.target = listening[1]
        return self.target

    @property
    def pid(self) -> int:
        """Its process id."""
        assert self.proc is not None
        return self.proc.pid

    def signal(self, signum: int) -> None:
        """Send it a signal."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signum)

    def wait(self, timeout: float) -> int:
        """Wait for it to exit; its exit code."""
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self) -> None:
        """SIGTERM it and wait for it to drain; SIGKILL it if it lingers."""
        self.signal(signal.SIGTERM)
        try:
            if self.proc is not None:
                self.proc.wait(15)
        finally:
            self.kill()

    def kill(self) -> None:
        """SIGKILL it if it still runs (clean-up)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()

    def log(self) -> str:
        """What it logged so far."""
        return self.log_path.read_text() if self.log_path.exists() else ""


class BridgeProcess:
    """``rest-bridge`` as a child process on a free loopback port."""

    def __init__(self, grpc_target: str, log_path: Path, *extra: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.grpc_target = grpc_target
        self.log_path = log_path
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start it and wait until /healthz answers."""
        with self.log_path.open("a") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "rest_bridge", "--port", str(self.port),
                 "--grpc-target", self.grpc_target, "--log-level", "WARNING", *self.extra],
                stdout=log, stderr=log,
            )  # fmt: skip
        deadline = time.monotonic() + 15
        while True:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"rest-bridge did not start; see {self.log_path}")
            time.sleep(0.05)

    @property
    def pid(self) -> int:
        """Its process id."""
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        """Terminate it (kill it if it lingers)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def rss_kib(pid: int) -> int:
    """Resident memory of a process, KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) by nearest rank."""
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def event(run: str, n: int) -> dict[str, Any]:
    """Event ``n`` of a run: a unique deduplication_id, users spread over partitions."""
    return {
        "tenant": "shop-r",
        "market": "us",
        "type": "add_to_cart",
        "deduplication_id": f"{run}-{n}",
        "user_id": f"user-{n % 97}",
        "product_id": f"p-{n}",
    }


def batches(run: str, total: int, size: int) -> Iterator[list[dict[str, Any]]]:
    """``total`` events of a run in requests of ``size``."""
    for start in range(0, total, size):
        yield [event(run, n) for n in range(start, min(start + size, total))]


@dataclass
class Tally:
    """What a retrying client saw."""

    acked: dict[str, dict[str, Any]] = field(default_factory=dict)
    """deduplication_id -> its result in the 200 that acknowledged it."""
    statuses: Counter[int] = field(default_factory=Counter)
    """Every HTTP status answered, retries included."""
    failures: list[str] = field(default_factory=list)
    """Answers that are neither a 200 nor a retryable refusal."""
    attempts: list[tuple[float, float, int]] = field(default_factory=list)
    """(started, ended, HTTP status) of every request sent, monotonic seconds."""

    @property
    def refusals(self) -> int:
        """Retryable refusals seen (each one retried)."""
        return sum(n for status, n in self.statuses.items() if status in RETRYABLE_HTTP)


async def post_until_acked(
    client: httpx.AsyncClient,
    body: list[dict[str, Any]],
    tally: Tally,
    *,
    give_up_after: float = 60.0,
) -> bool:
    """POST until a 200, retrying refusals (503, 429) with backoff; False on anything else."""
    backoff = 0.01
    deadline = time.monotonic() + give_up_after
    while time.monotonic() < deadline:
        started = time.monotonic()
        try:
            answer = await client.post("/create-events", json=body)
        except httpx.TransportError as error:
            tally.failures.append(f"transport: {error!r}")
            return False
        tally.attempts.append((started, time.monotonic(), answer.status_code))
        tally.statuses[answer.status_code] += 1
        if answer.status_code == 200:
            for sent, result in zip(body, answer.json()["results"], strict=True):
                tally.acked[sent["deduplication_id"]] = result
            return True
        if answer.status_code not in RETRYABLE_HTTP or "retry-after" not in answer.headers:
            tally.failures.append(f"{answer.status_code}: {answer.text[:200]}")
            return False
        await asyncio.sleep(backoff)
        backoff = min(backoff * 2, 0.2)
    tally.failures.append(f"still refused after {give_up_after}s")
    return False


def stream_contents(client: redis.Redis, keys: KeySpace) -> dict[str, list[str]]:
    """deduplication_id -> entry ids holding it, over every partition stream."""
    found: dict[str, list[str]] = {}
    for partition in range(keys.partitions):
        if client.type(keys.stream(partition)) != b"stream":
            continue  # absent, or made a string by a fault test
        entries: Any = client.xrange(keys.stream(partition))
        for entry_id, fields in entries:
            envelope = pb.Envelope.FromString(fields[ENVELOPE_FIELD])
            found.setdefault(envelope.event.deduplication_id, []).append(entry_id.decode())
    return found


def orphan_dedup_keys(client: redis.Redis, keys: KeySpace) -> list[str]:
    """Dedup keys whose entry id is on no stream: they would swallow a retry."""
    on_streams = {entry_id for ids in stream_contents(client, keys).values() for entry_id in ids}
    orphans = []
    for key in client.scan_iter(match=keys.dedup_pattern(), count=1000):
        value: Any = client.get(key)
        if value is None or value.decode() not in on_streams:
            orphans.append(key.decode())
    return orphans


async def acked_at_least(tally: Tally, count: int, give_up: asyncio.Event | None = None) -> bool:
    """Wait until ``count`` events are acknowledged; False if ``give_up`` is set first."""
    while len(tally.acked) < count:
        if give_up is not None and give_up.is_set():
            return False
        await asyncio.sleep(0.005)
    return True


async def retrying_clients(
    url: str, pending: list[list[dict[str, Any]]], tally: Tally, workers: int, api_key: str
) -> None:
    """``workers`` clients posting the pending requests until each is acknowledged."""
    async with httpx.AsyncClient(
        base_url=url, timeout=10, headers={"x-api-key": api_key}
    ) as client:

        async def worker() -> None:
            while pending:
                await post_until_acked(client, pending.pop(), tally)

        await asyncio.gather(*(worker() for _ in range(workers)))


@dataclass
class SoakResult:
    """What a fixed-rate run saw."""

    sent: int = 0
    accepted: int = 0
    errors: list[str] = field(default_factory=list)
    samples: list[tuple[float, int, int]] = field(default_factory=list)
    """(seconds since start, server RSS KiB, bridge RSS KiB)."""


async def fixed_rate(  # noqa: PLR0917
    url: str,
    seconds: float,
    rate: float,
    size: int,
    pids: tuple[int, int],
    api_key: str,
    sample_every: float = 5.0,
) -> SoakResult:
    """POST ``rate`` requests of ``size`` new events a second for ``seconds``; sample RSS."""
    result = SoakResult()
    limit = asyncio.Semaphore(32)

    def sample(at: float) -> None:
        result.samples.append((at, rss_kib(pids[0]), rss_kib(pids[1])))

    headers = {"x-api-key": api_key}
    async with httpx.AsyncClient(base_url=url, timeout=10, headers=headers) as client:

        async def one(n: int) -> None:
            body = [event("soak", n * size + i) for i in range(size)]
            try:
                answer = await client.post("/create-events", json=body)
            except httpx.TransportError as error:
                result.errors.append(repr(error))
                return
            finally:
                limit.release()
            if answer.status_code != 200:
                result.errors.append(f"{answer.status_code}: {answer.text[:200]}")
                return
            result.accepted += answer.json()["accepted"]

        start = time.monotonic()
        next_sample = start
        tasks = []
        while (now := time.monotonic()) - start < seconds:
            if now >= next_sample:
                sample(now - start)
                next_sample += sample_every
            await limit.acquire()
            tasks.append(asyncio.create_task(one(result.sent)))
            result.sent += 1
            # Fixed rate: request n leaves at start + n / rate, whatever the others do.
            await asyncio.sleep(max(0.0, start + result.sent / rate - time.monotonic()))
        await asyncio.gather(*tasks)
        sample(time.monotonic() - start)
    return result


# --- servers for one test ---------------------------------------------------------


@contextmanager
def serving(loop: LoopThread, settings: Settings) -> Iterator[tuple[EventsServer, str]]:
    """An in-process events-server on a free port; stopped on the way out."""

    server, port = loop.run(started_server(settings))
    try:
        yield server, f"127.0.0.1:{port}"
    finally:
        loop.run(server.stop(0))


@contextmanager
def bridged(target: str, grpc_timeout_seconds: float = 3.0) -> Iterator[str]:
    """The real bridge over HTTP in front of ``target``; its base URL."""
    bridge = UvicornThread(
        BridgeSettings(
            grpc_target=target, grpc_timeout_seconds=grpc_timeout_seconds, log_level="WARNING"
        )
    )
    bridge.start()
    try:
        yield bridge.url
    finally:
        bridge.stop()


@contextmanager
def valkey_process(workdir: Path, *extra: str) -> Iterator[ValkeyProcess]:
    """A Valkey of the test's own, stopped however the test ends."""
    process = ValkeyProcess(workdir, *extra)
    process.start()
    try:
        yield process
    finally:
        process.kill()


@contextmanager
def proxy_to(url: str) -> Iterator[FaultProxy]:
    """A FaultProxy in front of the Redis at ``url``."""
    parsed = urlparse(url)
    proxy = FaultProxy(parsed.hostname or "127.0.0.1", parsed.port or 6379)
    try:
        yield proxy
    finally:
        proxy.close()
