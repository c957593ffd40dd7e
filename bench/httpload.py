"""E's load generator: one-event POSTs at a fixed rate (open loop), on raw sockets.

python -m bench.httpload URL API_KEY --rate 1500 --seconds 12 --warmup 2 [--connections 64]

wrk only keeps a number of requests in flight (closed loop), and Debian has no wrk2,
so the open-loop phase has its own generator, lean like bench.wsload, and built as wrk2
is: asyncio protocols on uvloop over a fixed pool of keep-alive connections (--connections,
all opened before the first request), bodies from bench.workload's precomputed events. A due
request goes out on the connection free the longest (round robin, so none sits idle long
enough for the bridge's keep-alive timeout to close it); when every one is busy, it waits
for the first to free up. A request's latency counts from when it was due, so a stall,
and the wait for a connection behind it, is charged to every request behind it. Every
request due in the window is in the percentiles; one not answered by the end of the
drain is an error.

The pool does not grow while the service is slow: a generator that opened a connection
for each waiting request (as this one did until 2026-12) turned a few milliseconds'
hiccup into a burst of a hundred connections opened at once, whose set-up cost (in both
processes) then made the stall it was reacting to; clients of a real service do not open
connections in step with its hiccups. A connection the bridge closes is opened again.

It reports as bench.window says.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections import deque
from typing import cast
from urllib.parse import urlsplit

from bench.window import LoadResult, Window, no_delay, run_and_report
from bench.workload import Batches

TICK_SECONDS = 0.001
"""The shortest sleep: a request may go out up to this late, which its latency includes."""
DRAIN_SECONDS = 10.0
"""After the window, how long the requests still out may take to be answered."""


class Load(Window):
    """The schedule, the connections, and what came back."""

    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(args.warmup, args.seconds)
        self.args = args
        url = urlsplit(args.url)
        self.host, self.port = url.hostname or "127.0.0.1", url.port or 80
        self.head = (
            f"POST /create-events HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"X-API-KEY: {args.api_key}\r\nContent-Type: application/json\r\n"
        ).encode()
        self.batches = Batches(args.seed, 0)
        self.backlog: deque[float] = deque()
        """Due times of requests waiting for a connection."""
        self.idle: deque[Connection] = deque()
        """Free connections, the one free the longest first."""
        self.connections = 0
        """Open or opening."""
        self.out = 0
        """Requests sent and not answered."""
        self.opening: set[asyncio.Task[None]] = set()
        self.closing = False
        """Set once the run is over: connections closed then are not opened again."""
        self.drained = asyncio.get_running_loop().create_future()

    def request(self) -> bytes:
        body = self.batches.json_body(1)
        return self.head + b"Content-Length: %d\r\n\r\n" % len(body) + body

    def due(self, at: float) -> None:
        self.backlog.append(at)
        self.pump()

    def pump(self) -> None:
        """Put waiting requests on free connections, the one free the longest first."""
        while self.backlog and self.idle:
            self.idle.popleft().send(self.backlog.popleft())

    def reopen(self) -> None:
        """Open a connection in place of one the bridge closed, until the run closes them."""
        if self.closing:
            return
        self.connections += 1
        task = asyncio.get_running_loop().create_task(self.open())
        self.opening.add(task)  # the loop keeps only a weak reference to a task
        task.add_done_callback(self.opening.discard)

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.create_connection(lambda: Connection(self), self.host, self.port)
        except OSError as error:
            self.connections -= 1
            self.result.error(f"connect: {type(error).__name__}")

    def answered(self, due: float, status: int) -> None:
        self.out -= 1
        if self.measure_from <= due < self.stop:
            if status == 200:
                self.result.requests += 1
                self.result.latencies.append(time.monotonic() - due)
            else:
                self.result.error(f"HTTP {status}")
        finished = self.out == 0 and not self.backlog and time.monotonic() >= self.stop
        if finished and not self.drained.done():
            self.drained.set_result(None)


class Connection(asyncio.Protocol):
    """One keep-alive connection, one request out at a time."""

    def __init__(self, load: Load) -> None:
        self.load = load
        self.transport: asyncio.Transport | None = None
        self.due: float | None = None
        self.buffer = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, but are one.
        self.transport = cast(asyncio.Transport, transport)
        no_delay(transport)
        self.load.idle.append(self)
        self.load.pump()

    def send(self, due: float) -> None:
        assert self.transport is not None
        self.due = due
        self.load.out += 1
        self.transport.write(self.load.request())

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0 or self.due is None:
            return
        head = self.buffer[:end].split(b"\r\n")
        length = 0
        for line in head[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if len(self.buffer) < end + 4 + length:
            return
        self.buffer = self.buffer[end + 4 + length :]
        due, self.due = self.due, None
        self.load.answered(due, int(head[0].split(b" ", 2)[1]))
        self.load.idle.append(self)
        self.load.pump()

    def connection_lost(self, exc: Exception | None) -> None:
        load = self.load
        load.connections -= 1
        if self in load.idle:
            load.idle.remove(self)
        if self.due is not None:
            # The server closed this keep-alive connection as the request went out (its
            # idle timeout) without answering: the request is sent again, still due then.
            load.out -= 1
            if self.buffer:
                load.result.error("connection closed mid-answer")
            else:
                load.backlog.appendleft(self.due)
            self.due = None
        load.reopen()


async def run(args: argparse.Namespace) -> LoadResult:
    """Send on schedule through the window, drain, and report."""
    load = Load(args)
    loop = asyncio.get_running_loop()
    for _ in range(args.connections):
        load.connections += 1
        await loop.create_connection(lambda: Connection(load), load.host, load.port)
    load.announce()
    interval = 1.0 / args.rate
    due = time.monotonic()
    while due < load.stop:
        now = time.monotonic()
        if due > now:
            # uvloop's timers count whole milliseconds: a shorter sleep would spin.
            await asyncio.sleep(max(due - now, TICK_SECONDS))
            now = time.monotonic()
        while due <= now and due < load.stop:  # catch up after a late wake-up, in order
            load.due(due)
            due += interval
    await load.until_stop()
    if load.out or load.backlog:
        try:
            await asyncio.wait_for(asyncio.shield(load.drained), DRAIN_SECONDS)
        except TimeoutError:
            load.result.errors["unanswered"] = load.out + len(load.backlog)
    load.closing = True
    for conn in list(load.idle):
        if conn.transport is not None:
            conn.transport.close()
    return load.result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("url", help="the bridge, http://host:port")
    parser.add_argument("api_key")
    parser.add_argument("--rate", type=float, required=True, help="requests per second")
    parser.add_argument("--seconds", type=float, default=12.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument(
        "--connections", type=int, default=64, help="the pool, opened before the first request"
    )
    parser.add_argument("--seed", type=int, default=1)
    return run_and_report(run(parser.parse_args()))


if __name__ == "__main__":
    raise SystemExit(main())
