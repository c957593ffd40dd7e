"""What a consumer hands out: a message, and the delivery that tracks how its handling ended."""

from __future__ import annotations

import asyncio
import enum
import os
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from events_server.pb import events_pb2 as pb
from events_server.wire.tracked import (
    EVENT,
    PRODUCT_UNAVAILABLE,
    PURCHASE,
    TRANSACTION_MAPPING,
    TrackedKind,
    envelope_kind,
)


@dataclass(frozen=True, slots=True)
class Message:
    """One queued envelope, as handed to the handler.

    ``kind`` says what it holds: ``event`` (a CreateEvents event: ``message.event``) or one
    of Depict's v2 kinds (Track): ``purchase``, ``transaction_mapping`` or
    ``product_unavailable``, each with its typed accessor (None when it holds another)::

        if message.kind == "purchase":
            order = message.purchase  # pb.Purchase
    """

    partition: int
    entry_id: str
    envelope: pb.Envelope
    deliveries: int
    """1 the first time; more when the entry is handed out again (after a failure or crash)."""

    @property
    def kind(self) -> str:
        """``event``, ``purchase``, ``transaction_mapping`` or ``product_unavailable``."""
        return envelope_kind(self.envelope)

    @property
    def event(self) -> pb.Event | None:
        """The CreateEvents event, when it holds one."""
        return self.envelope.event if self.kind == EVENT else None

    @property
    def purchase(self) -> pb.Purchase | None:
        """The purchase, when it holds one."""
        envelope = self.envelope
        return envelope.purchase if envelope.HasField(PURCHASE) else None

    @property
    def transaction_mapping(self) -> pb.TransactionMapping | None:
        """The transaction mapping, when it holds one."""
        envelope = self.envelope
        return envelope.transaction_mapping if envelope.HasField(TRANSACTION_MAPPING) else None

    @property
    def product_unavailable(self) -> pb.ProductUnavailable | None:
        """The unavailable product report, when it holds one."""
        envelope = self.envelope
        return envelope.product_unavailable if envelope.HasField(PRODUCT_UNAVAILABLE) else None

    @property
    def tenant(self) -> str:
        """The tenant of what it holds, whichever kind."""
        kind = self.kind
        held: pb.Event | TrackedKind = getattr(self.envelope, kind)
        return held.tenant


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
