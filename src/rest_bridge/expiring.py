"""Answers the bridge got from the server, kept for a while and bounded in number."""

from __future__ import annotations

import time
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class Expiring(Generic[K, V]):
    """Each value kept ``seconds`` from when it was put; at most ``limit`` of them: past it
    they all start over (what fills it is callers in use, or a flood of made-up ones, and
    either way the server is asked again)."""

    def __init__(self, seconds: float, limit: int) -> None:
        self._seconds = seconds
        self._limit = limit
        self._kept: dict[K, tuple[float, V]] = {}

    def get(self, key: K) -> V | None:
        """The value kept for ``key``, or None when there is none or it has expired."""
        kept = self._kept.get(key)
        if kept is None or kept[0] <= time.monotonic():
            return None
        return kept[1]

    def put(self, key: K, value: V) -> None:
        if len(self._kept) >= self._limit:
            self._kept.clear()
        self._kept[key] = (time.monotonic() + self._seconds, value)

    def __len__(self) -> int:
        return len(self._kept)
