"""Bounds on the bridge's HTTP connections, which uvicorn does not set itself.

uvicorn's httptools protocol (the one it picks when httptools is installed, as with
``uvicorn[standard]``) reads a request line and headers of any size: a 64 MB header
was read and answered after 7 s, the bridge 60 MiB larger, as httptools rebuilds a
header on every read. It arms no timer before a connection's first response (a
connection that sends nothing, or a byte a second, stays open for good) and accepts
connections until the process runs out of file descriptors, after which every new
connection fails, unlogged. Its ``limit_concurrency`` answers 503 only once a
request's headers are in and frees no descriptor; ``timeout_keep_alive`` applies only
between requests; ``h11_max_incomplete_event_size`` is for the slower h11 protocol
(which answers 400, not 431).

GuardedHttpToolsProtocol (rest_bridge.http_protocol) is uvicorn's httptools protocol with
the bounds the bridge settings give (rest_bridge.config):

- ``max_header_bytes``: a request line and headers larger than that are answered 431
  as soon as the bytes past it arrive, and never given to the parser;
- ``header_timeout_seconds``: a connection must send a whole request head within that
  time of opening (or of its next request's first byte); it is closed otherwise, with
  a 408 if it had started;
- ``max_connections`` (lowered to the open-file limit less FD_RESERVE): past it a new
  connection closes the connection idle the longest (one with no request in
  progress: between requests, or still sending its head), as nginx reuses its idle
  keep-alive connections; when every connection has a request in progress, the new
  one is answered 503 with Retry-After. Idle sockets cannot keep a legitimate client
  out: they are the first to go.

Each closing is counted in ``events_http_connections_closed_total{reason}`` and
summed up in a log line (at most one per LOG_EVERY_SECONDS).
"""

from __future__ import annotations

import asyncio
import logging
import math
import resource
import ssl
import time
from collections import OrderedDict
from typing import Any, Protocol, TypeVar

from prometheus_client import CollectorRegistry, Counter

from rest_bridge.budget import ByteBudget
from rest_bridge.config import BridgeSettings

log = logging.getLogger(__name__)

FD_RESERVE = 128
"""Descriptors kept for everything but client connections: the listening socket, the gRPC
channel, the parse processes' pipes, logs, and connections accepted in one burst before
the cap closes others."""

LOG_EVERY_SECONDS = 10.0

EVICTED = "evicted"
REFUSED = "refused"
HEADER_TOO_LARGE = "header_too_large"
HEADER_TIMEOUT = "header_timeout"


def connection_cap(configured: int) -> int:
    """``configured``, lowered to what the open-file limit allows (less FD_RESERVE)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return configured
    return max(1, min(configured, soft - FD_RESERVE))


def ws_connection_cap(settings: BridgeSettings) -> int:
    """``ws_max_connections``, lowered in proportion when ``max_connections`` is: the share
    of connections left to beacons and POSTs stays the same under a low open-file limit."""
    cap = connection_cap(settings.max_connections)
    scaled = cap * settings.ws_max_connections // settings.max_connections
    return max(1, min(settings.ws_max_connections, scaled))


class Connection(Protocol):
    """An HTTP connection as the guard sees it (rest_bridge.http_protocol)."""

    transport: Any


class ConnectionGuard:
    """The connection bounds of one bridge process, and which connections are idle."""

    def __init__(
        self,
        settings: BridgeSettings,
        registry: CollectorRegistry | None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.tls = tls
        """The bridge's own TLS (rest_bridge.https), or None for plain HTTP."""
        self.max_connections = connection_cap(settings.max_connections)
        if self.max_connections < settings.max_connections:
            log.warning(
                "max_connections lowered from %d to %d: this process may open %d files"
                " (RLIMIT_NOFILE) and keeps %d descriptors for the rest",
                settings.max_connections,
                self.max_connections,
                self.max_connections + FD_RESERVE,
                FD_RESERVE,
            )
        self.budget = ByteBudget(settings.max_bytes_in_flight, settings.ws_max_frame_bytes)
        """The bytes of bodies and frames in flight (rest_bridge.budget), per process."""
        self.ws_limits = settings
        """The WebSocket bounds its protocol applies (rest_bridge.ws_protocol)."""
        self.max_header_bytes = settings.max_header_bytes
        self.header_timeout = settings.header_timeout_seconds
        self.retry_after = str(settings.retry_after_seconds)
        self.closed = Counter(
            "events_http_connections_closed",
            "HTTP connections the bridge closed for its limits: evicted (idle, to admit a new"
            " one at max_connections), refused (503 at max_connections), header_too_large"
            " (431), header_timeout.",
            ["reason"],
            registry=registry,
        )
        for reason in (EVICTED, REFUSED, HEADER_TOO_LARGE, HEADER_TIMEOUT):
            self.closed.labels(reason)
        # Connections with no request in progress, the longest idle first.
        self._idle: OrderedDict[Connection, None] = OrderedDict()
        # Connections closed here whose descriptors are not released yet.
        self._closing: set[Connection] = set()
        # HTTPS connections still in their TLS handshake, the oldest first (rest_bridge.https).
        self._shaking: OrderedDict[Handshake, None] = OrderedDict()
        self.lingering = 0
        self._unlogged: dict[str, int] = {}
        self._logged_at = -math.inf
        self._flush: asyncio.TimerHandle | None = None

    def admit(self, new: Connection, connections: set[Any]) -> bool:
        """Make room for ``new`` (already in ``connections``); False when it must be refused."""
        if not self._make_room(connections, None):
            return False
        self.idle(new)
        return True

    def admit_handshake(self, new: Handshake, connections: set[Any]) -> bool:
        """Count ``new``, an HTTPS connection starting its TLS handshake, making room for it
        as for any; False when it must be refused."""
        self._shaking[new] = None
        if self._make_room(connections, new):
            return True
        self._shaking.pop(new, None)
        return False

    def shaken(self, connection: Handshake) -> None:
        """``connection``'s handshake is over (done, failed or cut): no longer counted here."""
        self._shaking.pop(connection, None)

    def _make_room(self, connections: set[Any], keep: Handshake | None) -> bool:
        """Close connections until the count is within the cap: those still in their TLS
        handshake first (the oldest first, never ``keep``: the cheapest to lose, and what a
        flood of sockets that never speak looks like), then the longest idle."""
        excess = len(connections) + len(self._shaking) - len(self._closing) - self.max_connections
        while excess > 0 and self._shaking:
            victim = next(iter(self._shaking))
            if victim is keep:
                break
            del self._shaking[victim]
            victim.cut()
            self.note(EVICTED)
            excess -= 1
        while excess > 0 and self._idle:
            idle, _ = self._idle.popitem(last=False)
            self.closing(idle)
            idle.transport.close()
            self.note(EVICTED)
            excess -= 1
        return excess <= 0

    def idle(self, connection: Connection) -> None:
        """``connection`` has no request in progress (from now: it goes last in line)."""
        self._idle[connection] = None
        self._idle.move_to_end(connection)

    def busy(self, connection: Connection) -> None:
        """``connection`` has a request in progress: it is not to be evicted."""
        self._idle.pop(connection, None)

    def closing(self, connection: Connection) -> None:
        """``connection`` is being closed here: it no longer counts against the cap."""
        self._idle.pop(connection, None)
        self._closing.add(connection)

    def gone(self, connection: Connection) -> None:
        """``connection`` is closed (or handed over to a WebSocket protocol)."""
        self._idle.pop(connection, None)
        self._closing.discard(connection)

    def note(self, reason: str) -> None:
        """Count a connection closed for ``reason``; log the counts, at most every so often."""
        self.closed.labels(reason).inc()
        self._unlogged[reason] = self._unlogged.get(reason, 0) + 1
        wait = self._logged_at + LOG_EVERY_SECONDS - time.monotonic()
        if wait <= 0:
            self._log()
        elif self._flush is None:
            self._flush = asyncio.get_running_loop().call_later(wait, self._log)

    def _log(self) -> None:
        self._flush = None
        counts, self._unlogged = self._unlogged, {}
        if not counts:
            return
        self._logged_at = time.monotonic()
        capped = counts.get(EVICTED, 0) + counts.get(REFUSED, 0)
        log.log(
            logging.WARNING if capped else logging.INFO,
            "connections closed by the bridge's limits: %s%s",
            ", ".join(f"{reason} {n}" for reason, n in sorted(counts.items())),
            f" (max_connections={self.max_connections} reached)" if capped else "",
            extra={"closed": counts, "max_connections": self.max_connections},
        )


class Handshake(Protocol):
    """An HTTPS connection in its TLS handshake, as the guard sees it (rest_bridge.https)."""

    def cut(self) -> None:
        """Close it now, handshake unfinished."""


A = TypeVar("A")


def app_attribute(app: Any, name: str, kind: type[A]) -> A | None:
    """The ``name`` attribute, of type ``kind``, of the bridge app uvicorn serves (through any
    middleware it wrapped it in); None when it has none."""
    while app is not None:
        found = getattr(app, name, None)
        if isinstance(found, kind):
            return found
        app = getattr(app, "app", None)
    return None


def guard_of(app: Any) -> ConnectionGuard:
    """The guard of the bridge app uvicorn serves (through any middleware it wrapped it in)."""
    guard = app_attribute(app, "connection_guard", ConnectionGuard)
    if guard is None:
        raise RuntimeError("GuardedHttpToolsProtocol serves rest_bridge apps only")
    return guard
