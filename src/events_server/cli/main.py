"""The one parser, the one dispatch, the one way failures become exit codes."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from pydantic import ValidationError

from events_server.cli import keys, queue, serve, storefronts
from events_server.ops.logs import setup_logging
from events_server.ops.settings import settings_from_args
from events_server.queue.connection import CLUSTER_ERRORS
from events_server.server.settings import Settings

COMMAND_GROUPS = (serve, queue, keys, storefronts)
"""Each registers its commands, and sets ``run(args, settings) -> exit code | None`` on them."""


def build_parser() -> argparse.ArgumentParser:
    """The events-server argument parser."""
    parser = argparse.ArgumentParser(
        prog="events-server", description="Run the event ingestion gRPC server, or read its queue."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for group in COMMAND_GROUPS:
        group.add_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the events-server command."""
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from_args(Settings, args)
    except ValidationError as exc:
        print(f"events-server: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level)
    try:
        code: int | None = args.run(args, settings)
    except CLUSTER_ERRORS as exc:
        print(f"events-server {args.command}: redis: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return code or 0
