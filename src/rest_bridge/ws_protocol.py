"""uvicorn's Sans-I/O WebSocket protocol, bounded: what one socket may cost the process.

uvicorn's protocol (websockets-sansio, uvicorn 0.55) leaves these open, each measured on
a bridge with the default settings:

- it answers every ping at once whether the client reads or not, and never stops
  reading for it: 125-byte pings sent back to back by a client that never read took the
  bridge from 83 to 834 MB in 30 s, at 100% CPU;
- it keeps every fragment of a message (websockets counts only their bytes against the
  size limit): a message begun and never finished, continued by empty fragments, grew
  without end and held the event loop;
- it parses all the bytes of a read at once and queues every message in them: a read of
  small frames was handled without a pause, and other sockets waited seconds;
- a close it cannot write (the client reads nothing) waits for good: ``transport.close()``
  flushes first, so the socket, its buffers and its frames stayed open.

GuardedWebSocketProtocol is the same protocol with:

- one message at a time: bytes read are parsed until one message is queued for the app,
  the rest kept unparsed (and the socket not read) until the app takes it; the next
  message is parsed on the loop's next turn, after every other socket's;
- reading stops while the write buffer is above its high-water mark (pongs and answers
  wait for the client to read them), and a socket whose buffer stays there for
  ``ws_write_timeout_seconds`` is dropped (aborted: no close frame could be written);
- at most ``ws_max_fragments`` fragments per message (close 1009 past it);
- at most ``ws_max_control_frames_per_second`` pings and pongs: past it they are dropped
  (a ping unanswered) and the socket is not read until the second is over, so a flood
  of them costs a few parses a second, and no reconnection (closing it would invite
  a flood of handshakes instead);
- every close is followed, ``ws_write_timeout_seconds`` later, by an abort if the socket
  is not gone by then;
- the bytes it holds (read and unparsed, in the parser, queued, handled by the app) are
  counted in the process's budget (rest_bridge.budget), checked before each read.

The app reaches its socket through ``scope["extensions"][SOCKET]``: it says there when
the bytes of a message it took are no longer held (SocketBytes).
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol, cast

from uvicorn.config import Config
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from uvicorn.server import ServerState
from websockets.frames import Frame, Opcode
from websockets.http11 import Request

from rest_bridge.budget import ByteBudget
from rest_bridge.connections import guard_of
from rest_bridge.writes import TurnWrites

SOCKET = "rest_bridge.socket"
"""The scope extension that holds the socket's SocketBytes."""

PONG_HEAD = b"\x8a"
"""The first byte of a pong the server sends (FIN, opcode 0xA, never compressed)."""

FEED_BYTES = 4096
"""Bytes handed to the parser at a time: at most this much is parsed past a message."""

CLOSE_TOO_BIG = 1009

_DATA = frozenset((Opcode.TEXT, Opcode.BINARY, Opcode.CONT))


class SocketBytes(Protocol):
    """What the app tells the socket about the messages it took."""

    def release(self, nbytes: int) -> None:
        """A message's ``nbytes`` (as taken from receive) are no longer held."""


class _AbortingTransport(TurnWrites):
    """The socket's transport, its writes of a loop turn sent together (rest_bridge.writes),
    but a close is an abort when it has not ended in time.

    uvicorn closes the transport in many places; asyncio's close() flushes the write
    buffer first, which a client that reads nothing never lets happen.
    """

    def __init__(self, transport: asyncio.Transport, timeout: float) -> None:
        super().__init__(transport)
        self._timeout = timeout
        self.timer: asyncio.TimerHandle | None = None

    def close(self) -> None:
        super().close()
        if self.timer is None:
            loop = asyncio.get_running_loop()
            self.timer = loop.call_later(self._timeout, self.raw.abort)


class GuardedWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's websockets-sansio protocol, bounded (see the module's docstring)."""

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        guard = guard_of(self.app)
        limits = guard.ws_limits
        self.budget: ByteBudget = guard.budget
        self.max_fragments = limits.ws_max_fragments
        self.max_control = limits.ws_max_control_frames_per_second
        self.write_timeout = limits.ws_write_timeout_seconds
        self.close_timeout = limits.ws_write_timeout_seconds
        self.pending = b""
        """Bytes read and not all parsed yet: those from ``parsed`` on."""
        self.parsed = 0
        self.held = 0
        """Bytes of this socket counted in the budget."""
        self.queued = 0
        """Of those, the bytes (characters of a text) of messages queued for the app."""
        self.taken = 0
        """Of those, the bytes of messages the app has taken and not released."""
        self.fragments = 0
        self.control = 0
        self.control_second = 0.0
        self.write_timer: asyncio.TimerHandle | None = None
        self.feeding: asyncio.Handle | None = None
        self.throttle: asyncio.TimerHandle | None = None
        """Set while the socket is not read, past its control frames for the second."""
        self.reading = True

    # --- the transport ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        wrapped = _AbortingTransport(cast(asyncio.Transport, transport), self.close_timeout)
        super().connection_made(cast(asyncio.Transport, wrapped))

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)  # (it closes the transport: the abort timer is set)
        wrapped = cast(_AbortingTransport, self.transport)
        self._cancel(wrapped.timer, self.write_timer, self.feeding, self.throttle)
        self.budget.forget(self._wake)
        self.pending, self.parsed = b"", 0
        self.frames = []
        self._recount()  # what the app still holds stays counted until it releases it

    def pause_writing(self) -> None:
        super().pause_writing()
        if self.write_timer is None:
            self.write_timer = self.loop.call_later(self.write_timeout, self._write_timed_out)
        self._set_reading()

    def resume_writing(self) -> None:
        super().resume_writing()
        self._cancel(self.write_timer)
        self.write_timer = None
        self._set_reading()

    def _write_timed_out(self) -> None:
        self.write_timer = None
        self.logger.info("WebSocket dropped: its client read nothing for %g s", self.write_timeout)
        self.transport.abort()

    # --- reading ----------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        # (Not read while bytes are pending: only a read's worth is ever pending.)
        self.pending = self.pending[self.parsed :] + data if self.pending else data
        self.parsed = 0
        self._feed()

    def _feed(self) -> None:
        """Parse pending bytes until a message waits for the app (or none are left)."""
        self.feeding = None
        while self.pending and self.queue.empty() and self._may_parse():
            start, self.parsed = self.parsed, self.parsed + FEED_BYTES
            piece = self.pending[start : self.parsed]
            if self.parsed >= len(self.pending):
                self.pending, self.parsed = b"", 0
            super().data_received(piece)
        if self.transport.is_closing():
            self.pending, self.parsed = b"", 0
        self._recount()
        self._set_reading()

    def _may_parse(self) -> bool:
        """Whether the next message may be parsed: it becomes the app's, held as text, as
        JSON, as protobuf, so the budget is asked as for a read (with what the app holds
        of this socket as its own: one frame in flight at a time always goes through)."""
        if self.throttle is not None or self.transport.is_closing():
            return False
        if self.budget.may_read(self.taken):
            return True
        self.budget.wait(self._wake)
        return False

    def _recount(self) -> None:
        """Count what the socket holds now in the budget."""
        held = self.queued + self.taken
        if not self.disconnected:  # (once it is, the parser's bytes are garbage)
            held += len(self.pending) + len(self.conn.reader.buffer)  # (all of it is held)
            if self.frames:
                held += sum(map(len, self.frames))
        if held > self.held:
            self.budget.take(held - self.held)
        elif held < self.held:
            self.budget.give(self.held - held)
        self.held = held

    def _set_reading(self) -> None:
        """Read the socket only when nothing waits for the app, the client reads its answers
        and the budget (or the socket's own share of it) has room."""
        if self.disconnected:
            return
        wanted = not self.pending and self.queue.empty() and self.writable.is_set()
        wanted = wanted and self.throttle is None
        if wanted and not self.budget.may_read(self.held):
            self.budget.wait(self._wake)
            wanted = False
        if wanted != self.reading:
            self.reading = wanted
            if wanted:
                self.transport.resume_reading()
            else:
                self.transport.pause_reading()

    def _wake(self) -> None:
        if self.pending and self.queue.empty() and self.feeding is None:
            self._feed()
        else:
            self._set_reading()

    async def receive(self) -> Any:
        message = await self.queue.get()
        if message["type"] == "websocket.receive":
            size = len(message.get("text") or message.get("bytes") or "")
            self.queued -= size
            self.taken += size
        if self.queue.empty() and self.pending and self.feeding is None:
            # The next message is parsed on the loop's next turn: other sockets first.
            self.feeding = self.loop.call_soon(self._feed)
        self._recount()
        self._set_reading()
        return message

    def release(self, nbytes: int) -> None:
        """SocketBytes.release: the app is done with a message's bytes."""
        self.taken -= nbytes
        self._recount()
        self._set_reading()

    def handle_connect(self, event: Any) -> None:
        super().handle_connect(event)
        if self.handshake_initiated and hasattr(self, "scope"):
            extensions = cast(dict[str, Any], self.scope["extensions"])
            extensions[SOCKET] = self

    def send_receive_event_to_app(self) -> None:
        # uvicorn's, but that reading is _set_reading's alone (uvicorn pauses the socket
        # here and resumes it in receive()).
        self.fragments = 0
        data = self.frames[0] if len(self.frames) == 1 else b"".join(self.frames)
        self.frames = []
        if self.close_sent:  # the peer's close reply is still read; messages are dropped
            return
        if self.curr_msg_data_type == "text":
            text = data.decode()  # websockets has checked the UTF-8
            self.queued += len(text)
            self.queue.put_nowait({"type": "websocket.receive", "text": text})
        else:
            self.queued += len(data)
            self.queue.put_nowait({"type": "websocket.receive", "bytes": data})

    # --- what a client may send ---------------------------------------------------------

    def handle_text(self, event: Frame) -> None:
        self.fragments = 1
        super().handle_text(event)

    def handle_bytes(self, event: Frame) -> None:
        self.fragments = 1
        super().handle_bytes(event)

    def handle_cont(self, event: Frame) -> None:
        self.fragments += 1
        if self.fragments > self.max_fragments:
            limit = self.max_fragments
            self._fail(CLOSE_TOO_BIG, f"a message in more than {limit} frames (ws_max_fragments)")
            return
        super().handle_cont(event)

    def handle_events(self) -> None:
        events = self.conn.events_received()
        # websockets queued a pong for each ping as it parsed it (and a close's echo,
        # always last): only the pongs of the pings within the cap are sent.
        replies = self.conn.data_to_send()
        data = [e for e in events if isinstance(e, Frame) and e.opcode in _DATA]
        if not replies and len(data) == len(events):
            for frame in data:  # the usual read: messages only, nothing to count or answer
                if frame.opcode is Opcode.TEXT:
                    self.handle_text(frame)
                elif frame.opcode is Opcode.BINARY:
                    self.handle_bytes(frame)
                else:
                    self.handle_cont(frame)
            return
        pongs = iter([r for r in replies if r[:1] == PONG_HEAD])
        out: list[bytes] = []
        handled: list[Request | Frame] = []
        for event in events:
            if isinstance(event, Frame) and event.opcode in (Opcode.PING, Opcode.PONG):
                allowed = self._control_frame()
                if event.opcode is Opcode.PING:
                    pong = next(pongs, b"")
                    if allowed:
                        out.append(pong)
                    continue
                if not allowed:
                    continue
            if isinstance(event, Request | Frame):  # (a server receives no Response)
                handled.append(event)
        out += [r for r in replies if r[:1] != PONG_HEAD]
        if out:
            self.transport.write(b"".join(out))
        for event in handled:  # as uvicorn's handle_events, but for pings (answered above)
            if isinstance(event, Request):
                self.handle_connect(event)
            elif event.opcode is Opcode.PONG:
                self.handle_pong(event)
            elif event.opcode is Opcode.CONT:
                self.handle_cont(event)
            elif event.opcode is Opcode.TEXT:
                self.handle_text(event)
            elif event.opcode is Opcode.BINARY:
                self.handle_bytes(event)
            elif event.opcode is Opcode.CLOSE:
                self.handle_close(event)

    def _control_frame(self) -> bool:
        """Count a ping or pong; False past the limit: it is dropped (a ping's pong with it),
        and no more is parsed or read before the second is over."""
        now = self.loop.time()
        if now - self.control_second >= 1.0:
            self.control_second, self.control = now, 0
        self.control += 1
        if self.control <= self.max_control:
            return True
        if self.throttle is None:
            due = self.control_second + 1.0
            self.throttle = self.loop.call_at(due, self._unthrottle)
        return False

    def _unthrottle(self) -> None:
        self.throttle = None
        self._feed()

    def _fail(self, code: int, reason: str) -> None:
        """Close the socket for what the client sent (the app is told, as for a 1009)."""
        if self.close_sent or self.transport.is_closing():
            return
        self.conn.fail(code, reason)
        self.transport.write(b"".join(self.conn.data_to_send()))
        self.queue.put_nowait({"type": "websocket.disconnect", "code": code, "reason": reason})
        self.close_sent = True
        self.frames = []
        self.transport.close()

    @staticmethod
    def _cancel(*handles: asyncio.Handle | None) -> None:
        for handle in handles:
            if handle is not None:
                handle.cancel()
