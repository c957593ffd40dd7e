"""Structured logs: one JSON object per line, carrying the request id of the call in progress.

Both processes log this way. The request id travels from the bridge to the
server as ``x-request-id`` gRPC metadata and lives in a context variable while
a request is handled, so every line logged on its behalf carries it.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import logging
import re
import sys
from contextvars import ContextVar
from datetime import UTC, datetime
from itertools import islice
from typing import Any, Literal, TextIO

import orjson

from events_server.ops.access_log import AccessRecord
from events_server.wire.metadata import new_request_id

request_id: ContextVar[str | None] = ContextVar("request_id", default=None)
"""The id of the request being handled, if any."""

IpMode = Literal["full", "truncated", "none"]

# A caller's id is kept only when it is short and harmless: it is echoed in a
# response header, forwarded as metadata and written to every log line.
_REQUEST_ID_OK = re.compile(r"[A-Za-z0-9._:-]{1,128}")

# Everything a LogRecord carries by itself; any other attribute came in `extra=`
# (but uvicorn's terminal-coloured copy of the message is noise in JSON).
_RECORD_ATTRS = vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys()
_STANDARD_ATTRS = frozenset(_RECORD_ATTRS | {"message", "asctime", "color_message"})


def accept_request_id(value: str | None) -> str:
    """The caller's request id if it is a sane token, else a fresh one."""
    if value and _REQUEST_ID_OK.fullmatch(value):
        return value
    return new_request_id()


@functools.lru_cache(maxsize=4096)  # parsing costs ~10 us; clients come back
def client_ip_for_log(ip: str, mode: IpMode) -> str:
    """The client IP as the log may show it: whole, cut to its network (/24, /48), or not at all."""
    if mode == "full":
        return ip
    if mode == "none":
        return ""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return ""  # not an address (a unix socket path, say): nothing worth keeping
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    prefix = 24 if address.version == 4 else 48
    return str(ipaddress.ip_network(f"{address}/{prefix}", strict=False).network_address)


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, request id, extra fields."""

    _day_time: tuple[int, str] = (-1, "")
    """The last second's date and time of day, as ``_timestamp`` wrote them."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": self._timestamp(record.created),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        current = request_id.get()
        if current is not None:
            line["request_id"] = current
        attrs = vars(record).items()
        # An access line's record was copied from a standard one: what follows is its own.
        for key, value in (
            islice(attrs, len(_RECORD_ATTRS), None) if type(record) is AccessRecord else attrs
        ):
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                line[key] = value
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        try:
            return orjson.dumps(line, default=str).decode()
        except (TypeError, orjson.JSONEncodeError):  # lone surrogates, ints past 64 bits
            return json.dumps(line, ensure_ascii=False, default=str)

    def _timestamp(self, created: float) -> str:
        """``datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds")``, its
        date and time of day made once a second (they cost more than the rest of a line)."""
        second = int(created)
        micros = round((created - second) * 1_000_000)  # rounded as fromtimestamp rounds
        if micros >= 1_000_000:
            second, micros = second + 1, micros - 1_000_000
        cached, prefix = self._day_time
        if second != cached:
            prefix = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")
            self._day_time = (second, prefix)  # one assignment: threads may share a formatter
        return f"{prefix}.{micros // 1000:03d}+00:00"


def setup_logging(level: str, stream: TextIO | None = None) -> None:
    """Send every logger's records to ``stream`` (stderr) as JSON lines at ``level``."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # Libraries that install handlers of their own would print a second, non-JSON copy.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
