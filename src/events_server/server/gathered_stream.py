"""BridgeIngest.StreamGathered: the bridge's gathered calls as batches on one long-lived stream.

grpc.aio charges a unary call ~200 µs of server CPU here, a message on an open stream
about half of that: so the bridge keeps one stream per channel open and sends each batch
(what CreateEventsGathered would carry) as a message of it, named by its ``call_id``.

Each batch is worked as a CreateEventsGathered call is (``GatheredService.serve``: its
turn, its sub-requests' passages, one store append, an answer per sub-request), in a task
of its own, so that batches overlap as calls do; its answer goes back as soon as it is done,
answers may pass each other. A failure of the whole batch (no turn came, its deadline
passed) is its answer's ``code``, ``details`` and ``trailers``, what the call would have
ended with; the stream goes on. Its ``timeout_us`` is the call's deadline: the batch is
cancelled when it passes, as grpc.aio cancels a call's handler.

Bounded: at most ``STREAM_BATCHES`` batches of a stream are worked at once; past it the
stream is not read, so HTTP/2's flow control holds the bridge's writes (no queue here).

Counted as the calls they stand for: each batch is one ``GATHERED_METHOD`` in the call
metrics and an access line of that name (the stream itself gets its own when it ends), and
each sub-request its own line, as on a call.

Draining (``drain``, at shutdown): every stream is told (``draining``) to take no more
batches; the bridge half-closes it, the batches read are finished and answered, and the
stream ends; the bridge's later batches go on a new stream, which the stopping server
refuses as it refuses new calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any, Protocol

import grpc

from events_server.ops.access_log import AccessLog
from events_server.ops.logs import IpMode, client_ip_for_log
from events_server.pb import events_pb2 as pb
from events_server.server import identity
from events_server.server.access import access_line
from events_server.server.errors import IngestError
from events_server.server.gathered import (
    GatheredService,
    decode,
    trailer_messages,
    whole_call_failed,
)
from events_server.server.metrics import ServerMetrics
from events_server.server.passage import client_ip
from events_server.wire.metadata import GATHERED_METHOD, GATHERED_STREAM_METHOD

log = logging.getLogger(__name__)

STREAM_BATCHES = 32
"""Batches of one stream worked at once (the bridge has at most its max_calls plus 16
stalled ones out by default)."""

Context = grpc.aio.ServicerContext[Any, Any]


class Answers(Protocol):
    """Where a batch's answer goes: a stream, or a batch link (server.batch_link)."""

    async def write(self, response: pb.GatheredResponse) -> None: ...


class _Stream:
    """One open StreamGathered: its answers written one at a time."""

    def __init__(self, context: Context) -> None:
        self.context = context
        self.lock = asyncio.Lock()  # grpc.aio: one write at a time
        self.draining = False

    async def write(self, response: pb.GatheredResponse) -> None:
        async with self.lock:
            await self.context.write(response)


class GatheredStreams:
    """Serves BridgeIngest.StreamGathered with GatheredService's steps."""

    def __init__(
        self, gathered: GatheredService, metrics: ServerMetrics, ip_mode: IpMode, access: AccessLog
    ) -> None:
        self._gathered = gathered
        self._access = access
        self._metrics = metrics
        self._ip_mode = ip_mode
        self._open: set[_Stream] = set()
        self._telling: set[asyncio.Task[None]] = set()
        self.working = 0
        """Batches being worked now, on every stream."""
        self._draining = False

    async def StreamGathered(self, requests: object, context: Context) -> None:
        """Read batches, work each in a task, write each answer once it is done."""
        caller = identity.current.get()
        if caller is None or not caller.bridge:  # the access interceptor refused it already
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{GATHERED_STREAM_METHOD} is for the REST bridge only, and this caller is not it",
            )
        # At once: the bridge writes its first batch once it knows the stream is taken (a
        # server without the method answers UNIMPLEMENTED instead).
        await context.send_initial_metadata(())
        stream = _Stream(context)
        peer = context.peer()
        client = client_ip_for_log(client_ip({}, peer, 0), self._ip_mode)
        slots = asyncio.Semaphore(STREAM_BATCHES)
        working: set[asyncio.Task[None]] = set()
        loop = asyncio.get_running_loop()
        self._open.add(stream)
        try:
            if self._draining:
                await self._tell_draining(stream)
            while True:
                await slots.acquire()  # back-pressure: past the bound, nothing is read
                raw = await context.read()
                if raw is grpc.aio.EOF:
                    break
                assert isinstance(raw, bytes)
                try:
                    batch = decode(raw)
                except IngestError as error:  # not from our bridge: the stream ends
                    code, message, _ = whole_call_failed(error)
                    await context.abort(code, message)
                task = loop.create_task(self.work_batch(stream, batch, peer, client))
                working.add(task)
                self.working += 1
                task.add_done_callback(lambda done: self._done(done, working, slots))
            if working:  # half-closed: what was read is still answered
                await asyncio.gather(*working)
        finally:
            self._open.discard(stream)
            for task in working:  # the stream is gone (or the server stops): so are they
                task.cancel()

    def _done(
        self, task: asyncio.Task[None], working: set[asyncio.Task[None]], slots: asyncio.Semaphore
    ) -> None:
        working.discard(task)
        self.working -= 1
        slots.release()

    async def work_batch(
        self, stream: Answers, batch: pb.GatheredRequest, peer: str, client: str
    ) -> None:
        """Work one batch and write its answer (its metrics and access line as a call's)."""
        started = time.perf_counter()
        code = grpc.StatusCode.CANCELLED
        try:
            code, response = await self._work(batch, peer)
            response.call_id = batch.call_id
            try:
                await stream.write(response)
            except Exception:  # the stream is broken: the bridge fails the batch itself
                code = grpc.StatusCode.UNAVAILABLE
        finally:
            seconds = time.perf_counter() - started
            self._metrics.observe_rpc(GATHERED_METHOD, code.name, seconds)
            if self._access.wanted(logging.INFO, code is grpc.StatusCode.OK):
                access_line(
                    self._access,
                    logging.INFO,
                    GATHERED_METHOD,
                    code,
                    seconds=seconds,
                    events=None,
                    response=None,
                    metadata={},
                    client=client,
                    call_id=batch.call_id,
                )

    async def _work(
        self, batch: pb.GatheredRequest, peer: str
    ) -> tuple[grpc.StatusCode, pb.GatheredResponse]:
        """The batch's answer, or the status of its failure as a whole."""
        try:
            seconds = batch.timeout_us / 1e6 if batch.timeout_us else None
            return grpc.StatusCode.OK, await self._gathered.serve(batch, peer, seconds)
        except IngestError as error:
            code, message, trailers = whole_call_failed(error)
            details, more = message, trailer_messages(trailers)
        except TimeoutError:
            code, details, more = grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded", []
        except Exception:  # a bug: answered as grpc.aio answers a handler that raised
            log.exception("%s: a batch failed", GATHERED_STREAM_METHOD)
            code, details, more = grpc.StatusCode.UNKNOWN, "Unexpected error in a batch", []
        return code, pb.GatheredResponse(code=code.value[0], details=details, trailers=more)

    def drain(self) -> None:
        """Tell every open stream to take no more batches (the server is stopping); not
        waited for: a stream the bridge does not read must not hold the shutdown up."""
        self._draining = True
        for stream in list(self._open):
            task = asyncio.get_running_loop().create_task(self._tell_draining(stream))
            self._telling.add(task)
            task.add_done_callback(self._telling.discard)

    @staticmethod
    async def _tell_draining(stream: _Stream) -> None:
        if not stream.draining:
            stream.draining = True
            with contextlib.suppress(Exception):  # a broken stream needs no telling
                await stream.write(pb.GatheredResponse(draining=True))
