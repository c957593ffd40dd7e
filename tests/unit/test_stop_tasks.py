"""Stopping the server's background tasks: one that takes its cancellation for a timeout
(Python 3.11's asyncio.timeout, when both come in one turn) and goes on is stopped too."""

from __future__ import annotations

import asyncio
import time

from events_server.server.app import stop_tasks


def test_a_task_that_swallows_its_cancellation_is_cancelled_again() -> None:
    rounds: list[str] = []

    async def stubborn() -> None:
        swallowed = False
        while True:
            try:
                await asyncio.sleep(0.01)
                rounds.append("probe")
            except asyncio.CancelledError:
                if swallowed:
                    raise
                swallowed = True  # taken for a timeout once: the loop goes on
                rounds.append("swallowed")

    async def polite() -> None:
        await asyncio.sleep(3600)

    async def main() -> float:
        tasks = [asyncio.create_task(stubborn()), asyncio.create_task(polite())]
        await asyncio.sleep(0.05)
        started = time.monotonic()
        await stop_tasks(tasks)
        assert all(task.cancelled() for task in tasks)
        return time.monotonic() - started

    took = asyncio.run(main())
    assert "swallowed" in rounds
    assert took < 5  # one more round of TASK_STOP_SECONDS, not for good
