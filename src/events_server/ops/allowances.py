"""Per-name allowances in one process: a token bucket for each name, refilled over time.

For what must stay cheap and local (asking Redis would be the cost they exist to avoid): the
unknown keys one client address may have looked up (events_server.server.strangers), the
rejected-request records one caller may write (events_server.server.rejected, and the
bridge's reports of them, rest_bridge.rejected). A flood spread over processes is still
bounded per process.
"""

from __future__ import annotations

import time

NAMES_LIMIT = 10_000
"""Names tracked per process; past it the table starts over (a flood of names)."""


class Allowances:
    """``per_second`` for each name, in bursts of ``burst`` (a rate of 0: no limit)."""

    def __init__(self, per_second: float, burst: float) -> None:
        self._rate = per_second
        self._burst = max(burst, 1.0)
        # name -> (tokens left, when counted)
        self._names: dict[str, tuple[float, float]] = {}

    def allows(self, name: str) -> bool:
        """Whether ``name`` has one left."""
        if self._rate <= 0:
            return True
        return self._tokens(name, time.monotonic()) >= 1.0

    def spend(self, name: str) -> None:
        """Take one from ``name``'s allowance (none left: it stays empty)."""
        if self._rate <= 0:
            return
        now = time.monotonic()
        if name not in self._names and len(self._names) >= NAMES_LIMIT:
            self._names.clear()
        self._names[name] = (max(self._tokens(name, now) - 1.0, 0.0), now)

    def take(self, name: str) -> bool:
        """Spend one of ``name``'s if it has one left; whether it had."""
        if not self.allows(name):
            return False
        self.spend(name)
        return True

    def _tokens(self, name: str, now: float) -> float:
        tokens, counted = self._names.get(name, (self._burst, now))
        return min(self._burst, tokens + (now - counted) * self._rate)
