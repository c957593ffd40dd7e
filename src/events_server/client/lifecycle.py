"""``with`` / ``async with`` for everything the client hands out: leaving the block closes it."""

from __future__ import annotations

from types import TracebackType
from typing import Self


class Closing:
    """``with x:`` ... ``x.close()`` on the way out."""

    def close(self) -> None:
        """Release what it holds."""
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class AsyncClosing:
    """``async with x:`` ... ``await x.close()`` on the way out."""

    async def close(self) -> None:
        """Release what it holds."""
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
