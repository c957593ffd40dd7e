"""``events-server``: serve, and the operators' commands (queue, keys, rejected)."""

from events_server.cli.main import main

__all__ = ["main"]
