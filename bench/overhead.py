"""What observability costs per request: metrics updates, the access wrappers, a JSON log line.

python -m bench.overhead   (a few seconds; prints microseconds per call)

In-process micro-benchmarks of our own code only, so they are steady on a busy
machine where the end-to-end `make bench` figures move by ±20 % from run to run.
"""

from __future__ import annotations

import asyncio
import io
import logging
import time
from collections.abc import Callable
from typing import Any

import grpc

from events_server.ops.logs import JsonFormatter
from events_server.pb import events_pb2 as pb
from events_server.server.access import AccessInterceptor
from events_server.server.metrics import ServerMetrics
from rest_bridge.access import AccessMiddleware
from rest_bridge.metrics import BridgeMetrics

ROUNDS = 20_000
ACCEPTED = pb.EventResult.STATUS_ACCEPTED
DUPLICATE = pb.EventResult.STATUS_DUPLICATE


def per_call_us(fn: Callable[[], object], rounds: int = ROUNDS) -> float:
    """Microseconds per call of fn (best of three runs)."""
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        for _ in range(rounds):
            fn()
        best = min(best, (time.perf_counter() - started) / rounds)
    return best * 1e6


def per_await_us(make: Callable[[], Any], rounds: int = ROUNDS) -> float:
    """Microseconds per awaited coroutine made by make() (best of three runs)."""

    async def loop() -> float:
        best = float("inf")
        for _ in range(3):
            started = time.perf_counter()
            for _ in range(rounds):
                await make()
            best = min(best, (time.perf_counter() - started) / rounds)
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
    interceptor = AccessInterceptor(server, "truncated", 0)

    async def wrapped() -> Any:
        async def continuation(_: object) -> Any:
            return handler

        details: Any = type("Details", (), {"method": "/events.v1.EventsService/CreateEvents"})()
        return await interceptor.intercept_service(continuation, details)

    observed = asyncio.run(wrapped()).unary_unary
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

    sink = logging.StreamHandler(io.StringIO())
    sink.setFormatter(JsonFormatter())
    for name in ("events_server.access", "rest_bridge.access"):
        logging.getLogger(name).addHandler(sink)
        logging.getLogger(name).propagate = False
    for level in (logging.WARNING, logging.INFO):
        for name in ("events_server.access", "rest_bridge.access"):
            logging.getLogger(name).setLevel(level)
        label = logging.getLevelName(level)
        rows.append(
            (
                f"gRPC interceptor wrapper, log level {label}",
                per_await_us(lambda: observed(request, context)),
            )
        )
        rows.append(
            (
                f"ASGI access middleware, log level {label}",
                per_await_us(lambda: middleware(scope, receive, send)),
            )
        )

    print(f"{'what':50} {'us/call':>8}")
    for what, us in rows:
        print(f"{what:50} {us:8.1f}")


if __name__ == "__main__":
    main()
