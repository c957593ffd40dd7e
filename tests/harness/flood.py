"""A flooding caller, as its own process: ``python -m tests.harness.flood TARGET KEY SECONDS N``.

N concurrent grpc.aio callers send 10-event CreateEvents calls back to back with one key
until SECONDS have passed, then print how the calls ended as JSON ({code: count}). A
line "ready" comes first, once the process is up and connected, right before the flood.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

import grpc

from events_server.pb import events_pb2 as pb
from events_server.pb import events_pb2_grpc


async def flood(target: str, key: str, seconds: float, callers: int) -> dict[str, int]:
    """Send until the time is up; the count of calls by status code."""
    request = pb.CreateEventsRequest(
        events=[
            pb.Event(tenant="shop-a", market="us", type=pb.EVENT_TYPE_CLICK, user_id=f"f{n}")
            for n in range(10)
        ]
    )
    codes: dict[str, int] = {}
    async with grpc.aio.insecure_channel(target) as channel:
        stub = events_pb2_grpc.EventsServiceStub(channel)
        await channel.channel_ready()
        # Started and connected: what comes next is the flood itself.
        print("ready", flush=True)
        end = time.monotonic() + seconds

        async def caller() -> None:
            while time.monotonic() < end:
                try:
                    await stub.CreateEvents(request, metadata=(("x-api-key", key),), timeout=5)
                    code = "OK"
                except grpc.aio.AioRpcError as error:
                    code = error.code().name
                codes[code] = codes.get(code, 0) + 1

        await asyncio.gather(*(caller() for _ in range(callers)))
    return codes


if __name__ == "__main__":
    target, key, seconds, callers = sys.argv[1:5]
    print(json.dumps(asyncio.run(flood(target, key, float(seconds), int(callers)))), flush=True)
