"""What a write waits for before it is acknowledged: replicas (WAIT), the AOF fsync (WAITAOF).

One confirmation follows a node's scripts in the same pipeline, on the same connection:
WAIT and WAITAOF wait for the earlier writes of their own connection only (inside a
script they would not block, and redis-py's cluster ``wait()`` goes to some other node).
A reply short of what is required means the outcome is unknown: the events may be
stored, or may be lost with the primary. The write is refused as retryable, and the
client's retry is deduplicated; a dedup hit writes the partition's barrier key (see
server/script.py), so the retry's confirmation covers the first copy as well.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from redis.exceptions import ResponseError

from events_server.server.errors import StoreUnavailable

log = logging.getLogger(__name__)

MARGIN = 0.1
"""How much sooner than the write's own deadline WAIT gives up (a share of the time left,
at least MIN_MARGIN_MS): its short reply is then read and counted, rather than the
connection dropped unread, also on a busy host."""
MIN_MARGIN_MS = 100

RETRY_SAFE = "the events may or may not be stored; retrying with the same deduplication_ids is safe"


class Confirmation:
    """The confirmation a write needs, and the judge of its reply (by node, for the log)."""

    def __init__(
        self,
        replicas: int,
        fsync: bool,
        *,
        timeout_seconds: float,
        on_unconfirmed: Callable[[str], None] | None = None,
    ) -> None:
        self.replicas = replicas
        self.fsync = fsync
        self._timeout = timeout_seconds
        self._on_unconfirmed = on_unconfirmed
        self._failing: set[str] = set()

    @property
    def wanted(self) -> bool:
        """Whether writes wait for anything past the primary's memory."""
        return self.fsync or self.replicas > 0

    def command(self, deadline: float | None = None) -> tuple[Any, ...] | None:
        """The command confirming the writes sent before it on its connection, ending in
        time for the write's ``deadline`` (loop time); None when nothing is to be waited for."""
        if not self.wanted:
            return None
        remaining = self._timeout
        if deadline is not None:
            remaining = min(remaining, deadline - asyncio.get_running_loop().time())
        left_ms = remaining * 1000
        # 0 would mean "wait for ever".
        ms = max(1, int(left_ms - max(MIN_MARGIN_MS, left_ms * MARGIN)))
        if self.fsync:
            return (b"WAITAOF", 1, self.replicas, ms)
        return (b"WAIT", self.replicas, ms)

    def check(self, node: str, reply: Any) -> StoreUnavailable | None:
        """The refusal of a write whose confirmation ``reply`` from ``node`` falls short
        (counted, and logged when the node starts falling short), or None."""
        why = self._shortfall(reply)
        if why is None:
            if node in self._failing:
                self._failing.discard(node)
                log.info("redis %s confirms writes again", node)
            return None
        if self._on_unconfirmed is not None:
            self._on_unconfirmed(node)
        if node not in self._failing:
            self._failing.add(node)
            log.warning("redis %s: %s (further ones are counted, not logged)", node, why)
        return StoreUnavailable(why)

    def _shortfall(self, reply: Any) -> str | None:
        if isinstance(reply, ResponseError):
            return f"redis could not confirm the write ({reply}); {RETRY_SAFE}"
        if isinstance(reply, Exception):
            return f"redis could not confirm the write ({type(reply).__name__}); {RETRY_SAFE}"
        if self.fsync:
            local, replicas = (int(reply[0]), int(reply[1])) if reply else (0, 0)
            if local < 1:
                return (
                    "redis did not confirm the write is on disk in time (durability=fsync);"
                    f" {RETRY_SAFE}"
                )
            if replicas < self.replicas:
                return (
                    f"redis confirmed the write on the disk of {replicas} of the"
                    f" {self.replicas} replicas required (EVENTS_CONFIRM_REPLICAS,"
                    f" durability=fsync) in time; {RETRY_SAFE}"
                )
            return None
        if int(reply) < self.replicas:
            return (
                f"redis confirmed the write on {int(reply)} of the {self.replicas} replicas"
                f" required (EVENTS_CONFIRM_REPLICAS) in time; {RETRY_SAFE}"
            )
        return None
