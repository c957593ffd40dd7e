"""The load generator: one asyncio process per core-share, fixed concurrency or fixed rate.

Each process reports what it sent, what came back, every latency, and the CPU
it used itself, so the orchestrator can add processes up honestly.
"""

from __future__ import annotations

import asyncio
import resource
import time
from dataclasses import dataclass, field
from typing import Any

import grpc
import orjson
from redis.asyncio import Redis
from websockets.asyncio.client import connect as ws_connect

from bench.workload import DEDUP_FIELD, Batches
from events_server.pb import events_pb2 as pb
from events_server.queue.keys import KeySpace
from events_server.server.routing import partition_for
from events_server.server.store import Item, store_for
from events_server.wire.codec import envelope_bytes, length_delimited

METHOD = "/events.v1.EventsService/CreateEvents"
REQUEST_TIMEOUT = 30.0


@dataclass
class Job:
    """What one load-generator process runs."""

    kind: str  # "script" | "grpc" | "http"
    target: str  # redis URL, grpc target, or http://host:port
    batch: int
    concurrency: int
    seconds: float
    warmup: float
    worker: int
    seed: int
    rate: float | None = None  # requests/s for open-loop latency runs
    partitions: int = 16
    key_prefix: str = "ev"
    api_key: str = ""
    in_flight: int = 1
    """WebSocket jobs: frames in flight per connection (``concurrency`` counts connections)."""


@dataclass
class Result:
    """What one process measured."""

    requests: int = 0
    events: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)
    seconds: float = 0.0
    cpu_seconds: float = 0.0


class HttpError(Exception):
    """A non-200 answer (the benchmark counts these by status)."""

    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"HTTP {status}: {body[:200]!r}")
        self.status = status


class HttpConnection:
    """A minimal HTTP/1.1 keep-alive client: the lightest Python client we can write."""

    def __init__(self, host: str, port: int, api_key: str) -> None:
        self.host, self.port, self.api_key = host, port, api_key
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        reused = self.writer is not None
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"X-API-KEY: {self.api_key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        self.writer.write(head + body)
        status_line = await self.reader.readline()
        if not status_line and reused:
            # The server closed this idle keep-alive connection before reading the
            # request (uvicorn's keep-alive timeout): it was never handled; resend.
            self.writer.close()
            self.writer = None
            return await self.post(path, body)
        status = int(status_line.split(b" ", 2)[1])
        length = 0
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            if name.lower() == b"content-length":
                length = int(value)
        return status, await self.reader.readexactly(length)


async def _script_sender(job: Job) -> Any:
    """Drives our dedup+enqueue script directly through EventStore: envelopes prebuilt."""
    redis = Redis.from_url(job.target)
    keys = KeySpace(job.key_prefix, job.partitions)
    store = store_for(redis, keys, 86_400)
    context = pb.Envelope(client_ip="127.0.0.1", user_agent="bench").SerializeToString()

    async def send(batches: Batches) -> int:
        items: list[Item] = []
        for index, dedup in batches.script_items(job.batch):
            event = batches.proto_events[index]
            payload = batches.proto_bytes[index]
            if dedup is not None:
                payload += length_delimited(DEDUP_FIELD, dedup)
            partition = partition_for(event, job.partitions)
            items.append(
                (
                    partition,
                    None if dedup is None else keys.dedup(partition, event.tenant, dedup.decode()),
                    envelope_bytes(payload, context),
                )
            )
        return len(await store.append(items))

    return send, redis.aclose


async def _grpc_sender(job: Job) -> Any:
    channel = grpc.aio.insecure_channel(job.target)
    call: Any = channel.unary_unary(
        METHOD, response_deserializer=pb.CreateEventsResponse.FromString
    )

    metadata = (("x-api-key", job.api_key),)

    async def send(batches: Batches) -> int:
        reply = await call(batches.grpc_body(job.batch), timeout=REQUEST_TIMEOUT, metadata=metadata)
        return int(reply.accepted + reply.duplicates)

    return send, channel.close


async def _http_sender(job: Job) -> Any:
    host, _, port = job.target.removeprefix("http://").partition(":")
    idle: list[HttpConnection] = []

    async def send(batches: Batches) -> int:
        conn = idle.pop() if idle else HttpConnection(host, int(port), job.api_key)
        status, body = await asyncio.wait_for(
            conn.post("/create-events", batches.json_body(job.batch)), REQUEST_TIMEOUT
        )
        idle.append(conn)
        if status != 200:
            raise HttpError(status, body)
        return job.batch

    async def close() -> None:
        for conn in idle:
            if conn.writer is not None:
                conn.writer.close()

    return send, close


class WsError(Exception):
    """A frame answered other than ``ok``."""


class WsConnection:
    """One WebSocket to /ws/create-events: frames out, answers matched to them by id."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.socket: Any = None
        self.waiting: dict[str, asyncio.Future[bytes]] = {}
        self.reader: asyncio.Task[None] | None = None
        self.opening: asyncio.Lock = asyncio.Lock()
        self.busy = 0

    async def _read(self) -> None:
        try:
            async for message in self.socket:
                answer = orjson.loads(message)
                future = self.waiting.pop(str(answer.get("id")), None)
                if future is not None and not future.done():
                    future.set_result(answer.get("status", "").encode())
        finally:
            for future in self.waiting.values():
                if not future.done():
                    future.set_exception(WsError("connection closed"))
            self.waiting.clear()
            self.socket = None

    async def send(self, frame_id: str, frame: bytes) -> None:
        async with self.opening:
            if self.socket is None:
                self.socket = await ws_connect(self.url, compression=None, max_size=2**20)
                self.reader = asyncio.create_task(self._read())
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.waiting[frame_id] = future
        await self.socket.send(frame.decode())
        status = await future
        if status != b"ok":
            raise WsError(status.decode())

    async def close(self) -> None:
        if self.socket is not None:
            await self.socket.close()
        if self.reader is not None:
            await asyncio.gather(self.reader, return_exceptions=True)


async def _ws_sender(job: Job) -> Any:
    url = job.target.replace("http://", "ws://") + f"/ws/create-events?api_key={job.api_key}"
    connections = [WsConnection(url) for _ in range(max(job.concurrency // job.in_flight, 1))]

    async def send(batches: Batches) -> int:
        # concurrency = connections x in_flight sender coroutines: taking the least busy
        # connection keeps each at in_flight frames out at most.
        conn = min(connections, key=lambda c: c.busy)
        conn.busy += 1
        try:
            frame_id, frame = batches.ws_frame()
            await asyncio.wait_for(conn.send(frame_id, frame), REQUEST_TIMEOUT)
        finally:
            conn.busy -= 1
        return 1

    async def close() -> None:
        await asyncio.gather(*(c.close() for c in connections), return_exceptions=True)

    return send, close


SENDERS = {
    "script": _script_sender,
    "grpc": _grpc_sender,
    "http": _http_sender,
    "ws": _ws_sender,
}


async def _run(job: Job) -> Result:
    send, close = await SENDERS[job.kind](job)
    batches = Batches(job.seed, job.worker)
    result = Result()
    start = time.monotonic()
    measure_from = start + job.warmup
    stop = measure_from + job.seconds

    async def one(scheduled: float) -> None:
        try:
            events = await send(batches)
        except Exception as exc:  # counted, not raised: a benchmark reports failures
            now = time.monotonic()
            if now >= measure_from:
                kind = type(exc).__name__ + (
                    f" {exc.code().name}" if isinstance(exc, grpc.aio.AioRpcError) else ""
                )
                result.errors[kind] = result.errors.get(kind, 0) + 1
            return
        now = time.monotonic()
        if scheduled >= measure_from and now <= stop + 5:
            result.requests += 1
            result.events += events
            result.latencies.append(now - scheduled)

    def cpu() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    async def cpu_at_start() -> float:
        await asyncio.sleep(max(measure_from - time.monotonic(), 0))
        return cpu()

    cpu_start = asyncio.create_task(cpu_at_start())
    if job.rate is None:

        async def closed_loop() -> None:
            while (now := time.monotonic()) < stop:
                await one(now)

        await asyncio.gather(*(closed_loop() for _ in range(job.concurrency)))
    else:
        # Open loop: latency counts from when a request was due, so a stall
        # delays (and is charged to) every request behind it.
        interval = 1.0 / job.rate
        tasks = set()
        due = start
        while due < stop:
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(one(due))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            due += interval
        await asyncio.gather(*tasks)
    result.cpu_seconds = cpu() - await cpu_start
    result.seconds = job.seconds
    await close()
    return result


def run_job(job: Job) -> Result:
    """Process entry point."""
    try:
        import uvloop  # noqa: PLC0415

        return uvloop.run(_run(job))
    except ImportError:
        return asyncio.run(_run(job))
