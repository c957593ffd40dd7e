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
from redis.asyncio import Redis

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

    kind: str  # "script" | "grpc" | "http" (WebSockets: bench.wsload)
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


SENDERS = {
    "script": _script_sender,
    "grpc": _grpc_sender,
    "http": _http_sender,
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
