"""What observability costs per request: metrics updates, the access wrappers, a JSON log line.

The wrappers are measured at WARNING (no line), at INFO writing every line and at INFO with
the default sample (one successful line in a hundred); then one line alone, written the
generic way (Logger.log) and the access writer's way.

python -m bench.overhead   (a few seconds; prints microseconds per call)

In-process micro-benchmarks of our own code only, so they are steady on a busy
machine where the end-to-end `make bench` figures move by ±20 % from run to run.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import grpc

from events_server.ops.access_log import AccessLog
from events_server.ops.logs import JsonFormatter, request_id
from events_server.pb import events_pb2 as pb
from events_server.server.access import ACCESS_LOGGER, AccessInterceptor
from events_server.server.metrics import ServerMetrics
from rest_bridge.access import AccessMiddleware
from rest_bridge.metrics import BridgeMetrics

ROUNDS = 20_000
ACCEPTED = pb.EventResult.STATUS_ACCEPTED
DUPLICATE = pb.EventResult.STATUS_DUPLICATE


def per_call_us(fn: Callable[[], object], rounds: int = ROUNDS) -> float:
    """Microseconds of CPU per call of fn (best of five runs; CPU time, steadier than the
    clock on a busy box)."""
    best = float("inf")
    for _ in range(5):
        started = time.process_time()
        for _ in range(rounds):
            fn()
        best = min(best, (time.process_time() - started) / rounds)
    return best * 1e6


def per_await_us(make: Callable[[], Any], rounds: int = ROUNDS) -> float:
    """Microseconds of CPU per awaited coroutine made by make() (best of five runs)."""

    async def loop() -> float:
        best = float("inf")
        for _ in range(5):
            started = time.process_time()
            for _ in range(rounds):
                await make()
            best = min(best, (time.process_time() - started) / rounds)
        return best

    return asyncio.run(loop()) * 1e6


class Context:
    """Just enough of a servicer context for the interceptor's wrapper (benchmark only)."""

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return (("x-request-id", "bench-1"), ("x-forwarded-for", "203.0.113.9"))

    def peer(self) -> str:
        return "ipv4:127.0.0.1:5000"

    def code(self) -> None:
        return None


BRIDGE_FIELDS = {
    "method": "POST",
    "path": "/create-events",
    "status": 200,
    "duration_ms": 1.234,
    "client_ip": "203.0.113.0",
    "query": "api_key=[REDACTED]",
}


def line_rows() -> list[tuple[str, float]]:
    """One bridge access line, as Logger.log wrote it and as AccessLog writes it, through a
    JsonFormatter handler writing to a file (the request id set, as in a request)."""
    logger = logging.getLogger("bench.overhead.line")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    access = AccessLog(logger.name, 1.0)
    token = request_id.set("0123456789abcdef0123456789abcdef")
    try:
        with tempfile.TemporaryFile("w") as out:
            sink = logging.StreamHandler(out)
            sink.setFormatter(JsonFormatter())
            logger.addHandler(sink)
            fields = BRIDGE_FIELDS
            generic = per_call_us(
                lambda: logger.log(
                    logging.INFO, "%s %s %d", "POST", "/create-events", 200, extra=fields
                )
            )
            own = per_call_us(lambda: access.write(logging.INFO, "POST /create-events 200", fields))
            logger.removeHandler(sink)
    finally:
        request_id.reset(token)
    return [
        ("one access line: Logger.log + JsonFormatter", generic),
        ("one access line: AccessLog.write + JsonFormatter", own),
    ]


def main() -> None:
    """Print the figures."""
    page_view = pb.EVENT_TYPE_PAGE_VIEW
    events = pb.CreateEventsRequest(
        events=[pb.Event(tenant=f"t{i % 3}", market="us", type=page_view) for i in range(100)]
    ).events
    accepted = pb.CreateEventsResponse(
        accepted=100, results=[pb.EventResult(status=ACCEPTED, entry_id="1-1")] * 100
    )
    mixed = pb.CreateEventsResponse(
        accepted=99,
        duplicates=1,
        results=[pb.EventResult(status=ACCEPTED, entry_id="1-1")] * 99
        + [pb.EventResult(status=DUPLICATE, entry_id="1-1")],
    )
    server = ServerMetrics(100)
    rows = [
        (
            "count_events, 100 events, one outcome",
            per_call_us(lambda: server.count_events(events, accepted), 2000),
        ),
        (
            "count_events, 100 events, mixed outcomes",
            per_call_us(lambda: server.count_events(events, mixed), 2000),
        ),
        (
            "observe_rpc (counter + histogram)",
            per_call_us(lambda: server.observe_rpc("/m", "OK", 0.001)),
        ),
        ("observe_script (histogram)", per_call_us(lambda: server.observe_script(0.001))),
    ]

    async def reply(request: object, context: object) -> object:
        return accepted

    handler: Any = grpc.unary_unary_rpc_method_handler(reply)

    def intercepted(interceptor: AccessInterceptor) -> Any:
        async def wrapped() -> Any:
            async def continuation(_: object) -> Any:
                return handler

            method = "/events.v1.EventsService/CreateEvents"
            details: Any = type("Details", (), {"method": method})()
            return await interceptor.intercept_service(continuation, details)

        return asyncio.run(wrapped()).unary_unary

    request = pb.CreateEventsRequest()
    context = Context()

    async def app(scope: object, receive: object, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    middleware = AccessMiddleware(app, BridgeMetrics(), "truncated", routes=("/create-events",))
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/create-events",
        "query_string": b"api_key=secret&x=1",
        "headers": [(b"x-request-id", b"bench-1")],
        "client": ("203.0.113.9", 5000),
    }

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def send(message: object) -> None:
        return None

    # A file, as stderr is to a collector: a write (and flush) per line.
    with tempfile.TemporaryFile("w") as out:
        sink = logging.StreamHandler(out)
        sink.setFormatter(JsonFormatter())
        for name in ("events_server.access", "rest_bridge.access"):
            logging.getLogger(name).addHandler(sink)
            logging.getLogger(name).propagate = False
        for level, sample in ((logging.WARNING, 1.0), (logging.INFO, 1.0), (logging.INFO, 0.01)):
            for name in ("events_server.access", "rest_bridge.access"):
                logging.getLogger(name).setLevel(level)
            label = f"log level {logging.getLevelName(level)}, sample {sample:g}"
            access = AccessLog(ACCESS_LOGGER, sample)
            observed = intercepted(AccessInterceptor(server, "truncated", 0, access=access))
            middleware = AccessMiddleware(
                app, BridgeMetrics(), "truncated", routes=("/create-events",), sample=sample
            )
            rows.append(
                (
                    f"gRPC interceptor wrapper, {label}",
                    per_await_us(partial(observed, request, context)),
                )
            )
            rows.append(
                (
                    f"ASGI access middleware, {label}",
                    per_await_us(partial(middleware, scope, receive, send)),
                )
            )
        rows.extend(line_rows())

    print(f"{'what':64} {'us/call':>8}")
    for what, us in rows:
        print(f"{what:64} {us:8.1f}")


if __name__ == "__main__":
    main()
