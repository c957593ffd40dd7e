"""FairTurns: a bounded number of calls worked on at once, handed out round robin."""

from __future__ import annotations

import asyncio

import pytest

from events_server.server.errors import StoreUnavailable
from events_server.server.limits import FairTurns


def test_a_light_caller_is_served_before_a_floods_backlog() -> None:
    async def scenario() -> list[str]:
        turns = FairTurns(capacity=2, per_caller=2)
        order: list[str] = []
        release = asyncio.Event()
        deadline = asyncio.get_running_loop().time() + 5

        async def call(caller: str, n: int) -> None:
            async with turns.turn(caller, deadline):
                order.append(f"{caller}{n}")
                await release.wait()

        flood = [asyncio.create_task(call("flood", n)) for n in range(10)]
        await asyncio.sleep(0)  # two flood calls hold both turns, eight wait
        light = asyncio.create_task(call("light", 0))
        await asyncio.sleep(0)
        release.set()
        await asyncio.gather(light, *flood)
        return order

    order = asyncio.run(scenario())
    assert order[:2] == ["flood0", "flood1"]
    # The first turn that frees up goes to the light caller, ahead of eight flood calls.
    assert order.index("light0") == 2


def test_one_caller_holds_at_most_its_share() -> None:
    async def scenario() -> int:
        turns = FairTurns(capacity=8, per_caller=3)
        busy = 0
        most = 0
        deadline = asyncio.get_running_loop().time() + 5

        async def call() -> None:
            nonlocal busy, most
            async with turns.turn("flood", deadline):
                busy += 1
                most = max(most, busy)
                await asyncio.sleep(0.001)
                busy -= 1

        await asyncio.gather(*(call() for _ in range(20)))
        return most

    assert asyncio.run(scenario()) == 3


def test_a_turn_that_never_comes_is_unavailable_and_leaves_no_trace() -> None:
    async def scenario() -> None:
        turns = FairTurns(capacity=1, per_caller=1)
        loop = asyncio.get_running_loop()
        async with turns.turn("a", loop.time() + 5):
            with pytest.raises(StoreUnavailable, match="no turn came"):
                async with turns.turn("b", loop.time() + 0.05):
                    pass
        # Both released: a new caller gets its turn at once.
        async with turns.turn("c", loop.time() + 0.05):
            pass

    asyncio.run(scenario())
