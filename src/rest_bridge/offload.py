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
(rest_bridge.validation).

So a body of at most INLINE_MAX_BYTES and INLINE_MAX_COMMAS (a beacon, a batch of a
few events) is parsed on the loop, at most ~2 ms; so is one of at most
VALID_INLINE_MAX_COMMAS that is valid (checked at a bounded cost). Any other goes to one
of ``parse_processes`` worker processes (validation.validate_large_body: the events counted
first, the errors capped), and only its result comes back: the serialized events, or
the refusal and the tenants it names. Each contract gives its own Rules (its validation
on the loop and in a worker); the v2 contract's (rest_bridge.validation_v2) has no
``quick`` step: its bodies are beacons. Handing a body to a worker costs the loop ~0.6 ms
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
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Generic, TypeVar

from rest_bridge.config import BridgeSettings
from rest_bridge.responses import Reply, json_reply

log = logging.getLogger(__name__)

INLINE_MAX_BYTES = 64 * 1024
INLINE_MAX_COMMAS = 256
"""A body within both is parsed on the event loop, whatever it holds: at ~8 µs per comma
of the worst invalid body (empty objects, three errors each), about 2 ms at most."""

VALID_INLINE_MAX_COMMAS = 4096
"""A larger body of at most this many commas is validated on the event loop too, by
pydantic stopping at its first invalid event (validation.valid_events): ~2 ms when valid
(a benchmark body of 100 events has ~1,900 commas, 215 of them ~4,000), at most ~3 ms
when not (one event of 4,090 bad variant ids). Only an invalid one goes to a worker for
its 422."""

MAX_QUEUED_PER_PROCESS = 64
"""Bodies waiting for (or in) each parse process; past that a large body is answered 503."""

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)

WorkerResult = bytes | tuple[Reply, list[str]]
"""From a worker: the serialized request, or the reply refusing the body and the tenants it
names (for its rejected-request record)."""


@dataclass(frozen=True, slots=True)
class Rules(Generic[T_co]):
    """How one contract's bodies are validated: ``T_co`` is what a valid body becomes."""

    inline: Callable[[bytes, int, int], T_co | Reply]
    """(body, max_depth, max_events): a body cheap enough for the event loop."""
    in_worker: Callable[[bytes, int, int], WorkerResult]
    """The same for any body, in a worker process (a module-level function: pickled by name)."""
    decode: Callable[[bytes], T_co]
    """A worker's serialized request back into ``T_co``."""
    quick: Callable[[bytes, int], T_co | Reply | None] | None = None
    """(body, max_events): a bounded try on the loop at a larger body, None when it is not
    valid (then a worker answers it)."""


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

    def parse_inline(self, body: bytes, rules: Rules[T]) -> T | Reply | None:
        """What ``parse`` gives a body cheap enough for the event loop, without a coroutine
        (one per WebSocket frame); None for any other body."""
        if self.parses_inline(body):
            return rules.inline(body, self._max_depth, self._max_events)
        return None

    async def parse(self, body: bytes, rules: Rules[T]) -> tuple[T | Reply, list[str] | None]:
        """What the body becomes by ``rules``, or the reply refusing it and (when known) the
        tenants it names."""
        if self.parses_inline(body):
            return rules.inline(body, self._max_depth, self._max_events), None
        if self._processes and rules.quick and body.count(b",") <= VALID_INLINE_MAX_COMMAS:
            quick = rules.quick(body, self._max_events)
            if quick is not None:
                return quick, None
        if self._queued >= self._max_queued:
            why = f"{self._queued} large bodies are being parsed already: retry shortly"
            return _busy(why, self._retry_after), None
        self._queued += 1
        try:
            result = await asyncio.get_running_loop().run_in_executor(
                self._executor(), rules.in_worker, body, self._max_depth, self._max_events
            )
        except BrokenProcessPool:
            # A worker died (killed, out of memory): the next body gets a new pool.
            log.error("a body-parsing process died; starting new ones")
            self.close(wait=False)
            return _busy("the body could not be parsed: retry", self._retry_after), None
        finally:
            self._queued -= 1
        if isinstance(result, bytes):
            return rules.decode(result), None
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
