"""A connection's writes of one event-loop turn sent together: one system call, not one each.

A response is written as its head, then its body (uvicorn's HTTP cycle); the answers to the
frames a gathered call carried come in one turn (rest_bridge.ws). Each ``write`` on a
socket transport tries a ``send`` at once: on loopback a second send of a small response
cost the bridge ~1.5 µs, and the peer a second wake-up. Here writes are held until the
end of the turn they were made in (``call_soon``), then written as one; whatever closes,
ends or hands over the transport writes what is held first. At most one turn's writes
are held.
"""

from __future__ import annotations

import asyncio
from typing import Any


class TurnWrites:
    """``transport``, its writes of a loop turn joined (every other method its own)."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self.raw = transport
        self._held: list[bytes] = []
        self._loop = asyncio.get_running_loop()
        self._ended = False
        """write_eof was called: later writes (pipelined answers after a refusal that
        ended the connection) are dropped, as a closing transport drops them."""

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self._held:
            self._loop.call_soon(self.flush)
        self._held.append(bytes(data))

    def write_whole(self, data: bytes) -> None:
        """Write ``data``, a whole response, at once when nothing of this turn is held
        (there is nothing to join it with: a call_soon less), else after what is."""
        if self._held:
            self._held.append(data)
        elif not self._ended and not self.raw.is_closing():
            self.raw.write(data)

    def writelines(self, data: Any) -> None:
        self.write(b"".join(data))

    def flush(self) -> None:
        """Write what is held now."""
        held, self._held = self._held, []
        if held and not self._ended and not self.raw.is_closing():
            self.raw.write(held[0] if len(held) == 1 else b"".join(held))

    def write_eof(self) -> None:
        self.flush()
        self._ended = True
        self.raw.write_eof()

    def close(self) -> None:
        self.flush()
        self.raw.close()

    def abort(self) -> None:
        self._held = []
        self.raw.abort()

    def __getattr__(self, name: str) -> Any:
        value = getattr(self.raw, name)
        if callable(value):  # kept: is_closing, pause_reading... are called for every request
            setattr(self, name, value)
        return value
