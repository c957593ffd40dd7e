"""The bridge's gathered stream (BridgeIngest.StreamGathered): bounded, refused to strangers,
failing what is out on it when it breaks, drained at shutdown, and unary calls to a server
without it. (test_gathered.py's tests run over it too: its gatherers use the stream.)"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import redis

from events_server.pb import events_pb2 as pb
from events_server.pb import events_pb2_grpc
from events_server.queue.keys import KeySpace
from events_server.server.gathered_stream import STREAM_BATCHES
from events_server.server.settings import Settings
from events_server.wire.metadata import (
    BRIDGE_INGEST_SERVICE_NAME,
    GATHERED_METHOD,
    GATHERED_STREAM_METHOD,
)
from rest_bridge.gather_stream import STREAM_BYTES
from tests.harness.data import ev, event_of_size
from tests.harness.gathering import batch, drained, gatherer_on
from tests.harness.metrics import scrape, server_metrics_url, value
from tests.harness.processes import ServerProcess, events_env
from tests.harness.servers import LoopThread, bridged, serving
from tests.harness.streams import Queue, queued
from tests.harness.valkey import free_port
from tests.harness.waiting import eventually

STREAM = GATHERED_STREAM_METHOD


@pytest.fixture
def own_server(loop: LoopThread, settings: Settings, rdb: redis.Redis) -> Iterator[Any]:
    """A server of this test's own (its streams and metrics are this test's alone)."""
    with serving(loop, settings) as (server, target):
        yield server, target


def test_batches_share_one_stream_and_each_is_counted_as_a_gathered_call(
    loop: LoopThread, own_server: Any, api_key: str, rdb: redis.Redis, keys: KeySpace
) -> None:
    server, target = own_server
    before = scrape(server_metrics_url(server))

    async def scenario() -> tuple[int, list[int]]:
        async with grpc.aio.insecure_channel(target) as channel:
            gatherer = gatherer_on(channel)
            metadata = (("x-api-key", api_key),)
            replies: list[pb.CreateEventsResponse] = []
            for wave in range(3):  # several waves, several batches each
                replies += await asyncio.gather(
                    *(
                        gatherer.create_events(
                            pb.CreateEventsRequest(events=[ev(user_id=f"w{wave}-{n}")]), metadata
                        )
                        for n in range(20)
                    )
                )
            return gatherer.calls, [reply.accepted for reply in replies]

    calls, accepted = loop.run(scenario())
    streams = "events_grpc_request_duration_seconds_count"
    # The stream ends (its line and count) as the server learns the channel closed.
    eventually(lambda: value(scrape(server_metrics_url(server)), streams, method=STREAM) == 1)
    after = scrape(server_metrics_url(server))

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert accepted == [1] * 60
    assert len(queued(rdb, keys)) == 60
    assert calls > 1
    # Every batch went on the one stream, and counts as the gathered call it stands for.
    assert grew(streams, method=STREAM) == 1
    assert grew("events_grpc_requests_total", method=GATHERED_METHOD, code="OK") == calls
    assert grew("events_gathered_requests_total", code="OK") == 60


def test_a_batch_too_large_for_the_stream_goes_as_a_call_of_its_own(
    loop: LoopThread, own_server: Any, settings: Settings, api_key: str
) -> None:
    server, target = own_server
    size = STREAM_BYTES // 400  # 400 such events: a request over what the stream carries
    events = [
        event_of_size(size, settings.max_string_length, user_id=f"big-{n}", tenant="shop-a")
        for n in range(400)
    ]
    before = scrape(server_metrics_url(server))

    async def scenario() -> tuple[int, bool]:
        async with grpc.aio.insecure_channel(target) as channel:
            gatherer = gatherer_on(channel)
            reply = await gatherer.create_events(
                pb.CreateEventsRequest(events=events), (("x-api-key", api_key),)
            )
            return reply.accepted, gatherer.link._fallback._stream is None

    accepted, no_stream = loop.run(scenario())
    assert accepted == 400
    assert no_stream  # no stream was opened for it: a message of that size would end one
    after = scrape(server_metrics_url(server))
    durations = "events_grpc_request_duration_seconds_count"
    assert (
        value(after, durations, method=GATHERED_METHOD)
        - value(before, durations, method=GATHERED_METHOD)
        == 1
    )


def test_only_the_bridge_may_open_the_gathered_stream(
    loop: LoopThread, settings: Settings, api_key: str, rdb: redis.Redis, keys: KeySpace
) -> None:
    token = "a-bridge-token-of-16+-chars"

    async def scenario(target: str) -> tuple[grpc.StatusCode, str]:
        async with grpc.aio.insecure_channel(target) as channel:
            call = events_pb2_grpc.BridgeIngestStub(channel).StreamGathered()
            with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                await call.write(batch(1, api_key, "stranger"))  # refused before or after
                await call.read()
            return await call.code(), await call.details()

    with serving(loop, Settings(**{**settings.model_dump(), "bridge_token": token})) as (_, target):
        code, details = loop.run(scenario(target))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    # By the access interceptor, which names what proves the bridge, as for the calls.
    assert "is for the REST bridge only" in details
    assert "known by the EVENTS_BRIDGE_TOKEN" in details
    assert queued(rdb, keys) == []


def test_a_flood_of_batches_on_one_stream_is_worked_a_bounded_number_at_a_time(
    loop: LoopThread, own_server: Any, api_key: str, rdb: redis.Redis
) -> None:
    server, target = own_server
    count = STREAM_BATCHES * 6

    async def scenario() -> tuple[int, dict[int, int]]:
        async with grpc.aio.insecure_channel(target) as channel:
            call = events_pb2_grpc.BridgeIngestStub(channel).StreamGathered()

            async def flood() -> None:
                for n in range(1, count + 1):
                    await call.write(batch(n, api_key, f"f{n}"))
                await call.done_writing()

            answers: dict[int, int] = {}

            async def read() -> None:
                async for answer in call:
                    answers[answer.call_id] = answers.get(answer.call_id, 0) + 1

            # Redis holds every write a moment: the batches read stay in the server.
            await asyncio.to_thread(rdb.client_pause, 600)
            writing = asyncio.create_task(flood())
            reading = asyncio.create_task(read())
            peak = 0
            while not reading.done():
                peak = max(peak, server.streams.working)
                await asyncio.sleep(0.002)
            await writing
            return peak, answers

    peak, answers = loop.run(scenario())
    assert peak == STREAM_BATCHES  # reached, never passed: the rest stayed unread
    assert answers == {n: 1 for n in range(1, count + 1)}  # and each was answered, once


def test_a_stream_broken_by_the_server_dying_fails_what_is_out_then_a_new_one_serves(
    queue: Queue, tmp_path: Path
) -> None:
    port = free_port()
    env = events_env(queue.settings)
    first = ServerProcess(env, tmp_path / "server-1.log", f"127.0.0.1:{port}")
    second = ServerProcess(env, tmp_path / "server-2.log", f"127.0.0.1:{port}")
    body = [{"tenant": "shop-a", "market": "us", "type": "click"}]
    headers = {"x-api-key": queue.api_key}

    async def out_when_killed(url: str) -> list[int]:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            # Redis holds every write: the requests stay out, on the stream, until it dies.
            await asyncio.to_thread(queue.rdb.client_pause, 5000)
            posts = [
                asyncio.create_task(client.post("/create-events", json=body, headers=headers))
                for _ in range(20)
            ]
            await asyncio.sleep(0.5)
            first.signal(signal.SIGKILL)
            answers = await asyncio.gather(*posts)
        return [answer.status_code for answer in answers]

    async def together(url: str) -> list[int]:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            answers = await asyncio.gather(
                *(client.post("/create-events", json=body, headers=headers) for _ in range(20))
            )
        return [answer.status_code for answer in answers]

    try:
        first.start()
        # Its timeout far beyond the test: a request failed by its timer would be a 504.
        with bridged(f"127.0.0.1:{port}", grpc_timeout_seconds=60.0) as url:
            with httpx.Client(base_url=url, timeout=30) as client:
                assert client.post("/create-events", json=body, headers=headers).status_code == 200
                statuses = asyncio.run(out_when_killed(url))
                queue.rdb.client_unpause()
                second.start()
                eventually(
                    lambda: (
                        client.post("/create-events", json=body, headers=headers).status_code == 200
                    ),
                    within=10,
                )
            again = asyncio.run(together(url))
    finally:
        queue.rdb.client_unpause()
        first.kill()
        second.stop()
    assert statuses == [503] * 20  # UNAVAILABLE: the stream broke under them
    assert again == [200] * 20


def test_a_stopping_server_drains_the_stream_and_answers_what_it_read(
    loop: LoopThread, settings: Settings, api_key: str, rdb: redis.Redis, keys: KeySpace
) -> None:
    async def scenario(server: Any, target: str) -> tuple[list[Any], grpc.StatusCode | None]:
        async with grpc.aio.insecure_channel(target) as channel:
            gatherer = gatherer_on(channel)
            link = gatherer.link._fallback

            def told() -> bool:
                return link._stream is not None and link._stream.over

            return await drained(server, gatherer, rdb, api_key, told)

    with serving(loop, settings) as (server, target):
        answers, late = loop.run(scenario(server, target))
    # What was out when the server began to stop was read before it drained: answered.
    assert [getattr(a, "accepted", a) for a in answers] == [1] * 5
    # Later, no more batches on that stream: a new one, which the stopping server refuses.
    assert late == grpc.StatusCode.UNAVAILABLE
    assert {f"out-{n}" for n in range(5)} <= {e.event.user_id for _, e in queued(rdb, keys)}


class _OldServer:
    """A real gRPC server as one from before the stream: BridgeIngest without StreamGathered,
    its CreateEventsGathered calls forwarded (bytes as they are) to the real server."""

    def __init__(self, target: str) -> None:
        self.calls = 0
        self._target = target

    async def start(self) -> tuple[grpc.aio.Server, grpc.aio.Channel, str]:
        channel = grpc.aio.insecure_channel(self._target)
        forward: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
            GATHERED_METHOD
        )

        async def gathered(raw: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
            self.calls += 1
            reply: bytes = await forward(raw, timeout=context.time_remaining())
            return reply

        server = grpc.aio.server()
        server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    BRIDGE_INGEST_SERVICE_NAME,
                    {"CreateEventsGathered": grpc.unary_unary_rpc_method_handler(gathered)},
                ),
            )
        )
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, channel, f"127.0.0.1:{port}"


@pytest.mark.parametrize("link", [False, True], ids=["stream", "link-first"])
def test_a_server_without_the_stream_gets_gathered_calls_with_a_warning(
    loop: LoopThread,
    grpc_target: str,
    api_key: str,
    caplog: pytest.LogCaptureFixture,
    link: bool,
) -> None:
    old = _OldServer(grpc_target)

    async def scenario() -> tuple[list[int], int]:
        server, forwarding, target = await old.start()
        try:
            async with grpc.aio.insecure_channel(target) as channel:
                gatherer = gatherer_on(channel, link_host="127.0.0.1" if link else None)
                metadata = (("x-api-key", api_key),)
                replies = []
                for wave in range(2):
                    replies += await asyncio.gather(
                        *(
                            gatherer.create_events(
                                pb.CreateEventsRequest(events=[ev(user_id=f"o{wave}{n}")]),
                                metadata,
                            )
                            for n in range(10)
                        )
                    )
                return [reply.accepted for reply in replies], gatherer.calls
        finally:
            await server.stop(0)
            await forwarding.close()

    with caplog.at_level(logging.WARNING, logger="rest_bridge"):
        accepted, calls = loop.run(scenario())
    assert accepted == [1] * 20
    assert old.calls == calls  # every batch went as a call of its own
    warnings = [r for r in caplog.records if "has no StreamGathered" in r.getMessage()]
    assert len(warnings) == 1  # said once, not per batch
    # Asked for a batch link first (an older server has no OpenBatchLink): said once too.
    no_link = [r for r in caplog.records if "no batch link" in r.getMessage()]
    assert len(no_link) == (1 if link else 0)
