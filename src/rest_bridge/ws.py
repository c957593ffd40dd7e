"""WebSocket /ws/create-events: Depict's browser client, one event per frame, each queued once.

Handshake: a page's ``Origin`` must be one the server allows (Origins.Check through
rest_bridge.cors, cached); a non-browser client sends a key instead (the ``api_key``
query parameter or the ``X-API-KEY`` header), which the server checks (with the Origin, if
any; rest_bridge.admission, cached) before the socket opens. Neither: 401; a refused origin or
key: 403 or 401; the server unreachable: 503. These are HTTP answers: the client
never sees an open socket, and Depict's client backs off.

Frames (rest_bridge.ws_frames): each event is validated as a one-event POST and sent
to the server's CreateEvents with the page's forwarded metadata and the frame id as
``x-ws-message-id``, on which the server deduplicates an event without a
deduplication_id: a resend after a lost answer is queued once. ``ok`` is said only
once the event is in Redis; ``not-ok`` only for an event that can never be accepted;
retryable trouble leaves the frame unanswered, and the client resends it.

Bounds (BridgeSettings, per process): frame size (uvicorn closes with 1009), frames in
flight per connection (the socket is not read meanwhile: backpressure, not a queue),
idle time, keepalive pings (uvicorn's), and open connections.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import grpc

from events_server.ops.logs import IpMode, accept_request_id, client_ip_for_log, request_id
from events_server.pb import events_pb2 as pb
from rest_bridge.access import MAX_LOGGED_CHARS, redact_query
from rest_bridge.admission import Admission
from rest_bridge.config import BridgeSettings
from rest_bridge.connections import ws_connection_cap
from rest_bridge.cors import MAX_ORIGIN_CHARS, Cors
from rest_bridge.credentials import KeySource, api_key
from rest_bridge.errors import WWW_AUTHENTICATE, grpc_error_response
from rest_bridge.gather import Gatherer
from rest_bridge.metrics import BridgeMetrics
from rest_bridge.offload import BodyParser
from rest_bridge.rejected import RejectedReporter
from rest_bridge.responses import Reply, json_reply
from rest_bridge.routes.v1 import RULES as V1_RULES
from rest_bridge.upstream import forwarded_metadata
from rest_bridge.ws_frames import (
    MAX_CLOSE_REASON_BYTES,
    Connection,
    Frame,
    id_metadata,
    missing_event_detail,
    not_ok_answer,
    ok_answer,
    parse_frame,
    refusal,
    reply_detail,
)
from rest_bridge.ws_logging import quiet_uvicorn
from rest_bridge.ws_protocol import SOCKET, SocketBytes

WS_PATH = "/ws/create-events"

CLOSE_CREDENTIALS = 4100
"""Close code for a key the server refuses: Depict's client never reconnects after it."""
CLOSE_IDLE = 1000
UNPROCESSABLE = 422
FRAME_WORKER_NICENESS = 10
CLOSE_TRY_AGAIN = 1013
"""Close code for a silent socket closed to admit a new one at ws_max_connections."""

log = logging.getLogger("rest_bridge.access")


async def _deny(scope: dict[str, Any], send: Any, reply: Reply) -> None:
    """Refuse a handshake with an HTTP answer (uvicorn's extension), else a bare 403."""
    if "websocket.http.response" not in scope.get("extensions", {}):
        await send({"type": "websocket.close", "code": 1008})
        return
    headers = [(b"content-type", b"application/json"), *reply.headers]
    start = {"type": "websocket.http.response.start", "status": reply.status, "headers": headers}
    await send(start)
    await send({"type": "websocket.http.response.body", "body": reply.body})


def _origin_refused(origin: str) -> Reply:
    shown = origin[:MAX_ORIGIN_CHARS]
    detail = (
        f"origin {shown!r} may not open {WS_PATH}: it is not a registered storefront"
        " (events-server storefronts add) nor among the origins of any API key"
    )
    if shown == "null":
        detail = "origin 'null' is never allowed (sandboxed frames and file:// pages)"
    return json_reply(403, {"detail": detail})


class WebSocketIngest:
    """The ASGI app of /ws/create-events (one per bridge process)."""

    def __init__(  # noqa: PLR0917
        self,
        settings: BridgeSettings,
        cors: Cors,
        metrics: BridgeMetrics,
        rejected: RejectedReporter | None,
        gatherer: Gatherer,
        admission: Admission,
    ) -> None:
        self._settings = settings
        self._max_open = ws_connection_cap(settings)
        self._gatherer = gatherer
        self._admission = admission
        self._cors = cors
        self._metrics = metrics
        self._rejected = rejected
        self._ip_mode: IpMode = settings.log_client_ip
        # Frames costly to validate go to worker processes of their own, as POST bodies'
        # do, and at a lower priority: a storefront's events are small and parsed inline,
        # so those workers' frames are an attacker's. They yield the CPU to the loop that
        # answers everyone else (4 sockets of costly frames: a storefront's p99 140-400 ms
        # at the same priority, ~160 ms below it, on the 2-core box).
        self._parser = BodyParser(settings, niceness=FRAME_WORKER_NICENESS)
        self._silent: dict[Connection, None] = {}
        """Open sockets that have sent no frame yet, the oldest first."""
        self.open = 0
        """Connections open or being admitted in this process."""
        quiet_uvicorn()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        started = time.perf_counter()
        headers = dict(scope["headers"])
        wanted = headers.get(b"x-request-id")
        token = request_id.set(accept_request_id(wanted.decode("latin-1") if wanted else None))
        try:
            if (await receive())["type"] != "websocket.connect":
                return
            key, source = api_key(headers, scope.get("query_string", b""))
            if source == KeySource.COOKIE:
                key = None  # sent by the browser with a handshake from any page: not the page's
            refused = await self._admit(scope, headers, key)
            if refused is not None:
                await _deny(scope, send, refused)
                self._metrics.ws_handshake(refused.status)
                self._log(scope, f"{refused.status}", started, status=refused.status)
                return
            conn = self._connection(scope, send, headers, key)
            try:
                await self._serve(scope, receive, conn, started)
            finally:
                self._silent.pop(conn, None)
                if conn.counted:
                    self.open -= 1
        finally:
            request_id.reset(token)

    # --- the handshake ----------------------------------------------------------------

    async def _admit(
        self, scope: dict[str, Any], headers: dict[bytes, bytes], key: str | None
    ) -> Reply | None:
        """None when the socket may open (and it is counted as open), else the refusal."""
        limit = self._max_open
        if self.open >= limit and self._silent:
            # Sockets that never send a frame cannot keep a storefront out (as idle HTTP
            # connections cannot, rest_bridge.connections): the one silent longest goes.
            victim = next(iter(self._silent))
            del self._silent[victim]
            reason = "closed to admit another: it sent no frame (ws_max_connections reached)"
            victim.closer = victim.loop.create_task(victim.close(CLOSE_TRY_AGAIN, reason))
            self.open -= 1  # counted out now: its descriptor goes within ws_write_timeout
            victim.counted = False
        elif self.open >= limit:
            detail = (
                f"this bridge process has {limit} WebSocket connections open, its limit"
                " (ws_max_connections): try again later"
            )
            retry = str(self._settings.retry_after_seconds)
            return json_reply(503, {"detail": detail}, {"Retry-After": retry})
        origin = headers.get(b"origin")
        if key is None and origin is None:
            detail = (
                "no Origin and no API key: a page's WebSocket carries its Origin; other"
                " clients send a key (the api_key query parameter or the X-API-KEY header)"
            )
            return json_reply(401, {"detail": detail}, {"WWW-Authenticate": WWW_AUTHENTICATE})
        self.open += 1  # before any await: concurrent handshakes must not overshoot the limit
        try:
            refused = await self._check(scope, headers, key, origin)
        except BaseException:
            self.open -= 1
            raise
        if refused is not None:
            self.open -= 1
        return refused

    async def _check(
        self,
        scope: dict[str, Any],
        headers: dict[bytes, bytes],
        key: str | None,
        origin: bytes | None,
    ) -> Reply | None:
        try:
            if key is not None:  # the key, and the page's origin against it (cached)
                return await self._admission.refusal(scope, headers, key)
            assert origin is not None
            decision = await self._cors.decide(origin.decode("latin-1"), None)
        except grpc.aio.AioRpcError as error:
            return grpc_error_response(error, self._settings.retry_after_seconds)
        return None if decision.allowed else _origin_refused(origin.decode("latin-1"))

    # --- the open socket --------------------------------------------------------------

    def _connection(
        self, scope: dict[str, Any], send: Any, headers: dict[bytes, bytes], key: str | None
    ) -> Connection:
        client = scope.get("client")
        metadata = forwarded_metadata(headers, client[0] if client else "", key)
        origin = headers.get(b"origin")
        page = origin.decode("latin-1") if origin is not None else None
        conn = Connection(send, metadata, (key, page), self._settings.ws_max_in_flight)
        socket: SocketBytes | None = scope.get("extensions", {}).get(SOCKET)
        if socket is not None:
            conn.release = socket.release
        return conn

    async def _serve(
        self, scope: dict[str, Any], receive: Any, conn: Connection, started: float
    ) -> None:
        await conn.send({"type": "websocket.accept"})
        self._metrics.ws_handshake(101)
        self._metrics.ws_open.inc()
        self._log(scope, "101", started, status=101)
        self._silent[conn] = None
        limits = self._settings
        first = min(limits.ws_idle_timeout_seconds, limits.ws_silent_timeout_seconds)
        conn.timer = conn.loop.call_at(conn.last_active + first, self._idle_check, conn)
        try:
            await self._read(conn, receive)
        finally:
            conn.timer.cancel()
            if conn.tasks:  # their calls may be queueing events: let them end
                await asyncio.gather(*conn.tasks, return_exceptions=True)
            if conn.closer is not None:
                await conn.closer
            self._metrics.ws_open.dec()
            self._metrics.ws_closed(conn.close_code)
            self._log(
                scope,
                f"closed {conn.close_code}",
                started,
                status=101,
                close_code=conn.close_code,
                close_reason=conn.close_reason[:MAX_CLOSE_REASON_BYTES],
                frames=conn.counts.total(),
                **conn.counts,
            )

    async def _read(self, conn: Connection, receive: Any) -> None:
        """Read frames while fewer than ws_max_in_flight are being handled."""
        metrics = self._metrics
        while True:
            # At the limit, receive() is not called: uvicorn stops reading the socket,
            # and the client's frames wait in its own buffers (and the kernel's).
            await conn.slots.acquire()
            message = await receive()
            if message["type"] != "websocket.receive":  # websocket.disconnect
                conn.slots.release()
                if not conn.closing:  # the peer's close, or uvicorn's (1009, 1011, 1012)
                    conn.closing = True
                    conn.close_code = message.get("code", 1005)
                    conn.close_reason = message.get("reason") or ""
                return
            conn.last_active = conn.loop.time()
            data = message.get("text")
            if data is None:
                data = message.get("bytes") or b""
            if not conn.spoke:
                conn.spoke = True
                self._silent.pop(conn, None)
            if conn.closing:  # we closed it: the client sends this again on a new socket
                conn.done(len(data))
                continue
            frame = parse_frame(data)
            if isinstance(frame, str):
                conn.counts["error"] += 1
                metrics.ws_frame("error")
                await conn.answer(frame)
                conn.done(len(data))
            elif frame.id in conn.in_flight:  # a resend of a frame being handled
                conn.counts["resend_in_flight"] += 1
                metrics.ws_frame("resend_in_flight")
                conn.done(len(data))
            else:
                conn.in_flight.add(frame.id)
                metrics.ws_in_flight.inc()
                task = conn.loop.create_task(
                    self._handle(conn, frame, time.perf_counter(), len(data))
                )
                conn.tasks.add(task)
                task.add_done_callback(conn.finished)

    def _idle_check(self, conn: Connection) -> None:
        if conn.closing:
            return
        idle, setting = self._settings.ws_idle_timeout_seconds, "ws_idle_timeout_seconds"
        if not conn.spoke and self._settings.ws_silent_timeout_seconds < idle:
            idle, setting = self._settings.ws_silent_timeout_seconds, "ws_silent_timeout_seconds"
        now = conn.loop.time()
        due = conn.last_active + idle
        if conn.tasks or now < due:
            conn.timer = conn.loop.call_at(max(due, now + 1.0), self._idle_check, conn)
            return
        reason = f"idle for {idle:g} s ({setting})"
        conn.closer = conn.loop.create_task(conn.close(CLOSE_IDLE, reason))

    # --- one frame --------------------------------------------------------------------

    async def _handle(self, conn: Connection, frame: Frame, started: float, size: int) -> None:
        try:
            outcome, answer = await self._outcome(conn, frame)
        except Exception:  # a bug; the frame stays unanswered and the client resends it
            log.exception("WebSocket frame %r failed", frame.id[:MAX_LOGGED_CHARS])
            outcome, answer = "unanswered", None
        finally:
            conn.in_flight.discard(frame.id)
            self._metrics.ws_in_flight.dec()
        try:
            if answer is not None:
                await conn.answer(answer)
        finally:
            conn.release(size)
        conn.last_active = conn.loop.time()
        conn.counts[outcome] += 1
        self._metrics.ws_frame(outcome, time.perf_counter() - started)

    async def _outcome(self, conn: Connection, frame: Frame) -> tuple[str, str | None]:
        """What became of the frame's event, and the answer to send (None: none)."""
        if not frame.has_event:
            return self._not_ok(conn, frame, missing_event_detail())
        request: pb.CreateEventsRequest | Reply | None = frame.request
        if request is None:
            request = self._parser.parse_inline(frame.body, V1_RULES)
            if request is None:
                request = (await self._parser.parse(frame.body, V1_RULES))[0]
        if isinstance(request, Reply):
            if request.status != UNPROCESSABLE:  # the parse workers are busy: retry later
                return "unanswered", None
            return self._not_ok(conn, frame, reply_detail(request))
        try:
            response = await self._gatherer.create_events(
                request, conn.metadata, id_metadata(frame.id)
            )
        except grpc.aio.AioRpcError as error:
            refused = refusal(error)
            if refused.close_reason is not None:
                await conn.close(CLOSE_CREDENTIALS, refused.close_reason)
                return "unauthenticated", None
            if refused.detail is None:
                return "unanswered", None
            if not refused.report:
                return "not_ok", not_ok_answer(frame.id, refused.detail)
            return self._not_ok(conn, frame, refused.detail)
        return ("accepted" if response.accepted else "duplicate"), ok_answer(frame.id)

    def _not_ok(
        self, conn: Connection, frame: Frame, detail: list[dict[str, Any]]
    ) -> tuple[str, str]:
        """Refuse the event for good, and file it in the rejected record (as a POST's 422)."""
        if self._rejected is not None:
            self._rejected.report(frame.body, detail, conn.key, conn.origin)
        return "not_ok", not_ok_answer(frame.id, detail)

    def close(self) -> None:
        """Stop the frame-parsing processes (at shutdown)."""
        self._parser.close()

    def _log(self, scope: dict[str, Any], what: str, started: float, **fields: Any) -> None:
        if not log.isEnabledFor(logging.INFO):
            return
        client = scope.get("client")
        line: dict[str, Any] = {
            "method": "WS",
            "path": WS_PATH,
            **fields,
            "duration_ms": round((time.perf_counter() - started) * 1000, 3),
            "client_ip": client_ip_for_log(client[0] if client else "", self._ip_mode),
        }
        if query := scope.get("query_string", b"").decode("latin-1"):
            line["query"] = redact_query(query)[:MAX_LOGGED_CHARS]
        log.info("WS %s %s", WS_PATH, what, extra=line)
