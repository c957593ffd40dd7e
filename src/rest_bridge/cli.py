"""``rest-bridge``: serve the JSON contract over HTTP, forwarding to the gRPC server."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

import uvicorn
from pydantic import SecretStr, ValidationError

from events_server.ops.exposition import shared_by_workers, values_changed_on_one_thread
from events_server.ops.logs import setup_logging
from events_server.ops.settings import ENV_PREFIX, add_settings_flags, settings_from_args
from rest_bridge.app import Bridge, create_app
from rest_bridge.config import BridgeSettings


def build_parser() -> argparse.ArgumentParser:
    """The rest-bridge argument parser."""
    parser = argparse.ArgumentParser(
        prog="rest-bridge",
        description="Serve POST /create-events over HTTP, forwarding to the events-server.",
    )
    add_settings_flags(
        parser,
        BridgeSettings,
        BridgeSettings.model_fields,
        short={"http_host": "--host", "http_port": "--port"},
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the rest-bridge command."""
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from_args(BridgeSettings, args)
    except ValidationError as exc:
        print(f"rest-bridge: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level)
    if settings.workers == 1:
        values_changed_on_one_thread()
        uvicorn.Server(server_config(settings)).run()
        return 0
    # Each worker process builds its own app (and gRPC channel) from the environment.
    os.environ.update(settings_to_env(settings))
    with shared_by_workers():  # /metrics of any worker adds up all of them
        uvicorn.run(
            "rest_bridge.cli:app_from_environment",
            factory=True,
            workers=settings.workers,
            **uvicorn_options(settings),
        )
    return 0


def settings_to_env(settings: BridgeSettings) -> dict[str, str]:
    """The environment that reproduces these settings in another process."""
    return {
        f"{ENV_PREFIX}{name.upper()}": (
            value.get_secret_value() if isinstance(value, SecretStr) else str(value)
        )
        for name, value in settings
        if value is not None
    }


def app_from_environment() -> Bridge:
    """The app of one worker process, configured from the environment."""
    settings = BridgeSettings()
    setup_logging(settings.log_level)  # a spawned worker starts with logging unset
    return create_app(settings)


def uvicorn_options(settings: BridgeSettings) -> dict[str, Any]:
    """How uvicorn serves the bridge."""
    return {
        "host": settings.http_host,
        "port": settings.http_port,
        "log_level": settings.log_level.lower(),
        # The bridge appends the real peer to x-forwarded-for itself; uvicorn's
        # proxy-headers mode would replace the peer with a client-supplied address.
        "proxy_headers": False,
        "server_header": False,
        # uvicorn's httptools protocol with the header, time and connection bounds uvicorn
        # lacks (rest_bridge.connections), behind the bridge's own TLS when it has a
        # certificate (rest_bridge.https: uvicorn's would leave handshakes unbounded);
        # its keep-alive timeout is the bridge's setting.
        "http": "rest_bridge.https:bridge_protocol",
        "timeout_keep_alive": settings.keep_alive_timeout_seconds,
        # Logging is ours (JSON, see setup_logging); AccessMiddleware writes the access lines.
        "log_config": None,
        "access_log": False,
        # WebSockets (rest_bridge.ws): uvicorn's Sans-I/O implementation, which stops
        # reading a socket while a received message waits for the app and enforces the
        # size limit on each frame's header, with the bounds it lacks
        # (rest_bridge.ws_protocol).
        "ws": "rest_bridge.ws_protocol:GuardedWebSocketProtocol",
        "ws_max_size": settings.ws_max_frame_bytes,
        "ws_ping_interval": settings.ws_ping_interval_seconds,
        "ws_ping_timeout": settings.ws_ping_timeout_seconds,
        "ws_per_message_deflate": settings.ws_per_message_deflate,
    }


def server_config(settings: BridgeSettings, **overrides: Any) -> uvicorn.Config:
    """A single-process uvicorn serving the bridge (the tests serve it the same way)."""
    return uvicorn.Config(create_app(settings), **{**uvicorn_options(settings), **overrides})
