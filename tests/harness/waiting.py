"""Waiting for what happens in the background: in a test's thread, and in a scenario's loop."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest


def eventually(check: Callable[[], bool], within: float = 5.0) -> float:
    """Seconds until check() held; fails the test if it never did."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > within:
            pytest.fail(f"condition not met within {within}s")
        time.sleep(0.05)
    return time.monotonic() - start


async def until(check: Callable[[], bool], within: float = 10.0) -> None:
    """Wait until check() holds, or give up after ``within`` seconds (the asserts then fail)."""
    for _ in range(int(within / 0.05)):
        if check():
            return
        await asyncio.sleep(0.05)
