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

from events_server.ops.allowances import Allowances


class UnknownKeyBudget(Allowances):
    """Unknown keys per client address: ``per_second``, in bursts of as many (0: no limit).

    ``allows(peer)``: whether ``peer`` may still have an uncached key looked up in Redis;
    ``spend(peer)``: it tried a key that is not in force.
    """

    def __init__(self, per_second: float) -> None:
        super().__init__(per_second, per_second)
