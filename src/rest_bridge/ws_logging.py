"""What uvicorn and websockets log about a WebSocket handshake, kept free of keys."""

from __future__ import annotations

import logging

from rest_bridge.access import REDACTED, redact_query

# Headers whose values are secrets, as websockets logs a handshake (at DEBUG).
_SECRET_HEADERS = frozenset({"x-api-key", "cookie", "authorization"})


class _UvicornWsLines(logging.Filter):
    """Keeps keys out of what uvicorn and websockets log about a handshake.

    uvicorn's own WebSocket access lines (INFO) hold the query string: they are dropped
    (the endpoint writes its own). At DEBUG, websockets logs the request line and every
    header: the query's key and secret headers are redacted.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        msg, args = record.msg, record.args
        if not isinstance(msg, str):
            return True
        if msg.startswith('%s - "WebSocket'):
            return False
        if msg == "< %s %s %s" and isinstance(args, tuple) and len(args) == 3:
            path, _, query = str(args[1]).partition("?")
            record.args = (args[0], f"{path}?{redact_query(query)}" if query else path, args[2])
        elif (
            msg in ("< %s: %s", "> %s: %s")
            and isinstance(args, tuple)
            and len(args) == 2
            and str(args[0]).lower() in _SECRET_HEADERS
        ):
            record.args = (args[0], REDACTED)
        return True


def quiet_uvicorn() -> None:
    uvicorn_log = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _UvicornWsLines) for f in uvicorn_log.filters):
        uvicorn_log.addFilter(_UvicornWsLines())
