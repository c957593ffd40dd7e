"""``rest-bridge``: serve the JSON contract over HTTP, forwarding to the gRPC server."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import uvicorn
from pydantic import ValidationError

from events_server.config import add_settings_flags, settings_from_args
from events_server.logs import setup_logging
from rest_bridge.app import create_app
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
    uvicorn.Server(server_config(settings)).run()
    return 0


def server_config(settings: BridgeSettings) -> uvicorn.Config:
    """How uvicorn serves the bridge (the tests serve it the same way)."""
    return uvicorn.Config(
        create_app(settings),
        host=settings.http_host,
        port=settings.http_port,
        log_level=settings.log_level.lower(),
        # The bridge appends the real peer to x-forwarded-for itself; uvicorn's
        # proxy-headers mode would replace the peer with a client-supplied address.
        proxy_headers=False,
        server_header=False,
        # Logging is ours (JSON, set up by main); the access lines come from AccessMiddleware.
        log_config=None,
        access_log=False,
    )
