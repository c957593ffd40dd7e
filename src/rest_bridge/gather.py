"""Group commit: the bridge's requests to the server, several to a call while it is busy.

Every POST /create-events and every WebSocket frame becomes one sub-request: its
serialized CreateEventsRequest (a POST /v2/...: its TrackRequest, of ``kind`` TRACK), the
metadata a CreateEvents call of its own would carry
(credentials, request id, the client context) and its frame id. No timer: a request
that finds fewer than ``max_calls`` calls out is sent at once, alone; the ones that
arrive while every call is out wait, and go together in the next call to leave (up to
``max_requests`` and ``max_bytes``). So an idle bridge adds no latency, and a busy one
pays grpc.aio's per-call cost once per call, not once per request. A "call" here is a
batch on the bridge's gathered stream (rest_bridge.gather_stream: about half a unary
call's cost), or a unary CreateEventsGathered call for a batch over STREAM_BYTES.

The server answers each sub-request as its own call would be answered (its status, its
trailers, its results): a sub-request's refusal is raised to its own waiter alone, as
the ``grpc.aio.AioRpcError`` a CreateEvents call would raise, so the callers map it to
HTTP or to a frame's answer exactly as before. A failure of the whole call (the server
unreachable, its deadline passed) is every sub-request's, as it would have been for each.

Fairness: requests wait per credential (key or page origin), and each call takes them
round robin, so a flood behind one credential does not push a light one out of the calls.

Nothing is retried, with three exceptions that are not retries, as the server read nothing
of the refused call: a server without the stream refuses it (UNIMPLEMENTED), and its
batches go as unary calls (for DIRECT_SECONDS, with a warning); gRPC refuses a message
over its receive limit first thing, and a gathered call so refused is sent again as one
call per sub-request, so only a request too large on its own is answered 413; and a
bridge the server does not recognise (its EVENTS_BRIDGE_TOKEN or certificate missing on
one side) is refused the gathered call by the access interceptor, and then sends plain
CreateEvents calls, one per request, as it did before gathering, whose forwarded context
the server ignores (for DIRECT_SECONDS, then it tries again), with a warning.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable, Coroutine
from typing import Any

import grpc

from events_server.pb import events_pb2 as pb
from events_server.pb import events_pb2_grpc
from events_server.wire.metadata import MD_API_KEY, MD_ORIGIN
from rest_bridge.batch_link import BatchLink
from rest_bridge.deadlines import CallDeadlines
from rest_bridge.gather_batch import Metadata, Out, Pending, answer, ignore
from rest_bridge.gather_direct import DIRECT_SECONDS, DirectCalls, not_the_bridge
from rest_bridge.gather_stream import STREAM_BYTES, GatheredLink

log = logging.getLogger(__name__)

_TOO_LARGE = "message larger than max"


LARGE_CALLS = 4
"""Gathered calls out at once while at least ``large_bytes`` wait: large requests (100
events) gain from a second call in flight, while the server writes the first; single
events gain from gathering more per call, so below that only ``max_calls`` go out."""


STALL_SECONDS = 0.025
"""A gathered call out longer than this no longer holds the requests queued behind it."""

MAX_STALLED_CALLS = 16
"""Calls that may go out beside stalled ones (bounded: a dead server is not flooded)."""


class Gatherer:
    """Sends CreateEvents requests to the server in gathered calls (one per bridge process)."""

    def __init__(
        self,
        stub: Callable[[], events_pb2_grpc.BridgeIngestAsyncStub],
        direct: Callable[[], events_pb2_grpc.EventsServiceAsyncStub],
        *,
        timeout_seconds: float,
        max_calls: int,
        max_requests: int,
        max_bytes: int,
        large_bytes: int = 1 << 62,
        link_host: str | None = None,
        max_calls_large: int = LARGE_CALLS,
        observe: Callable[[int], None] | None = None,
    ) -> None:
        self._stub = stub
        self.link = BatchLink(stub, link_host, GatheredLink(stub), timeout_seconds)
        """Where batches go: the batch link, else the gRPC stream (rest_bridge.batch_link)."""
        self._unary_until = 0.0
        """Until when batches go as unary calls (a server without StreamGathered)."""
        self._direct = DirectCalls(direct, timeout_seconds)
        self._observe = observe
        self._timeout = timeout_seconds
        self._max_calls = max_calls
        self._max_requests = max_requests
        self._max_bytes = max_bytes
        self._large_bytes = large_bytes
        self._max_calls_large = max(max_calls_large, max_calls)
        self._waiting: collections.OrderedDict[str, collections.deque[Pending]] = (
            collections.OrderedDict()
        )
        self._queued = 0
        self._queued_bytes = 0
        self._started: list[float] = []
        """When each call out was sent (loop time), oldest first."""
        self._check: asyncio.TimerHandle | None = None
        self.out = 0
        """Calls in flight now."""
        self.calls = 0
        """Calls made so far (each request counts as one HTTP request or frame)."""
        self.requests = 0
        """Requests sent so far."""

    def create_events(
        self,
        request: pb.CreateEventsRequest,
        metadata: Metadata,
        ws_message_id: str | None = None,
    ) -> Coroutine[Any, Any, pb.CreateEventsResponse]:
        """The server's answer to one request, as CreateEvents would give it (raises
        grpc.aio.AioRpcError as CreateEvents would)."""
        # The coroutine itself, not one awaiting it: a layer less for every frame.
        return self._request(request, metadata, ws_message_id)

    def track(
        self, request: pb.TrackRequest, metadata: Metadata
    ) -> Coroutine[Any, Any, pb.CreateEventsResponse]:
        """The server's answer to one Track request, as Track would give it."""
        return self._request(request, metadata, None)

    def submit(
        self,
        request: pb.CreateEventsRequest | pb.TrackRequest,
        metadata: Metadata,
        ws_message_id: str | None = None,
    ) -> asyncio.Future[pb.CreateEventsResponse] | None:
        """Queue one request: the future of the server's answer (failing with
        grpc.aio.AioRpcError as the call would), for a caller that waits on it without a
        coroutine (rest_bridge.hot). None while calls go one by one (gather_direct): the
        caller awaits ``create_events`` or ``track`` instead."""
        loop = asyncio.get_running_loop()
        if self._direct.until > loop.time():
            return None
        raw = request.SerializeToString()
        kind = (
            pb.REQUEST_KIND_TRACK
            if isinstance(request, pb.TrackRequest)
            else pb.REQUEST_KIND_CREATE_EVENTS
        )
        size = len(raw) + 8
        key = origin = ""
        for name, value in metadata:
            size += len(name) + len(value) + 4
            if name == MD_API_KEY:
                key = value
            elif name == MD_ORIGIN:
                origin = value
        credential = key or origin
        now = loop.time()
        future: asyncio.Future[pb.CreateEventsResponse] = loop.create_future()
        pending = Pending(
            request, metadata, raw, kind, ws_message_id, size, now + self._timeout, future, now
        )
        queue = self._waiting.get(credential)
        if queue is None:
            queue = self._waiting[credential] = collections.deque()
        queue.append(pending)
        self._queued += 1
        self._queued_bytes += size
        self._dispatch()
        return future

    async def _request(
        self,
        request: pb.CreateEventsRequest | pb.TrackRequest,
        metadata: Metadata,
        ws_message_id: str | None,
    ) -> pb.CreateEventsResponse:
        future = self.submit(request, metadata, ws_message_id)
        if future is None:
            return await self._direct.call(request, metadata, ws_message_id)
        try:
            # Not shielded (a shield costs ~2 µs a request): a waiter given up on (its
            # client gone) cancels its own future alone; the call that carries it is a
            # task of its own, and skips a future that is done.
            return await future
        except asyncio.CancelledError:
            if future.done():  # answered before its waiter woke: nobody reads it
                ignore(future)
            else:
                future.cancel()
            raise

    def _dispatch(self) -> None:
        """Send what waits, while fewer than max_calls calls are out (more while what waits
        is large, or while all of those out are stalled: a slow server must not make every
        request wait a whole call more)."""
        while self._queued and (
            self.out < self._max_calls
            or (self.out < self._max_calls_large and self._queued_bytes >= self._large_bytes)
            or self._stalled()
        ):
            batch = self._take()
            if batch:
                self._send(batch)
        if self._queued and self._check is None and self._started:
            # Not a gathering timer (an idle bridge sends at once): what waits behind a
            # stalled call goes out once it is stalled, even if nothing else arrives.
            self._check = asyncio.get_running_loop().call_at(
                self._started[-1] + STALL_SECONDS, self._recheck
            )

    def _recheck(self) -> None:
        self._check = None
        self._dispatch()

    def _stalled(self) -> bool:
        # A call out past STALL_SECONDS (Redis slow or down, the server's timeout running)
        # would hold everything queued behind it for as long again: let another go, up to
        # MAX_STALLED_CALLS more than max_calls.
        if not self._started or self.out >= self._max_calls + MAX_STALLED_CALLS:
            return False
        return asyncio.get_running_loop().time() - self._started[-1] > STALL_SECONDS

    def _take(self) -> list[Pending]:
        """Up to max_requests / max_bytes of what waits, one credential at a time."""
        batch: list[Pending] = []
        size = 0
        waiting = self._waiting
        now = asyncio.get_running_loop().time()
        while waiting and len(batch) < self._max_requests:
            credential, queue = next(iter(waiting.items()))
            pending = queue[0]
            if pending.future.done() or pending.deadline <= now:
                # Given up on before it was sent, or out of time while it waited: it is
                # never sent (and must not shorten the others' deadline to nothing).
                queue.popleft()
                self._queued -= 1
                self._queued_bytes -= pending.size
                if not pending.future.done():
                    pending.future.set_exception(
                        grpc.aio.AioRpcError(
                            grpc.StatusCode.DEADLINE_EXCEEDED, details="Deadline Exceeded"
                        )
                    )
            elif batch and size + pending.size > self._max_bytes:
                break
            else:
                queue.popleft()
                self._queued -= 1
                self._queued_bytes -= pending.size
                batch.append(pending)
                size += pending.size
            if queue:
                waiting.move_to_end(credential)  # round robin between credentials
            else:
                del waiting[credential]
        return batch

    def _send(self, batch: list[Pending]) -> None:
        out = Out(asyncio.get_running_loop().time())
        self._started.append(out.started)
        self.out += 1
        self.calls += 1
        self.requests += len(batch)
        if self._observe is not None:
            self._observe(len(batch))
        task = asyncio.get_running_loop().create_task(self._call(batch, out))
        task.add_done_callback(lambda done: self._sent(done, out))

    def _sent(self, task: asyncio.Task[None], out: Out) -> None:
        self._release(out)
        if not task.cancelled() and (error := task.exception()) is not None:
            raise error  # a bug: _call answers every waiter itself

    def _release(self, out: Out) -> None:
        """The call is over (its answer is in, or it failed): what waits may go."""
        if not out.over:
            out.over = True
            self.out -= 1
            self._started.remove(out.started)
            self._dispatch()

    async def _call(self, batch: list[Pending], out: Out | None = None) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        # The call lasts as long as its freshest request may: an old one must not cut the
        # others' time short. Each keeps its own deadline (CallDeadlines), and the server
        # takes each one's wait out of that one's budget.
        latest = max(p.deadline for p in batch)
        timeout = max(latest - now, 0.001)
        deadlines = CallDeadlines(batch, latest)
        request = pb.GatheredRequest()
        add = request.requests.add
        for pending in batch:
            sub = add(
                request=pending.raw,
                ws_message_id=pending.ws_message_id,
                waited_us=int((now - pending.queued_at) * 1e6),
                kind=pending.kind,
            )
            metadata = sub.metadata
            for name, value in pending.metadata:
                metadata[name] = value
        # On the stream unless too large for one of its messages (see gather_stream).
        streamed = self._unary_until <= now and sum(p.size for p in batch) <= STREAM_BYTES
        try:
            if streamed:
                reply = await self.link.exchange(request, timeout)
            else:
                reply = await self._stub().CreateEventsGathered(request, timeout=timeout)
        except grpc.aio.AioRpcError as error:
            if streamed and error.code() == grpc.StatusCode.UNIMPLEMENTED:
                # A server without StreamGathered refused the stream unread: calls, then.
                if self._unary_until <= loop.time():
                    log.warning(
                        "the events-server has no StreamGathered (an older version?): sending"
                        " gathered calls, one per batch, for %g s",
                        DIRECT_SECONDS,
                    )
                self._unary_until = loop.time() + DIRECT_SECONDS
                await self._call(batch)
                return
            if (
                not streamed
                and len(batch) > 1
                and error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                and _TOO_LARGE in (error.details() or "").lower()
            ):
                # Refused by gRPC before the server read a byte: nothing happened. One call
                # each, so that only a request too large on its own is refused.
                await asyncio.gather(*(self._call([p]) for p in batch))
                return
            if not_the_bridge(error):
                # Refused before the server read a byte (the access interceptor), as an
                # unrecognised bridge: its credential is missing on one side.
                self._direct.refused(error)
                direct = self._direct.answer
                await asyncio.gather(
                    *(direct(p.request, p.metadata, p.ws_message_id, p.future) for p in batch)
                )
                return
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(error)
            return
        except BaseException as error:
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(
                        grpc.aio.AioRpcError(
                            grpc.StatusCode.UNKNOWN, details=f"{type(error).__name__}: {error}"
                        )
                    )
            raise
        finally:
            deadlines.cancel()
        if out is not None:
            # The next batch leaves before this one's waiters wake: the server works on it
            # while this process writes their answers (and reads what their clients send
            # next), instead of waiting for all of that.
            self._release(out)
        answer(batch, reply, loop)
