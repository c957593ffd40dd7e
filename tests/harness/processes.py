"""The gRPC server, the bridge and the commands as child processes: real signals, own memory."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import httpx

from events_server.server.settings import Settings
from tests.harness.valkey import free_port

LISTENING = re.compile(r"events-server listening on (\S+) \(pid (\d+)\)$")


def events_env(settings: Settings, **extra: str) -> dict[str, str]:
    """This environment, pointing an events-server process at the settings' Redis and keys."""
    return {
        **os.environ,
        "REDIS_URL": settings.redis_url,
        "EVENTS_KEY_PREFIX": settings.key_prefix,
        "EVENTS_PARTITIONS": str(settings.partitions),
        **extra,
    }


def run_events_server(
    settings: Settings, *args: str, check: bool = True, **env: str
) -> subprocess.CompletedProcess[str]:
    """Run an ``events-server`` command to completion against the settings' Redis and keys."""
    return subprocess.run(
        [sys.executable, "-m", "events_server", *args],
        env=events_env(settings, **env),
        capture_output=True,
        text=True,
        timeout=30,
        check=check,
    )


def tail(settings: Settings, *args: str) -> list[dict[str, Any]]:
    """Run `events-server tail` for real and parse its JSON lines."""
    out = run_events_server(settings, "tail", *args).stdout
    return [json.loads(line) for line in out.splitlines()]


class Child:
    """A child process of the test, its stderr (and what else it logs) in ``log_path``."""

    def __init__(self, log_path: Path | None) -> None:
        self.log_path = log_path
        self.proc: subprocess.Popen[str] | None = None

    def _spawn(self, argv: list[str], env: dict[str, str] | None, stdout: Any) -> None:
        log: IO[str] | int = subprocess.DEVNULL
        if self.log_path is not None:
            log = self.log_path.open("a")
        try:
            stdout = log if stdout is None else stdout
            self.proc = subprocess.Popen(argv, env=env, stdout=stdout, stderr=log, text=True)
        finally:
            if not isinstance(log, int):
                log.close()

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
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(15)
        self.kill()

    def kill(self) -> None:
        """SIGKILL it if it still runs (clean-up)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def log(self) -> str:
        """What it logged so far."""
        return self.log_path.read_text() if self.log_path and self.log_path.exists() else ""


class ServerProcess(Child):
    """``events-server serve`` as a child process; ``workers`` processes announce themselves."""

    def __init__(
        self,
        env: dict[str, str],
        log_path: Path | None = None,
        grpc_addr: str = "127.0.0.1:0",
        *args: str,
        workers: int = 1,
    ) -> None:
        super().__init__(log_path)
        self.env = {**os.environ, **env}
        self.argv = ["--grpc-addr", grpc_addr, *args]
        if workers > 1:
            self.argv += ["--workers", str(workers)]
        self.workers = workers
        self.target = ""
        self.pids: list[int] = []

    def start(self) -> str:
        """Start it; once every worker has said where it listens, that address."""
        self._spawn(
            [sys.executable, "-m", "events_server", "serve", *self.argv],
            self.env,
            subprocess.PIPE,
        )
        assert self.proc is not None
        assert self.proc.stdout is not None
        for _ in range(self.workers):
            line = self.proc.stdout.readline()
            listening = LISTENING.match(line)
            if listening is None:
                self.kill()
            assert listening, f"events-server did not start: {line!r}; see {self.log_path}"
            self.target = listening[1]
            self.pids.append(int(listening[2]))
        return self.target

    def printed(self) -> str:
        """The rest of what it printed on stdout (once it has exited)."""
        assert self.proc is not None
        assert self.proc.stdout is not None
        return self.proc.stdout.read()

    def kill(self) -> None:
        """SIGKILL it if it still runs, and close its stdout (clean-up)."""
        super().kill()
        if self.proc is not None and self.proc.stdout is not None and self.proc.poll() is not None:
            self.proc.stdout.close()


class BridgeProcess(Child):
    """``rest-bridge`` as a child process on a free loopback port."""

    def __init__(
        self,
        grpc_target: str,
        log_path: Path | None = None,
        *extra: str,
        env: dict[str, str] | None = None,
        verify: ssl.SSLContext | None = None,
    ) -> None:
        super().__init__(log_path)
        self.port = free_port()
        self.verify = verify
        """The client context that trusts its certificate, when it serves HTTPS."""
        self.url = f"{'https' if verify else 'http'}://127.0.0.1:{self.port}"
        self.argv = ["--port", str(self.port), "--grpc-target", grpc_target, *extra]
        self.env = env

    def spawn(self) -> None:
        """Start it, without waiting for it to answer."""
        self._spawn([sys.executable, "-m", "rest_bridge", *self.argv], self.env, None)

    def ready(self, path: str = "/healthz", within: float = 15.0) -> bool:
        """Whether ``path`` answers 200 within ``within`` seconds (False once it has exited)."""
        assert self.proc is not None
        deadline = time.monotonic() + within
        while not http_ok(f"{self.url}{path}", self.verify):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def start(self, path: str = "/healthz", within: float = 15.0) -> None:
        """Start it and wait until ``path`` answers 200."""
        self.spawn()
        ready = self.ready(path, within)
        if not ready:
            self.stop()
        assert ready, f"rest-bridge did not start; see {self.log_path}"


def http_ok(url: str, verify: ssl.SSLContext | None = None) -> bool:
    """Whether GET ``url`` answers 200 right now."""
    try:
        return httpx.get(url, timeout=1, verify=verify or True).status_code == 200
    except httpx.TransportError:
        return False


def rss_kib(pid: int) -> int:
    """Resident memory of a process, KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


@contextlib.contextmanager
def deployed(env: dict[str, str], logs: Path) -> Iterator[tuple[ServerProcess, BridgeProcess]]:
    """Server and bridge in processes of their own, as deployed, logging into ``logs``."""
    server = ServerProcess(env, logs / "server.log")
    bridge: BridgeProcess | None = None
    try:
        bridge = BridgeProcess(server.start(), logs / "bridge.log", "--log-level", "WARNING")
        bridge.start()
        yield server, bridge
    finally:
        if bridge is not None:
            bridge.stop()
        server.stop()
