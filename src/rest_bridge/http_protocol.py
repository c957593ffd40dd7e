"""uvicorn's httptools protocol with the bridge's connection bounds (rest_bridge.connections
says which, and why uvicorn's own fall short): the head's size and time, the connections'
count through the guard, and the idle time between requests."""

from __future__ import annotations

import asyncio
import math
from typing import Any, cast

import orjson
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import ServerState

from rest_bridge.connections import (
    HEADER_TIMEOUT,
    HEADER_TOO_LARGE,
    REFUSED,
    Handshake,
    guard_of,
)
from rest_bridge.writes import TurnWrites

LINGER_SECONDS = 1.0
"""How long a refused connection is still read (and the bytes dropped) after its answer,
so that the client reads the answer rather than a reset."""

MAX_LINGERING = 64
"""Refused connections lingering at once; past it they are closed at once."""


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, bounded (see the module's docstring)."""

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.guard = guard_of(self.app)
        self._in_head = True  # the next bytes are a request line and headers
        self._head_bytes = 0
        # Its two time bounds (loop time; inf: none), watched by one timer set lazily: a
        # bound moved later leaves the timer where it is (it fires early and is set again),
        # so that a request does not cost a timer set and cancelled for each (~1.6 µs, and
        # uvicorn's keep-alive timer as many again).
        self._head_deadline = math.inf
        """The head under way must be in by then (header_timeout_seconds)."""
        self._idle_deadline = math.inf
        """Idle between requests until then at most (keep_alive_timeout_seconds)."""
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        self._lingering = False
        self.handshake: Handshake | None = None
        """The TLS in front of it (rest_bridge.https), counted by the guard until now."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if self.handshake is not None:
            self.guard.shaken(self.handshake)  # from here on it is an HTTP connection
        # A response's head and body (and a turn's other writes) in one send.
        super().connection_made(cast(asyncio.Transport, TurnWrites(transport)))
        if not self.guard.admit(self, self.connections):
            self._refuse(
                503,
                "the bridge has as many connections as it may hold, each with a request in"
                " progress: retry shortly",
                REFUSED,
                (b"retry-after", self.guard.retry_after.encode()),
            )
            return
        self._head_begins()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_timer()
        if self._lingering:
            self._lingering = False
            self.guard.lingering -= 1
        self.guard.gone(self)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            return  # refused: read only to be dropped
        if self._in_head:
            if self._head_deadline == math.inf:
                self._head_begins()  # a next request's first byte
            room = self.guard.max_header_bytes - self._head_bytes
            if len(data) > room:
                # Only the bytes within the limit go to the parser: if the head is not
                # complete with them, it is larger than the limit.
                super().data_received(data[:room])
                if self.transport.is_closing() or self.transport.get_protocol() is not self:
                    return
                if self._in_head:
                    self._refuse(
                        431,
                        "the request line and headers are larger than the limit of"
                        f" {self.guard.max_header_bytes} bytes (max_header_bytes)",
                        HEADER_TOO_LARGE,
                    )
                    return
                data = data[room:]
            else:
                self._head_bytes += len(data)
        super().data_received(data)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_deadline = math.inf
        self.guard.busy(self)
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_head = True
        self._head_bytes = 0

    def on_response_complete(self) -> None:
        # uvicorn's, but for its keep-alive timer: the idle bound here takes its place.
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        self.flow.resume_reading()
        if self.pipeline:
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
            return
        if self._in_head:
            self.guard.idle(self)
            if self._head_deadline == math.inf:  # no next request begun
                self._idle_deadline = self.loop.time() + self.timeout_keep_alive
                self._watch(self._idle_deadline)

    def handle_websocket_upgrade(self) -> None:
        # The WebSocket protocol takes the connection over (and counts in connections),
        # with the transport itself: it joins its writes its own way.
        self._stop_timer()
        self.guard.gone(self)
        writes = cast(TurnWrites, self.transport)
        writes.flush()
        self.transport = writes.raw
        super().handle_websocket_upgrade()

    def _head_begins(self) -> None:
        """A head is on its way (the connection's first, or a next request's): it has
        header_timeout_seconds from now, and the idle bound is over."""
        self._head_deadline = self.loop.time() + self.guard.header_timeout
        self._idle_deadline = math.inf
        self._watch(self._head_deadline)

    def _watch(self, deadline: float) -> None:
        """Have the timer fire by ``deadline``: set again only if it was set for later."""
        if deadline < self._timer_at:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self.loop.call_at(deadline, self._timer_fired)
            self._timer_at = deadline

    def _stop_timer(self) -> None:
        self._head_deadline = self._idle_deadline = math.inf
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self._timer_at = math.inf

    def _timer_fired(self) -> None:
        self._timer = None
        self._timer_at = math.inf
        if self.transport.is_closing():
            return
        now = self.loop.time()
        if self._head_deadline <= now:
            self._head_timed_out()
        elif self._idle_deadline <= now:
            self._idle_deadline = math.inf
            self.transport.close()  # idle past keep_alive_timeout_seconds, as uvicorn does
        elif (deadline := min(self._head_deadline, self._idle_deadline)) < math.inf:
            self._watch(deadline)  # a bound moved later since the timer was set

    def _head_timed_out(self) -> None:
        self._head_deadline = math.inf
        if not self._in_head:
            return
        if self._head_bytes:
            self._refuse(
                408,
                "the request line and headers did not arrive within"
                f" {self.guard.header_timeout:g} seconds (header_timeout_seconds)",
                HEADER_TIMEOUT,
            )
            return
        self.guard.note(HEADER_TIMEOUT)
        self.guard.closing(self)
        self.transport.close()

    def _refuse(self, status: int, detail: str, reason: str, *headers: tuple[bytes, bytes]) -> None:
        """Answer ``status`` and close, reading (and dropping) what the client still sends
        for a moment first, so that it reads the answer rather than a reset."""
        self.guard.note(reason)
        self.guard.closing(self)
        self._stop_timer()
        body = orjson.dumps({"detail": detail})
        head = [
            STATUS_LINE[status],
            b"content-type: application/json\r\n",
            b"content-length: %d\r\n" % len(body),
            b"connection: close\r\n",
            *(b"%s: %s\r\n" % header for header in headers),
            b"\r\n",
        ]
        self.transport.write(b"".join([*head, body]))
        if self.guard.lingering >= MAX_LINGERING or not self.transport.can_write_eof():
            self.transport.close()
            return
        self._lingering = True
        self.guard.lingering += 1
        self.transport.write_eof()
        self.loop.call_later(LINGER_SECONDS, self.transport.close)
