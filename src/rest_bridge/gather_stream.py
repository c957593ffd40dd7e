"""The bridge's gathered calls as batches on one long-lived stream (BridgeIngest.StreamGathered).

A unary call costs grpc.aio ~170 µs of the bridge's CPU and ~200 µs of the server's here;
a message on an open stream about half as much. So ``GatheredLink`` keeps one stream per
channel, opened by the first batch that needs it, and ``exchange`` sends a batch (the
GatheredRequest a CreateEventsGathered call would carry) as one message of it, with a
``call_id`` its answer carries back, and waits for that answer as for a call's reply.

Each batch keeps what a call of its own had: its timeout, a timer here (the server is
given it too, and cancels the batch's work when it passes, as it cancels a call's); a
failure of the whole batch raised as the ``grpc.aio.AioRpcError`` the call would have
raised. When the stream breaks (the server gone, restarted, refusing it), every batch
out on it fails with the stream's error, as each call out would have failed, and the next
batch opens a new stream. Nothing is sent again here: the caller decides (a server without
StreamGathered read nothing, so its batches can go as calls; see rest_bridge.gather).

A server shutting down says ``draining``: the stream is half-closed (what was sent is
still answered) and later batches open a new one.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
from collections.abc import Callable, Coroutine, Iterable
from typing import Any

import grpc

from events_server.pb import events_pb2 as pb
from events_server.pb import events_pb2_grpc

_CODES = {code.value[0]: code for code in grpc.StatusCode}

STREAM_BYTES = 4 * 1024 * 1024
"""Largest batch sent on the stream (estimated bytes); a larger one goes as a call of its
own: a message over the server's receive limit would end the stream, and every batch on
it. The server takes 4 MiB past its max_request_bytes (events_server.server.app's
GATHER_ROOM), so this always fits."""


def status_error(code: int, details: str, trailers: Iterable[pb.Trailer]) -> grpc.aio.AioRpcError:
    """A status the server sent in a message, as the error its own call would have raised."""
    metadata = grpc.aio.Metadata(
        *(
            (t.key, t.value if t.key.endswith("-bin") else t.value.decode("utf-8", "replace"))
            for t in trailers
        )
    )
    status = _CODES.get(code, grpc.StatusCode.UNKNOWN)
    return grpc.aio.AioRpcError(status, grpc.aio.Metadata(), metadata, details or None)


def _unavailable(details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, details=details)


class BatchesOut:
    """The batches out on one stream or batch link (rest_bridge.batch_link), by ``call_id``:
    each answered once, by its answer, by its timer (DEADLINE_EXCEEDED, as its call's
    deadline would have), or by the end of what carries it (``fail``)."""

    def __init__(self) -> None:
        self._out: dict[int, tuple[asyncio.Future[pb.GatheredResponse], asyncio.TimerHandle]] = {}

    def __bool__(self) -> bool:
        return bool(self._out)

    def add(
        self, request: pb.GatheredRequest, call_id: int, seconds: float
    ) -> asyncio.Future[pb.GatheredResponse]:
        """``request`` named ``call_id`` and given ``seconds``; the future of its answer."""
        loop = asyncio.get_running_loop()
        request.call_id = call_id
        request.timeout_us = int(seconds * 1e6)
        answer: asyncio.Future[pb.GatheredResponse] = loop.create_future()
        self._out[call_id] = (answer, loop.call_later(seconds, self._expire, call_id))
        return answer

    def answer(self, response: pb.GatheredResponse) -> None:
        """The server's answer to one batch: its result, or the error its call would raise."""
        entry = self._out.pop(response.call_id, None)
        if entry is None:  # its timer has answered it already
            return
        answer, timer = entry
        timer.cancel()
        if answer.done():  # given up on: its batch's task was cancelled
            return
        if response.code:
            answer.set_exception(status_error(response.code, response.details, response.trailers))
        else:
            answer.set_result(response)

    def fail(self, error: grpc.aio.AioRpcError) -> None:
        """What carries them is over: so is every batch out, as each call would have been."""
        for answer, timer in self._out.values():
            timer.cancel()
            if not answer.done():
                answer.set_exception(error)
        self._out.clear()

    def _expire(self, call_id: int) -> None:
        answer, _ = self._out.pop(call_id)
        if not answer.done():
            answer.set_exception(
                grpc.aio.AioRpcError(grpc.StatusCode.DEADLINE_EXCEEDED, details="Deadline Exceeded")
            )


class _Stream:
    """One open StreamGathered call and the batches out on it."""

    def __init__(self, call: grpc.aio.StreamStreamCall[pb.GatheredRequest, pb.GatheredResponse]):
        self._call = call
        self._out = BatchesOut()
        self._outbox: collections.deque[pb.GatheredRequest] = collections.deque()
        self._writing = False
        self._taken = False
        self.over = False
        """Broken, ended, or draining: no batch is sent on it any more."""
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def exchange(
        self, request: pb.GatheredRequest, call_id: int, seconds: float
    ) -> pb.GatheredResponse:
        answer = self._out.add(request, call_id, seconds)
        self._outbox.append(request)
        if not self._writing:
            await self._write()
        return await answer

    async def _write(self) -> None:
        # One write at a time (grpc.aio's rule): whoever finds none going writes what
        # waits, the batches queued meanwhile included.
        self._writing = True
        try:
            if not self._taken:
                # A write before the server's answer could meet a refusal (a server without
                # the method, a caller it refuses) and hide its status behind gRPC's INTERNAL.
                await self._call.initial_metadata()
                self._taken = True
                if self._call.done():  # refused: the reader fails every batch with why
                    self._outbox.clear()
            while self._outbox:
                await self._call.write(self._outbox.popleft())
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            self._outbox.clear()  # the reader fails every batch out with the stream's error
        finally:
            self._writing = False
        if self.over:  # draining: half-closed once what was queued is written
            await self._close()

    async def _read(self) -> None:
        error: grpc.aio.AioRpcError
        try:
            while True:
                response = await self._call.read()
                if response is grpc.aio.EOF:
                    error = _unavailable("the events-server ended the gathered stream")
                    break
                assert isinstance(response, pb.GatheredResponse)
                if response.draining:  # the server is stopping: a new stream for later batches
                    self.over = True
                    if not self._writing:
                        await self._close()
                    continue
                self._out.answer(response)
        except grpc.aio.AioRpcError as broken:
            error = broken
        except asyncio.CancelledError:  # the bridge is stopping
            self._fail(grpc.aio.AioRpcError(grpc.StatusCode.CANCELLED, details="Cancelled"))
            raise
        self._fail(error)

    def _fail(self, error: grpc.aio.AioRpcError) -> None:
        """The stream is over: so is every batch out on it, as each call would have been."""
        self.over = True
        self._out.fail(error)

    async def _close(self) -> None:
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
            await self._call.done_writing()  # (or already over: the reader has seen it)


class GatheredLink:
    """One stream at a time to the server, for every batch of a bridge process."""

    def __init__(self, stub: Callable[[], events_pb2_grpc.BridgeIngestAsyncStub]) -> None:
        self._stub = stub
        self._stream: _Stream | None = None
        self._ids = itertools.count(1)

    def exchange(
        self, request: pb.GatheredRequest, seconds: float
    ) -> Coroutine[Any, Any, pb.GatheredResponse]:
        """The answer to one batch (raises grpc.aio.AioRpcError as its call would)."""
        stream = self._stream
        if stream is None or stream.over:
            stream = self._stream = _Stream(self._stub().StreamGathered())
        return stream.exchange(request, next(self._ids), seconds)
