"""The gRPC server and the bridge in the test's own process, on free loopback ports."""

from __future__ import annotations

import asyncio
import faulthandler
import socket
import sys
import threading
import time
import warnings
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import grpc
import uvicorn

from events_server.pb import events_pb2_grpc
from events_server.server.app import EventsServer, create_server
from events_server.server.settings import Settings
from rest_bridge.cli import server_config
from rest_bridge.config import BridgeSettings
from tests.harness.rpc import keyed_channel
from tests.harness.valkey import free_port

T = TypeVar("T")


class LoopThread:
    """An asyncio event loop in a daemon thread, for servers under test."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        """Run a coroutine on the loop and wait for its result."""
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            # A hang is worth a picture: every thread's stack and the loop's tasks.
            faulthandler.dump_traceback(all_threads=True)
            for task in asyncio.all_tasks(self.loop):
                print(task, file=sys.stderr)  # print_stack fails on grpc's Cython frames
            raise

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


def own_settings(url: str, prefix: str, **overrides: Any) -> Settings:
    """Server settings for a test's own Redis."""
    base: dict[str, Any] = {
        "redis_url": url,
        "grpc_addr": "127.0.0.1:0",
        "key_prefix": prefix,
        "partitions": 8,
        "redis_timeout_seconds": 1.0,
        "health_interval_seconds": 0.1,
        "shutdown_grace_seconds": 5.0,
        "metrics_addr": "127.0.0.1:0",  # never the fixed default: tests run side by side
        "access_log_sample": 1.0,  # every line: tests look for theirs (sampling has its own)
    }
    return Settings(**{**base, **overrides})


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
        stop(loop, server)


def stop(loop: LoopThread, server: EventsServer) -> None:
    """Stop an in-process server; a stop that hangs is reported (with every stack), not fatal.

    grpc.aio's Server.stop(0) has been seen, rarely and only under load, never to return for
    a second server on the shared loop; the test's own assertions have all run by then.
    """
    try:
        loop.run(server.stop(0), timeout=15)
    except TimeoutError:
        # Free its metrics port at least, so that no later server finds it taken.
        if server.metrics_endpoint is not None:
            server.metrics_endpoint.stop()
        warnings.warn(
            "events-server stop(0) did not return within 15 s (stacks above)",
            RuntimeWarning,
            stacklevel=2,
        )


@contextmanager
def serving_stub(
    loop: LoopThread, settings: Settings, api_key: str, **limits: int
) -> Iterator[tuple[EventsServer, grpc.Channel, events_pb2_grpc.EventsServiceStub]]:
    """An in-process events-server (see serving), a channel to it sending ``api_key``, a stub."""
    with (
        serving(loop, settings, **limits) as (server, target),
        keyed_channel(target, api_key) as channel,
    ):
        yield server, channel, events_pb2_grpc.EventsServiceStub(channel)


class UvicornThread:
    """The real bridge app served by uvicorn on a free loopback port (HTTPS when the
    settings have a certificate)."""

    def __init__(self, settings: BridgeSettings) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port: int = self.sock.getsockname()[1]
        scheme = "https" if settings.http_tls_cert_file else "http"
        self.url = f"{scheme}://127.0.0.1:{self.port}"
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


def bridge_settings_for(target: str, **overrides: Any) -> BridgeSettings:
    """Settings of a bridge of its own in front of ``target``, logging warnings only (and,
    when a test sets the level lower, every access line: sampling has tests of its own)."""
    return BridgeSettings.model_validate(
        {"grpc_target": target, "log_level": "WARNING", "access_log_sample": 1.0, **overrides}
    )


@contextmanager
def serving_bridge(settings: BridgeSettings) -> Iterator[str]:
    """The real bridge over HTTP with these settings, stopped on the way out; its base URL."""
    bridge = UvicornThread(settings)
    bridge.start()
    try:
        yield bridge.url
    finally:
        bridge.stop()


@contextmanager
def bridged(target: str, **overrides: Any) -> Iterator[str]:
    """A bridge of its own in front of ``target`` (see bridge_settings_for); its base URL."""
    with serving_bridge(bridge_settings_for(target, **overrides)) as url:
        yield url


@contextmanager
def lonely_bridge() -> Iterator[str]:
    """A bridge in front of a port nobody listens on (gRPC timeout 1 s); its base URL."""
    with bridged(f"127.0.0.1:{free_port()}", grpc_timeout_seconds=1) as url:
        yield url
