"""``Batcher``: single events gathered into calls, each with a future of its result."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Generic, Protocol, TypeVar

from events_server.client.errors import InvalidEventsError
from events_server.client.lifecycle import AsyncClosing
from events_server.client.options import EventLike, TrackedLike, tracked_copy, with_dedup_id
from events_server.pb import events_pb2 as pb
from events_server.wire.codec import fill_event
from events_server.wire.track_validation import tracked_violations
from events_server.wire.validation import event_violations
from events_server.wire.violations import FieldViolation

log = logging.getLogger("events_server.client")


class Sender(Protocol):
    """What a Batcher sends through (an EventsClient)."""

    async def send_request(
        self, request: pb.CreateEventsRequest, *, deadline_seconds: float | None = None
    ) -> pb.CreateEventsResponse: ...

    async def send_track_request(
        self, request: pb.TrackRequest, *, deadline_seconds: float | None = None
    ) -> pb.CreateEventsResponse: ...


Queued = TypeVar("Queued", pb.Event, pb.TrackedEvent)
Batch = list[tuple[Queued, "asyncio.Future[pb.EventResult]"]]
"""Events of one batch, each with the future of its result."""


class _Lane(Generic[Queued]):
    """The events waiting for one method's next call (CreateEvents or Track)."""

    __slots__ = ("call", "pending", "timer")

    def __init__(self, call: Callable[[list[Queued]], Awaitable[pb.CreateEventsResponse]]) -> None:
        self.call: Callable[[list[Queued]], Awaitable[pb.CreateEventsResponse]] = call
        self.pending: Batch[Queued] = []
        self.timer: asyncio.TimerHandle | None = None


class Batcher(AsyncClosing):
    """Sends events in batches: once ``max_events`` wait, or ``max_delay_seconds`` after the first.

    ``add`` (a CreateEvents event) and ``track`` (one of Depict's v2 kinds) check an event
    at once (a bad one raises there, and never sinks the batch it would have joined) and
    return a future of its result; each kind goes in batches of its own. Events the server
    refuses for its own limits (sizes these checks cannot know) fail alone and the rest of
    their batch is sent again. A batch that fails otherwise sets the error on each of its
    futures and is logged. ``close`` sends what is left and waits for every batch.
    """

    def __init__(
        self, client: Sender, *, max_events: int, max_delay_seconds: float, max_in_flight: int
    ) -> None:
        if max_events < 1 or max_delay_seconds < 0 or max_in_flight < 1:
            raise ValueError("need max_events >= 1, max_delay_seconds >= 0, max_in_flight >= 1")
        self._max_events = max_events
        self._max_delay = max_delay_seconds
        self._max_in_flight = max_in_flight
        self._events = _Lane[pb.Event](
            lambda events: client.send_request(pb.CreateEventsRequest(events=events))
        )
        self._tracked = _Lane[pb.TrackedEvent](
            lambda events: client.send_track_request(pb.TrackRequest(events=events))
        )
        self._in_flight: set[asyncio.Task[None]] = set()
        self._closed = False

    async def add(self, event: EventLike) -> asyncio.Future[pb.EventResult]:
        """Queue one event for the next batch; waits while ``max_in_flight`` batches are sending."""
        message = pb.Event()
        if isinstance(event, pb.Event):
            message.CopyFrom(event)
            found = _as_one(event_violations(0, message))
        else:
            found = fill_event(message, "event", event)
        return await self._queue(self._events, with_dedup_id(message), found)

    async def track(self, event: TrackedLike) -> asyncio.Future[pb.EventResult]:
        """Queue one v2 event (a TrackedEvent, Purchase, TransactionMapping or
        ProductUnavailable) for the next Track batch; as ``add``."""
        message = tracked_copy(event, "event")
        return await self._queue(self._tracked, message, _as_one(tracked_violations(0, message)))

    async def _queue(
        self, lane: _Lane[Queued], message: Queued, found: list[FieldViolation]
    ) -> asyncio.Future[pb.EventResult]:
        if self._closed:
            raise RuntimeError("the batcher is closed")
        if found:
            raise InvalidEventsError(f"invalid event: {found[0].field}", found, None)
        while len(self._in_flight) >= self._max_in_flight:
            await asyncio.wait(self._in_flight, return_when=asyncio.FIRST_COMPLETED)
        future: asyncio.Future[pb.EventResult] = asyncio.get_running_loop().create_future()
        lane.pending.append((message, future))
        if len(lane.pending) >= self._max_events:
            self._send_pending(lane)
        elif lane.timer is None:
            lane.timer = asyncio.get_running_loop().call_later(
                self._max_delay, self._send_pending, lane
            )
        return future

    async def flush(self) -> None:
        """Send what is waiting now, and wait until every batch has been answered."""
        self._send_pending(self._events)
        self._send_pending(self._tracked)
        while self._in_flight:
            await asyncio.wait(self._in_flight)

    async def close(self) -> None:
        """Refuse new events, send the rest, wait for every batch."""
        self._closed = True
        await self.flush()

    def _send_pending(self, lane: _Lane[Queued]) -> None:
        if lane.timer is not None:
            lane.timer.cancel()
            lane.timer = None
        if not lane.pending:
            return
        batch, lane.pending = lane.pending, []
        task = asyncio.get_running_loop().create_task(self._send(lane, batch))
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)

    async def _send(self, lane: _Lane[Queued], batch: Batch[Queued]) -> None:
        try:
            reply = await lane.call([event for event, _ in batch])
        except InvalidEventsError as error:
            if (rest := _without_refused(batch, error)) is None:
                self._fail(batch, error)
            else:
                # Only the server knows its size limits (add() cannot check them): the
                # events it named fail alone, and the rest of the batch goes again.
                await self._send(lane, rest)
            return
        except Exception as error:
            self._fail(batch, error)
            return
        for (_, future), result in zip(batch, reply.results, strict=True):
            if not future.done():
                future.set_result(result)

    @staticmethod
    def _fail(batch: Batch[Queued], error: Exception) -> None:
        log.error("batch of %d events failed: %s", len(batch), error)
        for _, future in batch:
            if not future.done():
                future.set_exception(error)
                # Logged above: asyncio need not warn again about unawaited futures.
                future.add_done_callback(lambda f: f.exception())


_EVENT_INDEX = re.compile(r"^events\[(\d+)\]")


def _as_one(found: list[FieldViolation]) -> list[FieldViolation]:
    """Violations of a lone event (checked as ``events[0]``), named from ``event``."""
    return [
        FieldViolation(_EVENT_INDEX.sub("event", v.field, 1), v.description, v.reason)
        for v in found
    ]


def _without_refused(batch: Batch[Queued], error: InvalidEventsError) -> Batch[Queued] | None:
    """Fail the events the server named; the others, to send again (None: cannot split)."""
    named: dict[int, list[FieldViolation]] = {}
    for violation in error.violations:
        match = _EVENT_INDEX.match(violation.field)
        if match is None or int(match[1]) >= len(batch):
            return None  # about the whole request (too many events): nothing to split
        named.setdefault(int(match[1]), []).append(violation)
    if not named or len(named) == len(batch):
        return None
    for index, violations in named.items():
        own = _as_one(violations)
        future = batch[index][1]
        if not future.done():
            future.set_exception(
                InvalidEventsError(f"invalid event: {own[0].field}", own, error.request_id)
            )
            future.add_done_callback(lambda f: f.exception())
    log.warning(
        "batch of %d events: %d refused by the server, sending the rest", len(batch), len(named)
    )
    return [item for index, item in enumerate(batch) if index not in named]
