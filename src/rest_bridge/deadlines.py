"""Each request's own deadline while the gathered call that carries it is out.

A gathered call (rest_bridge.gather) lasts as long as its freshest request may, so that an
old request never cuts the time of the fresh ones gathered with it short; an old one is
failed alone (DEADLINE_EXCEEDED) once its own deadline passes, as its own call would have
been. One timer at a time for the whole call: a timer each would cost a busy bridge
hundreds of them per call.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, Protocol

import grpc


class Waiter(Protocol):
    """A request waiting for its answer: until when, and where the answer goes."""

    deadline: float
    future: asyncio.Future[Any]


class CallDeadlines:
    """The deadlines of a call's requests that come before the call's own (``latest``)."""

    def __init__(self, batch: Sequence[Waiter], latest: float) -> None:
        self._batch = batch
        self._latest = latest
        self._timer: asyncio.TimerHandle | None = None
        self._arm(min(p.deadline for p in batch))

    def _arm(self, when: float) -> None:
        if when < self._latest:
            self._timer = asyncio.get_running_loop().call_at(when, self._expire)

    def _expire(self) -> None:
        now = asyncio.get_running_loop().time()
        after = self._latest
        for waiter in self._batch:
            if waiter.future.done():
                continue
            if waiter.deadline <= now:
                waiter.future.set_exception(
                    grpc.aio.AioRpcError(
                        grpc.StatusCode.DEADLINE_EXCEEDED, details="Deadline Exceeded"
                    )
                )
            else:
                after = min(after, waiter.deadline)
        self._arm(after)

    def cancel(self) -> None:
        """The call has ended: its answer (or its failure) is each request's."""
        if self._timer is not None:
            self._timer.cancel()
