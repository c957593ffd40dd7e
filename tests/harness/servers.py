"""The gRPC server and the bridge in the test's own process, on free loopback ports."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import uvicorn

from events_server.server.app import EventsServer, create_server
from events_server.server.settings import Settings
from rest_bridge.cli import server_config
from rest_bridge.config import BridgeSettings

T = TypeVar("T")


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


async def started_server(settings: Settings) -> tuple[EventsServer, int]:
    """An in-process events-server, started, and its port (run it on a LoopThread)."""
    server, port = await create_server(settings)
    await server.start()
    return server, port


@contextmanager
def serving(
    loop: LoopThread, settings: Settings, **limits: int
) -> Iterator[tuple[EventsServer, str]]:
    """An in-process events-server and its address; stopped on the way out.

    ``limits`` replace settings; the settings are then built anew, not model_copy()'d,
    so that their validators see the new values.
    """
    if limits:
        settings = Settings(**{**settings.model_dump(), **limits})
    server, port = loop.run(started_server(settings))
    try:
        yield server, f"127.0.0.1:{port}"
    finally:
        loop.run(server.stop(0))


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


def started_bridge(target: str, **overrides: Any) -> UvicornThread:
    """A bridge of its own in front of ``target`` (logging warnings only), started."""
    bridge = UvicornThread(
        BridgeSettings.model_validate({"grpc_target": target, "log_level": "WARNING", **overrides})
    )
    bridge.start()
    return bridge


@contextmanager
def bridged(target: str, **overrides: Any) -> Iterator[str]:
    """The real bridge over HTTP in front of ``target``, stopped on the way out; its base URL."""
    bridge = started_bridge(target, **{"grpc_timeout_seconds": 3.0, **overrides})
    try:
        yield bridge.url
    finally:
        bridge.stop()
