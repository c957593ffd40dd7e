"""The bytes one bridge process holds for its clients, bounded as a whole.

Each bound of a connection (a frame's size, frames in flight, a body's size) is small,
but the caps on connections multiply them: 3,072 WebSockets with 16 frames of 64 KiB in
flight each held 3.7-4.3x those bytes (1,024 sockets: 3.7 GB), as a frame is held as
read, as text, as parsed JSON, as protobuf. So the bytes a process holds for data it
has read and not answered yet (frames: rest_bridge.ws_protocol; request bodies:
rest_bridge.http_budget) are counted here, and a connection reads more only while
the sum is within ``max_bytes_in_flight``, or while it holds less than its own share
(``ByteBudget.share``): one frame or one small body at a time always goes through, so
a legitimate client is slowed by a flood at most by the time the process takes to work
its backlog off, never refused.

What the process then holds is at most the budget plus each open connection's share and
one read (the loop reads up to 256 KiB at a time): ``max_connections`` times the share
is checked at start-up to stay within the budget (rest_bridge.config).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class ByteBudget:
    """Bytes held for data read and not yet answered, summed over a process's connections."""

    def __init__(self, limit: int, share: int) -> None:
        self.limit = limit
        self.share = share
        """What a connection may always hold, the budget spent or not."""
        self.held = 0
        self._waiting: dict[Callable[[], None], None] = {}

    def may_read(self, own: int) -> bool:
        """Whether a connection that holds ``own`` bytes may read more now."""
        return own < self.share or self.held < self.limit

    def take(self, nbytes: int) -> None:
        """Count ``nbytes`` more held."""
        self.held += nbytes

    def give(self, nbytes: int) -> None:
        """``nbytes`` are no longer held: connections waiting for room read again."""
        self.held -= nbytes
        if self._waiting and self.held < self.limit:
            # Every waiter is woken: each checks again, and reads at most one chunk.
            waiting, self._waiting = self._waiting, {}
            loop = asyncio.get_running_loop()
            for wake in waiting:
                loop.call_soon(wake)

    def wait(self, wake: Callable[[], None]) -> None:
        """Call ``wake`` (soon) once there is room again."""
        self._waiting[wake] = None

    def forget(self, wake: Callable[[], None]) -> None:
        """``wake``'s connection is gone: it waits no more."""
        self._waiting.pop(wake, None)
