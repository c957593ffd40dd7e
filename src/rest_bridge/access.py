"""The bridge's edge: request id, one access line and the HTTP metrics for every request.

A pure ASGI middleware (Starlette's BaseHTTPMiddleware costs a task and a
stream per request). Keys never reach the log: the query string is logged with
``api_key`` redacted, and headers and cookies are not logged at all.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, Protocol
from urllib.parse import unquote_plus

from starlette.types import Message, Receive, Scope, Send

from events_server.ops.access_log import AccessLog
from events_server.ops.logs import IpMode, accept_request_id, client_ip_for_log
from events_server.ops.logs import request_id as current_request_id
from events_server.wire.metadata import REQUEST_ID_HEADER
from rest_bridge.metrics import UNMATCHED_ROUTE, BridgeMetrics
from rest_bridge.responses import Reply

log = logging.getLogger("rest_bridge.access")

AnyASGIApp = Callable[[Any, Any, Any], Awaitable[None]]


class Answering(Protocol):
    """A lean route (rest_bridge.routes.steps.JsonPost): its reply and the headers it goes
    with, for the caller to send."""

    async def answer(
        self, scope: Any, receive: Any
    ) -> tuple[Reply, Sequence[tuple[bytes, bytes]]]: ...


# Query parameters whose values are secrets (compared after decoding, case-insensitively).
SECRET_PARAMS = frozenset({"api_key", "apikey", "x-api-key", "x_api_key"})
REDACTED = "[REDACTED]"

# Probes and scrapes are frequent and dull: their lines are DEBUG.
QUIET_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})

MAX_LOGGED_CHARS = 2048

REQUEST_ID_BYTES = REQUEST_ID_HEADER.encode()


def redact_query(query: str) -> str:
    """The query string with the value of every secret parameter replaced."""
    if not query:
        return query
    parts = []
    for part in query.split("&"):
        name = part.partition("=")[0]
        # Decoded as Starlette decodes it: "api%5Fkey" is the api_key parameter too.
        secret = unquote_plus(name).strip().lower() in SECRET_PARAMS
        parts.append(f"{name}={REDACTED}" if secret else part)
    return "&".join(parts)


def request_id_of(scope: Scope) -> str:
    """The request's id: the caller's ``X-Request-ID`` if sane, else a new one."""
    return accept_request_id(_header(scope, REQUEST_ID_BYTES))


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            text: str = value.decode("latin-1")
            return text
    return None


class AccessMiddleware:
    """Gives each HTTP request an id (the caller's ``X-Request-ID`` if sane), logs and counts it."""

    def __init__(
        self,
        app: AnyASGIApp,
        metrics: BridgeMetrics,
        ip_mode: IpMode,
        routes: Iterable[str] = (),
        sample: float = 1.0,
    ) -> None:
        self.app = app
        self._metrics = metrics
        self._ip_mode = ip_mode
        # Successful (2xx) lines: this share of them; every other status is written.
        self._access = AccessLog(log.name, sample)
        # Paths served outside the router (no scope["route"]): labelled as themselves.
        self._routes = frozenset(routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        rid = request_id_of(scope)
        token = current_request_id.set(rid)
        status = 500  # what the client gets when the app raises before answering

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [*message.get("headers", ()), (REQUEST_ID_BYTES, rid.encode())]
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            # The route template, never the raw path: that is client-chosen.
            path = scope["path"]
            route = getattr(scope.get("route"), "path", None) or (
                path if path in self._routes else UNMATCHED_ROUTE
            )
            self.done(scope, route, status, started)
            current_request_id.reset(token)

    async def answer(self, route: Answering, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one request of a lean route (``scope["path"]`` one of ``routes``) as
        ``__call__`` serves any: the same id, header, line and metrics, the reply sent here
        with its id rather than through a wrapper of ``send`` (a closure, a message copied
        and its headers rebuilt, per request)."""
        started = time.perf_counter()
        rid = request_id_of(scope)
        token = current_request_id.set(rid)
        status = 500  # what the client gets when the app raises before answering
        try:
            reply, extra = await route.answer(scope, receive)
            status = reply.status
            await reply.send(send, extra, (REQUEST_ID_BYTES, rid.encode()))
        finally:
            self.done(scope, scope["path"], status, started)
            current_request_id.reset(token)

    def done(self, scope: Scope, route: str, status: int, started: float) -> None:
        """Count the request answered with ``status`` and write its line if it is wanted."""
        seconds = time.perf_counter() - started
        self._metrics.observe_request(route, scope["method"], status, seconds)
        level = logging.DEBUG if scope["path"] in QUIET_PATHS else logging.INFO
        if self._access.wanted(level, 200 <= status < 300):
            self._log(level, scope, status, seconds)

    def _log(self, level: int, scope: Scope, status: int, seconds: float) -> None:
        client = scope.get("client")
        method = scope["method"]
        path = scope["path"][:MAX_LOGGED_CHARS]
        fields: dict[str, Any] = {
            "method": method,
            "path": path,
            "status": status,
            "duration_ms": round(seconds * 1000, 3),
            "client_ip": client_ip_for_log(client[0] if client else "", self._ip_mode),
        }
        if query := scope.get("query_string", b"").decode("latin-1"):
            fields["query"] = redact_query(query)[:MAX_LOGGED_CHARS]
        self._access.write(level, f"{method} {path} {status}", fields)
