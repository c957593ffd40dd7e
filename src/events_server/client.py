"""``EventsClient``: CreateEvents for internal Python services, with the safe choices made.

- Events are typed ``pb.Event`` messages or contract dicts (``{"type": "page_view", ...}``).
- Every event without a ``deduplication_id`` gets a uuid4 before the first attempt,
  so a retry can never queue it twice.
- UNAVAILABLE (server down, Redis down, connection lost) is retried with
  exponential backoff and full jitter, within one deadline for the whole call.
- Failures are exceptions with the status code, the request id (as in the
  server's logs) and, for INVALID_ARGUMENT, the field violations.
- ``Batcher`` gathers single events into calls: when ``max_events`` are
  waiting, or ``max_delay_seconds`` after the first of a batch arrived.

``SyncEventsClient`` is the same for code without an event loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import random
import re
import threading
import time
import uuid
from collections.abc import Coroutine, Iterable, Mapping
from types import TracebackType
from typing import Any, Self, TypeVar

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from events_server.auth import MD_API_KEY
from events_server.codec import OPTIONAL_STRING_FIELDS, TYPE_NAMES, TYPE_VALUES
from events_server.errors import FieldViolation
from events_server.logs import REQUEST_ID_HEADER, new_request_id
from events_server.pb import events_pb2 as pb
from events_server.pb import events_pb2_grpc
from events_server.validation import event_violations

log = logging.getLogger(__name__)

T = TypeVar("T")

EventLike = pb.Event | Mapping[str, Any]
"""What the client takes: a typed Event, or a dict in the contract's JSON form."""

_STRING_FIELDS = frozenset({"tenant", "market", *OPTIONAL_STRING_FIELDS})
_REQUIRED = ("tenant", "market", "type")


class EventsError(Exception):
    """A CreateEvents call failed; nothing of it is known to be queued unless said otherwise."""

    def __init__(self, message: str, code: grpc.StatusCode, request_id: str | None) -> None:
        super().__init__(f"{code.name}: {message}" + (f" [{request_id}]" if request_id else ""))
        self.code = code
        self.details = message
        self.request_id = request_id
        """Names the call in the server's logs (None when it failed before being sent)."""


class InvalidEventsError(EventsError):
    """INVALID_ARGUMENT: ``violations`` name each bad field (``events[3].tenant``)."""

    def __init__(
        self, message: str, violations: list[FieldViolation], request_id: str | None
    ) -> None:
        super().__init__(message, grpc.StatusCode.INVALID_ARGUMENT, request_id)
        self.violations = violations


class UnauthenticatedError(EventsError):
    """UNAUTHENTICATED: the API key is missing or unknown."""


class PermissionDeniedError(EventsError):
    """PERMISSION_DENIED: the API key may not send for this tenant."""


class UnavailableError(EventsError):
    """Still UNAVAILABLE (or out of time) when the deadline passed; resending the same events
    is safe, as they carry their deduplication_ids."""


def error_from_rpc(error: grpc.aio.AioRpcError, request_id: str | None) -> EventsError:
    """The client's exception for a failed call: the single status-to-exception mapping."""
    code = error.code()
    message = error.details() or code.name
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidEventsError(message, _violations(error), request_id)
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return UnauthenticatedError(message, code, request_id)
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return PermissionDeniedError(message, code, request_id)
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return UnavailableError(message, code, request_id)
    return EventsError(message, code, request_id)


def _violations(error: grpc.aio.AioRpcError) -> list[FieldViolation]:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    found: list[FieldViolation] = []
    for detail in status.details if status is not None else ():
        bad_request = error_details_pb2.BadRequest()
        if detail.Unpack(bad_request):
            found.extend(
                FieldViolation(v.field, v.description, v.reason)
                for v in bad_request.field_violations
            )
    return found


def _fill_from_dict(event: pb.Event, path: str, data: Any) -> list[FieldViolation]:
    """Set ``event`` from a contract dict; what is wrong with it (the message is then junk)."""
    if not isinstance(data, Mapping):
        got = type(data).__name__
        return [FieldViolation(path, f"an event is a pb.Event or a dict, not {got}", "type")]
    found: list[FieldViolation] = []

    def bad(name: str, description: str, reason: str) -> None:
        found.append(FieldViolation(f"{path}.{name}", description, reason))

    for name, value in data.items():
        if value is None:
            continue  # the contract's null: no value
        try:
            if name == "type":
                number = TYPE_VALUES.get(value) if isinstance(value, str) else None
                if isinstance(value, int) and not isinstance(value, bool) and value in TYPE_NAMES:
                    number = pb.EventType.ValueType(value)
                if number is None:
                    bad(name, f"unknown event type {value!r}", "enum")
                else:
                    event.type = number
            elif name in _STRING_FIELDS:
                if isinstance(value, str):
                    setattr(event, name, value)
                else:
                    bad(name, f"must be a string, not {type(value).__name__}", "string_type")
            elif name == "variant_ids":
                if isinstance(value, list) and all(isinstance(v, str) for v in value):
                    event.variant_ids.extend(value)
                else:
                    bad(name, "must be a list of strings", "list_type")
            elif name == "entity_identifiers":
                if isinstance(value, Mapping) and all(
                    isinstance(k, str) and isinstance(v, str) for k, v in value.items()
                ):
                    event.entity_identifiers.update(value)
                else:
                    bad(name, "must map strings to strings", "dict_type")
            else:
                bad(name, "not a field of Event", "extra_forbidden")
        except ValueError:  # protobuf refuses strings that are not valid UTF-8 (lone surrogates)
            bad(name, "must be valid UTF-8 (no lone surrogates)", "string_unicode")
    for name in _REQUIRED:
        if data.get(name) is None:
            bad(name, "required", "missing")
    return found


def _with_dedup_id(event: pb.Event) -> pb.Event:
    # Fixed before the first attempt: every retry then carries the same id.
    if not event.HasField("deduplication_id"):
        event.deduplication_id = str(uuid.uuid4())
    return event


def build_request(events: Iterable[EventLike]) -> pb.CreateEventsRequest:
    """The request for ``events`` (copies, ids filled in); InvalidEventsError for a bad dict."""
    request = pb.CreateEventsRequest()
    found: list[FieldViolation] = []
    for index, item in enumerate(events):
        event = request.events.add()
        if isinstance(item, pb.Event):
            event.CopyFrom(item)
        else:
            found.extend(_fill_from_dict(event, f"events[{index}]", item))
        _with_dedup_id(event)
    if found:
        message = f"{len(found)} invalid field(s), first: {found[0].field}"
        raise InvalidEventsError(message, found, None)
    return request


class EventsClient:
    """Async CreateEvents client. Create it inside the event loop that will use it."""

    def __init__(
        self,
        target: str,
        *,
        api_key: str | None = None,
        deadline_seconds: float = 10.0,
        initial_backoff_seconds: float = 0.05,
        max_backoff_seconds: float = 2.0,
        backoff_multiplier: float = 2.0,
    ) -> None:
        self._deadline = deadline_seconds
        self._initial_backoff = initial_backoff_seconds
        self._max_backoff = max_backoff_seconds
        self._multiplier = backoff_multiplier
        self._api_key = api_key
        reconnect_ms = max(int(initial_backoff_seconds * 1000), 1)
        self._channel = grpc.aio.insecure_channel(
            target,
            options=[
                # gRPC's own reconnect backoff (1 s, growing to 2 min) would leave our
                # retries failing fast against a server that is back already.
                ("grpc.initial_reconnect_backoff_ms", reconnect_ms),
                ("grpc.min_reconnect_backoff_ms", reconnect_ms),
                ("grpc.max_reconnect_backoff_ms", max(int(max_backoff_seconds * 1000), 1)),
            ],
        )
        self._stub = events_pb2_grpc.EventsServiceStub(self._channel)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel (calls in flight are cancelled)."""
        await self._channel.close()

    async def send(
        self, events: Iterable[EventLike], *, deadline_seconds: float | None = None
    ) -> pb.CreateEventsResponse:
        """Queue ``events``: one result per event, in order (accepted, or duplicate)."""
        return await self.send_request(build_request(events), deadline_seconds=deadline_seconds)

    async def send_request(
        self, request: pb.CreateEventsRequest, *, deadline_seconds: float | None = None
    ) -> pb.CreateEventsResponse:
        """Send a built request as it is, retrying UNAVAILABLE until the deadline."""
        request_id = new_request_id()
        metadata: list[tuple[str, str]] = [(REQUEST_ID_HEADER, request_id)]
        if self._api_key:
            metadata.append((MD_API_KEY, self._api_key))
        seconds = self._deadline if deadline_seconds is None else deadline_seconds
        deadline = time.monotonic() + seconds
        attempt = 0
        while True:
            try:
                reply: pb.CreateEventsResponse = await self._stub.CreateEvents(
                    request, timeout=max(deadline - time.monotonic(), 0.001), metadata=metadata
                )
                return reply
            except grpc.aio.AioRpcError as error:
                if error.code() != grpc.StatusCode.UNAVAILABLE:
                    raise error_from_rpc(error, request_id) from error
                # Full jitter: clients that failed together do not retry together.
                ceiling = min(self._max_backoff, self._initial_backoff * self._multiplier**attempt)
                pause = random.uniform(0, ceiling)
                if time.monotonic() + pause >= deadline:
                    raise error_from_rpc(error, request_id) from error
                attempt += 1
                log.info(
                    "CreateEvents unavailable (%s), retry %d in %.3fs",
                    error.details(),
                    attempt,
                    pause,
                    extra={"request_id": request_id},
                )
                await asyncio.sleep(pause)

    def batcher(
        self, *, max_events: int = 500, max_delay_seconds: float = 0.2, max_in_flight: int = 4
    ) -> Batcher:
        """A Batcher sending through this client."""
        return Batcher(
            self,
            max_events=max_events,
            max_delay_seconds=max_delay_seconds,
            max_in_flight=max_in_flight,
        )


Batch = list[tuple[pb.Event, "asyncio.Future[pb.EventResult]"]]
"""Events of one batch, each with the future of its result."""


class Batcher:
    """Sends events in batches: once ``max_events`` wait, or ``max_delay_seconds`` after the first.

    ``add`` checks an event at once (a bad one raises there, and never sinks the
    batch it would have joined) and returns a future of its result. Events the
    server refuses for its own limits (sizes ``add`` cannot know) fail alone and
    the rest of their batch is sent again. A batch that fails otherwise sets the
    error on each of its futures and is logged. ``close`` sends
    what is left and waits for every batch.
    """

    def __init__(
        self, client: EventsClient, *, max_events: int, max_delay_seconds: float, max_in_flight: int
    ) -> None:
        if max_events < 1 or max_delay_seconds < 0 or max_in_flight < 1:
            raise ValueError("need max_events >= 1, max_delay_seconds >= 0, max_in_flight >= 1")
        self._client = client
        self._max_events = max_events
        self._max_delay = max_delay_seconds
        self._max_in_flight = max_in_flight
        self._pending: Batch = []
        self._timer: asyncio.TimerHandle | None = None
        self._in_flight: set[asyncio.Task[None]] = set()
        self._closed = False

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def add(self, event: EventLike) -> asyncio.Future[pb.EventResult]:
        """Queue one event for the next batch; waits while ``max_in_flight`` batches are sending."""
        if self._closed:
            raise RuntimeError("the batcher is closed")
        message = pb.Event()
        if isinstance(event, pb.Event):
            message.CopyFrom(event)
            found = [
                FieldViolation(v.field.replace("events[0]", "event", 1), v.description, v.reason)
                for v in event_violations(0, message)
            ]
        else:
            found = _fill_from_dict(message, "event", event)
        if found:
            raise InvalidEventsError(f"invalid event: {found[0].field}", found, None)
        while len(self._in_flight) >= self._max_in_flight:
            await asyncio.wait(self._in_flight, return_when=asyncio.FIRST_COMPLETED)
        future: asyncio.Future[pb.EventResult] = asyncio.get_running_loop().create_future()
        self._pending.append((_with_dedup_id(message), future))
        if len(self._pending) >= self._max_events:
            self._send_pending()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._max_delay, self._send_pending)
        return future

    async def flush(self) -> None:
        """Send what is waiting now, and wait until every batch has been answered."""
        self._send_pending()
        while self._in_flight:
            await asyncio.wait(self._in_flight)

    async def close(self) -> None:
        """Refuse new events, send the rest, wait for every batch."""
        self._closed = True
        await self.flush()

    def _send_pending(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._pending:
            return
        batch, self._pending = self._pending, []
        task = asyncio.get_running_loop().create_task(self._send(batch))
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)

    async def _send(self, batch: Batch) -> None:
        request = pb.CreateEventsRequest(events=[event for event, _ in batch])
        try:
            reply = await self._client.send_request(request)
        except InvalidEventsError as error:
            if (rest := _without_refused(batch, error)) is None:
                self._fail(batch, error)
            else:
                # Only the server knows its size limits (add() cannot check them): the
                # events it named fail alone, and the rest of the batch goes again.
                await self._send(rest)
            return
        except Exception as error:
            self._fail(batch, error)
            return
        for (_, future), result in zip(batch, reply.results, strict=True):
            if not future.done():
                future.set_result(result)

    @staticmethod
    def _fail(
        batch: list[tuple[pb.Event, asyncio.Future[pb.EventResult]]], error: Exception
    ) -> None:
        log.error("batch of %d events failed: %s", len(batch), error)
        for _, future in batch:
            if not future.done():
                future.set_exception(error)
                # Logged above: asyncio need not warn again about unawaited futures.
                future.add_done_callback(lambda f: f.exception())


_EVENT_INDEX = re.compile(r"^events\[(\d+)\]")


def _without_refused(batch: Batch, error: InvalidEventsError) -> Batch | None:
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
        own = [
            FieldViolation(_EVENT_INDEX.sub("event", v.field, 1), v.description, v.reason)
            for v in violations
        ]
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


class SyncEventsClient:
    """EventsClient for code without an event loop: it runs one in a thread of its own.

    Thread-safe; ``close()`` (or leaving the ``with`` block) stops the thread.
    """

    def __init__(
        self,
        target: str,
        *,
        api_key: str | None = None,
        deadline_seconds: float = 10.0,
        initial_backoff_seconds: float = 0.05,
        max_backoff_seconds: float = 2.0,
        backoff_multiplier: float = 2.0,
    ) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="events-client", daemon=True
        )
        self._thread.start()

        async def make() -> EventsClient:
            return EventsClient(
                target,
                api_key=api_key,
                deadline_seconds=deadline_seconds,
                initial_backoff_seconds=initial_backoff_seconds,
                max_backoff_seconds=max_backoff_seconds,
                backoff_multiplier=backoff_multiplier,
            )

        self._client = self._run(make())

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def send(
        self, events: Iterable[EventLike], *, deadline_seconds: float | None = None
    ) -> pb.CreateEventsResponse:
        """Queue ``events``; see EventsClient.send."""
        return self._run(self._client.send(list(events), deadline_seconds=deadline_seconds))

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


class SyncBatcher:
    """Batcher for code without an event loop; results are concurrent.futures.Futures."""

    def __init__(self, client: SyncEventsClient, batcher: Batcher) -> None:
        self._client = client
        self._batcher = batcher

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def add(self, event: EventLike) -> concurrent.futures.Future[pb.EventResult]:
        """Queue one event; its future resolves when its batch is answered."""
        result: concurrent.futures.Future[pb.EventResult] = concurrent.futures.Future()

        def copy(done: asyncio.Future[pb.EventResult]) -> None:
            if done.cancelled():
                result.cancel()
            elif (error := done.exception()) is not None:
                result.set_exception(error)
            else:
                result.set_result(done.result())

        self._client._run(self._batcher.add(event)).add_done_callback(copy)
        return result

    def flush(self) -> None:
        """Send what is waiting and wait for every batch."""
        self._client._run(self._batcher.flush())

    def close(self) -> None:
        """Send the rest and refuse new events."""
        self._client._run(self._batcher.close())
