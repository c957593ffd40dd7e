"""The bridge's gatherer as the tests drive it directly: built as the bridge builds it, a
batch as the bridge sends one, and the drain of a stopping server under batches out
(test_gather_stream.py on the gRPC stream, test_batch_link.py on the batch link)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import grpc
import redis

from events_server.pb import events_pb2 as pb
from events_server.pb import events_pb2_grpc
from rest_bridge.gather import Gatherer
from tests.harness.data import ev
from tests.harness.waiting import until


def gatherer_on(
    channel: grpc.aio.Channel, timeout: float = 10, link_host: str | None = None
) -> Gatherer:
    """A bridge's gatherer on ``channel``, as the bridge builds it: on the gRPC stream, or on
    the batch link when a ``link_host`` is given."""
    return Gatherer(
        lambda: events_pb2_grpc.BridgeIngestStub(channel),
        lambda: events_pb2_grpc.EventsServiceStub(channel),
        timeout_seconds=timeout,
        max_calls=1,
        max_requests=64,
        max_bytes=1 << 20,
        link_host=link_host,
    )


def batch(call_id: int, api_key: str, user: str) -> pb.GatheredRequest:
    """A batch of one request (one event of ``user``), as the bridge sends it."""
    sub = pb.SubRequest(
        request=pb.CreateEventsRequest(events=[ev(user_id=user)]).SerializeToString(),
        metadata={"x-api-key": api_key},
    )
    return pb.GatheredRequest(requests=[sub], call_id=call_id, timeout_us=10_000_000)


async def drained(
    server: Any,
    gatherer: Gatherer,
    rdb: redis.Redis,
    api_key: str,
    told: Callable[[], bool],
) -> tuple[list[Any], grpc.StatusCode | None]:
    """Five requests out (Redis holding their write) when ``server`` begins to stop, and one
    more once ``told()`` says the gatherer's connection heard it drain: the five's answers
    (or errors), and the code the late one was refused with (None: answered)."""
    metadata = (("x-api-key", api_key),)

    def send(user: str) -> asyncio.Task[pb.CreateEventsResponse]:
        request = pb.CreateEventsRequest(events=[ev(user_id=user)])
        return asyncio.create_task(gatherer.create_events(request, metadata))

    await send("opens-the-connection")
    await asyncio.to_thread(rdb.client_pause, 400)
    out = [send(f"out-{n}") for n in range(5)]
    await asyncio.sleep(0.1)
    stopping = asyncio.create_task(server.stop(5))
    await until(told, within=5)
    try:
        await send("after-the-drain")
        late = None
    except grpc.aio.AioRpcError as error:
        late = error.code()
    answers = await asyncio.gather(*out, return_exceptions=True)
    await stopping
    return answers, late
