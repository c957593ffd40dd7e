"""``SyncEventsClient`` and ``SyncBatcher``: the async client run on a loop in its own thread."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Coroutine, Iterable
from typing import Any, TypeVar, Unpack

from events_server.client.aio import EventsClient
from events_server.client.batcher import Batcher
from events_server.client.lifecycle import Closing
from events_server.client.options import ClientOptions, EventLike, TrackedLike
from events_server.pb import events_pb2 as pb

T = TypeVar("T")


class SyncEventsClient(Closing):
    """EventsClient for code without an event loop: it runs one in a thread of its own.

    Thread-safe; ``close()`` (or leaving the ``with`` block) stops the thread.
    """

    def __init__(self, target: str, **options: Unpack[ClientOptions]) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="events-client", daemon=True
        )
        self._thread.start()

        async def make() -> EventsClient:
            return EventsClient(target, **options)

        try:
            self._client = self._run(make())
        except BaseException:  # e.g. a TLS file that cannot be read: no thread left behind
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()
            raise

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def send(
        self, events: Iterable[EventLike], *, deadline_seconds: float | None = None
    ) -> pb.CreateEventsResponse:
        """Queue ``events``; see EventsClient.send."""
        return self._run(self._client.send(list(events), deadline_seconds=deadline_seconds))

    def track(
        self, events: Iterable[TrackedLike], *, deadline_seconds: float | None = None
    ) -> pb.CreateEventsResponse:
        """Queue Depict's v2 events; see EventsClient.track."""
        return self._run(self._client.track(list(events), deadline_seconds=deadline_seconds))

    def batcher(
        self, *, max_events: int = 500, max_delay_seconds: float = 0.2, max_in_flight: int = 4
    ) -> SyncBatcher:
        """A batcher sending through this client; see EventsClient.batcher."""

        async def make() -> Batcher:
            return self._client.batcher(
                max_events=max_events,
                max_delay_seconds=max_delay_seconds,
                max_in_flight=max_in_flight,
            )

        return SyncBatcher(self, self._run(make()))

    def close(self) -> None:
        """Close the channel and stop the loop's thread."""
        if self._loop.is_closed():
            return
        self._run(self._client.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


class SyncBatcher(Closing):
    """Batcher for code without an event loop; results are concurrent.futures.Futures."""

    def __init__(self, client: SyncEventsClient, batcher: Batcher) -> None:
        self._client = client
        self._batcher = batcher

    def add(self, event: EventLike) -> concurrent.futures.Future[pb.EventResult]:
        """Queue one event; its future resolves when its batch is answered."""
        return self._added(self._batcher.add(event))

    def track(self, event: TrackedLike) -> concurrent.futures.Future[pb.EventResult]:
        """Queue one v2 event; its future resolves when its batch is answered."""
        return self._added(self._batcher.track(event))

    def _added(
        self, adding: Coroutine[Any, Any, asyncio.Future[pb.EventResult]]
    ) -> concurrent.futures.Future[pb.EventResult]:
        result: concurrent.futures.Future[pb.EventResult] = concurrent.futures.Future()

        def copy(done: asyncio.Future[pb.EventResult]) -> None:
            if done.cancelled():
                result.cancel()
            elif (error := done.exception()) is not None:
                result.set_exception(error)
            else:
                result.set_result(done.result())

        self._client._run(adding).add_done_callback(copy)
        return result

    def flush(self) -> None:
        """Send what is waiting and wait for every batch."""
        self._client._run(self._batcher.flush())

    def close(self) -> None:
        """Send the rest and refuse new events."""
        self._client._run(self._batcher.close())
