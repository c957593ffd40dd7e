"""How many unknown API keys one client address may try: a per-process token bucket.

The negative cache makes a made-up key cost one Redis lookup the first time only; a flood
of a new made-up key per call would still cost one each, for every caller's Redis. Past
its allowance, a client address's keys never found by this process are refused as
unknown without asking Redis, in the same words as any unknown key, so the flood learns
nothing and costs this process microseconds. A key found before (its cached answer
expired or not) is still looked up as usual: the flood's address may be a NAT or a proxy
that real clients share, and their keys must keep working (a refused key closes Depict's
WebSocket for good). Local, not shared through Redis: asking Redis
would be the cost this exists to avoid, and a flood spread over processes is still
bounded per process.
"""

from __future__ import annotations

import time

PEERS_LIMIT = 10_000
"""Addresses tracked per process; past it the table starts over (a flood of addresses)."""


class UnknownKeyBudget:
    """Unknown keys per client address: ``per_second``, in bursts of as many (0: no limit)."""

    def __init__(self, per_second: float) -> None:
        self._rate = per_second
        self._burst = max(per_second, 1.0)
        # address -> (tokens left, when counted)
        self._peers: dict[str, tuple[float, float]] = {}

    def allows(self, peer: str) -> bool:
        """Whether ``peer`` may still have an uncached key looked up in Redis."""
        if self._rate <= 0:
            return True
        return self._tokens(peer, time.monotonic()) >= 1.0

    def spend(self, peer: str) -> None:
        """``peer`` tried a key that is not in force: take one from its allowance."""
        if self._rate <= 0:
            return
        now = time.monotonic()
        if peer not in self._peers and len(self._peers) >= PEERS_LIMIT:
            self._peers.clear()
        self._peers[peer] = (max(self._tokens(peer, now) - 1.0, 0.0), now)

    def _tokens(self, peer: str, now: float) -> float:
        tokens, counted = self._peers.get(peer, (self._burst, now))
        return min(self._burst, tokens + (now - counted) * self._rate)
