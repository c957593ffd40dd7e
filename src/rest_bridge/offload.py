"""Where a request body is parsed: on the event loop when that is cheap, else in a worker process.

Parsing and validating hold the event loop for as long as they take, and no thread can
take that work off it: orjson, the json module and pydantic-core all keep the GIL
throughout a call (a 25 ms orjson.loads run in a thread stalled the loop 25 ms; only
zlib, which inflates gzip bodies, lets go of it). Measured on the 2-core box of
docs/performance.md, a body costs about 0.5 µs per comma when it is valid and up to
8 µs per comma when it is not (each error is built by pydantic's JSON pass, again by
the stdlib pass that gives FastAPI's exact 422, then as a dict): 0.9 ms for a valid
100-event body, 8 ms for 500 events, 31 ms for a valid 1 MiB one of 330,000 short
strings, 12 s for 1 MiB of empty objects before the count and the error cap
(rest_bridge.ingest).

So a body of at most INLINE_MAX_BYTES and INLINE_MAX_COMMAS (a beacon, a batch of a
few events) is parsed on the loop, at most ~2 ms; so is one of at most
VALID_INLINE_MAX_COMMAS that is valid (checked at a bounded cost). Any other goes to one
of ``parse_processes`` worker processes (ingest.validate_large_body: the events counted
first, the errors capped), and only its result comes back: the serialized events, or
the refusal and the tenants it names. Handing a body to a worker costs the loop ~0.6 ms
for 100 events, ~1.7 ms for 500 (the executor's threads, pickling, rebuilding the
protobuf events): worth it only for the bodies that would cost more.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import signal
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from events_server.pb import events_pb2 as pb
from rest_bridge.config import BridgeSettings
from rest_bridge.ingest import accepted_events, valid_events, validate_body, validate_large_body
from rest_bridge.responses import Reply, json_reply

log = logging.getLogger(__name__)

INLINE_MAX_BYTES = 64 * 1024
INLINE_MAX_COMMAS = 256
"""A body within both is parsed on the event loop, whatever it holds: at ~8 µs per comma
of the worst invalid body (empty objects, three errors each), about 2 ms at most."""

VALID_INLINE_MAX_COMMAS = 4096
"""A larger body of at most this many commas is validated on the event loop too, by
pydantic stopping at its first invalid event (ingest.valid_events): ~2 ms when valid
(a benchmark body of 100 events has ~1,900 commas, 215 of them ~4,000), at most ~3 ms
when not (one event of 4,090 bad variant ids). Only an invalid one goes to a worker for
its 422."""

MAX_QUEUED_PER_PROCESS = 64
"""Bodies waiting for (or in) each parse process; past that a large body is answered 503."""

Parsed = tuple[list[pb.Event] | Reply, list[str] | None]
"""The events, or the reply refusing them and (when known) the tenants the body names."""


ORPHAN_CHECK_SECONDS = 1.0


def _worker_started(bridge_pid: int, niceness: int) -> None:
    """In each worker process, first: it lives no longer than the bridge process."""
    # Ctrl-C reaches the whole process group: the bridge shuts its workers down itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if niceness:
        os.nice(niceness)

    # A bridge killed outright (SIGKILL, OOM) cannot: a worker waits on a queue whose
    # writing end it holds itself, so it would wait forever. It leaves once orphaned.
    def leave_when_orphaned() -> None:
        while os.getppid() == bridge_pid:
            time.sleep(ORPHAN_CHECK_SECONDS)
        os._exit(0)

    threading.Thread(target=leave_when_orphaned, daemon=True).start()


def parse_in_worker(
    body: bytes, max_depth: int, max_events: int
) -> bytes | tuple[Reply, list[str]]:
    """In a worker process: the body's events as a serialized CreateEventsRequest, or the
    reply refusing it and the tenants it names (for its rejected-request record)."""
    result, tenants = validate_large_body(body, max_depth, max_events)
    if isinstance(result, Reply):
        return result, tenants
    return pb.CreateEventsRequest(events=result).SerializeToString()


def _busy(why: str, retry_after: int) -> Reply:
    return json_reply(503, {"detail": why}, {"Retry-After": str(retry_after)})


class BodyParser:
    """Parses request bodies, the large ones in worker processes started on first need."""

    def __init__(self, settings: BridgeSettings, niceness: int = 0) -> None:
        self._niceness = niceness
        """Added to the workers' niceness: work they may yield to the event loop."""
        self._processes = settings.parse_processes
        self._max_depth = settings.max_json_depth
        self._max_events = settings.max_events_per_request
        self._retry_after = settings.retry_after_seconds
        self._max_queued = MAX_QUEUED_PER_PROCESS * self._processes
        self._queued = 0
        self._pool: ProcessPoolExecutor | None = None

    def parses_inline(self, body: bytes) -> bool:
        """Whether ``body`` is cheap enough to parse on the event loop."""
        return self._processes == 0 or (
            len(body) <= INLINE_MAX_BYTES and body.count(b",") <= INLINE_MAX_COMMAS
        )

    async def parse(self, body: bytes) -> Parsed:
        """The body's events, or the reply refusing them."""
        if self.parses_inline(body):
            return validate_body(body, self._max_depth, self._max_events), None
        if self._processes and body.count(b",") <= VALID_INLINE_MAX_COMMAS:
            events = valid_events(body)
            if events is not None:
                return accepted_events(events, self._max_events), None
        if self._queued >= self._max_queued:
            why = f"{self._queued} large bodies are being parsed already: retry shortly"
            return _busy(why, self._retry_after), None
        self._queued += 1
        try:
            result = await asyncio.get_running_loop().run_in_executor(
                self._executor(), parse_in_worker, body, self._max_depth, self._max_events
            )
        except BrokenProcessPool:
            # A worker died (killed, out of memory): the next body gets a new pool.
            log.error("a body-parsing process died; starting new ones")
            self.close(wait=False)
            return _busy("the body could not be parsed: retry", self._retry_after), None
        finally:
            self._queued -= 1
        if isinstance(result, bytes):
            return list(pb.CreateEventsRequest.FromString(result).events), None
        return result

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            # Spawned, not forked: the bridge holds a gRPC channel, which a fork breaks.
            self._pool = ProcessPoolExecutor(
                self._processes,
                multiprocessing.get_context("spawn"),
                initializer=_worker_started,
                initargs=(os.getpid(), self._niceness),
            )
        return self._pool

    def close(self, wait: bool = True) -> None:
        """Stop the worker processes (at shutdown, once no request is left: a body still
        being parsed is waited for)."""
        if self._pool is not None:
            self._pool.shutdown(wait=wait, cancel_futures=True)
            self._pool = None
