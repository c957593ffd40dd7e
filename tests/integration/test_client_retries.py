"""events_server.client's retries after real faults: a lost reply, an outage, a late server."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import grpc
import pytest
import redis

from events_server.client import (
    EventsClient,
    UnavailableError,
)
from events_server.pb import events_pb2 as pb
from events_server.queue.keys import KeySpace
from events_server.server.app import EventsServer, create_server
from events_server.server.settings import Settings
from tests.harness.data import ev
from tests.harness.metrics import calls
from tests.harness.proxy import FaultProxy
from tests.harness.rpc import ACCEPTED, DUPLICATE
from tests.harness.servers import LoopThread
from tests.harness.streams import queued
from tests.harness.valkey import SessionValkey, free_port


@pytest.fixture
def proxy(grpc_target: str) -> Iterator[FaultProxy]:
    """A proxy in front of the session's server that can lose a reply."""
    cutting = FaultProxy("127.0.0.1", int(grpc_target.rsplit(":", 1)[1]), protocol="http2")
    yield cutting
    cutting.close()


def test_a_lost_reply_is_retried_and_the_event_is_queued_once(
    api_key: str, proxy: FaultProxy, server: EventsServer, rdb: redis.Redis, keys: KeySpace
) -> None:
    async def scenario() -> tuple[pb.CreateEventsResponse, pb.CreateEventsResponse]:
        async with EventsClient(proxy.address, api_key=api_key) as client:
            warm = await client.send([ev(user_id="warm-up")])  # connection up, frames flowing
            proxy.cut_next_reply()
            return warm, await client.send([ev(user_id="u-lost")])  # no deduplication_id given

    before = calls(server)
    warm, reply = asyncio.run(scenario())
    assert proxy.cuts == 1
    assert calls(server) - before == 3  # warm-up, the attempt whose reply was lost, the retry
    # The first attempt queued it; the retry carried the same filled-in id and met it.
    [result] = reply.results
    assert result.status == DUPLICATE
    lost = [e for _, e in queued(rdb, keys) if e.event.user_id == "u-lost"]
    assert len(lost) == 1
    assert result.entry_id != warm.results[0].entry_id


def test_a_redis_outage_is_retried_until_it_ends_and_the_event_is_queued_once(  # noqa: PLR0917
    api_key: str,
    valkey: SessionValkey,
    server: EventsServer,
    rdb: redis.Redis,
    keys: KeySpace,
    grpc_target: str,
) -> None:
    process = valkey.killable()
    unavailable_before = calls(server, "UNAVAILABLE")
    process.kill()
    restarter = threading.Timer(0.8, process.start)
    restarter.start()

    async def send() -> pb.CreateEventsResponse:
        async with EventsClient(grpc_target, deadline_seconds=15, api_key=api_key) as client:
            return await client.send([ev(user_id="u-outage")])

    try:
        reply = asyncio.run(send())
    finally:
        restarter.join()
        if not process.running():
            process.start()
    assert [r.status for r in reply.results] == [ACCEPTED]
    assert calls(server, "UNAVAILABLE") > unavailable_before  # it really was refused first
    assert [e.event.user_id for _, e in queued(rdb, keys)] == ["u-outage"]


def test_a_server_that_comes_up_late_is_reached(
    api_key: str, loop: LoopThread, settings: Settings, rdb: redis.Redis, keys: KeySpace
) -> None:
    port = free_port()
    late: list[EventsServer] = []

    async def start() -> None:
        there = settings.model_copy(update={"grpc_addr": f"127.0.0.1:{port}"})
        started, _ = await create_server(there)
        await started.start()
        late.append(started)

    starter = threading.Timer(0.8, lambda: loop.run(start()))
    starter.start()

    async def send() -> pb.CreateEventsResponse:
        async with EventsClient(
            f"127.0.0.1:{port}", deadline_seconds=15, api_key=api_key
        ) as client:
            return await client.send([ev(user_id="u-late")])

    try:
        reply = asyncio.run(send())
    finally:
        starter.join()
        for started in late:
            loop.run(started.stop(0))
    assert [r.status for r in reply.results] == [ACCEPTED]
    assert calls(late[0], "UNAVAILABLE") == 0  # it failed only while nobody listened
    assert [e.event.user_id for _, e in queued(rdb, keys)] == ["u-late"]


def test_unavailable_past_the_deadline_raises(
    api_key: str,
) -> None:
    async def send() -> None:
        async with EventsClient(
            f"127.0.0.1:{free_port()}", deadline_seconds=0.5, api_key=api_key
        ) as client:
            await client.send([ev()])

    started = time.monotonic()
    with pytest.raises(UnavailableError) as caught:
        asyncio.run(send())
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    assert time.monotonic() - started < 5  # bounded by the deadline, not by gRPC's own backoff
