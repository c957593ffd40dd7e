"""What a consumer hands out: a message, and the delivery that tracks how its handling ended."""

from __future__ import annotations

import asyncio
import enum
import os
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from events_server.pb import events_pb2 as pb


@dataclass(frozen=True, slots=True)
class Message:
    """One queued envelope, as handed to the handler."""

    partition: int
    entry_id: str
    envelope: pb.Envelope
    deliveries: int
    """1 the first time; more when the entry is handed out again (after a failure or crash)."""


Handler = Callable[[Message], Awaitable[None]]


class Outcome(enum.Enum):
    HANDLED = "handled"
    FAILED = "failed"  # the handler raised: retry, then dead-letter
    ABANDONED = "abandoned"  # the consumer stopped first: leave it pending


class Delivery:
    """A message on its way to the handler, and how it ended."""

    __slots__ = ("error", "message", "outcome")

    def __init__(self, message: Message) -> None:
        self.message = message
        self.outcome: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self.error = ""

    def settle(self, outcome: Outcome, error: str = "") -> None:
        if not self.outcome.done():
            self.error = error
            self.outcome.set_result(outcome)


def default_name() -> str:
    """host-pid: unique among live processes."""
    return f"{socket.gethostname()}-{os.getpid()}"
