"""The bridge's gathered calls: each sub-request answered as alone; the bridge really gathers."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from typing import Any

import grpc
import httpx
import pytest
import redis

from events_server.pb import events_pb2 as pb
from events_server.pb import events_pb2_grpc
from events_server.queue.keys import KeySpace
from events_server.server.app import EventsServer
from events_server.server.settings import Settings
from events_server.wire.metadata import GATHERED_METHOD, MD_RETRY_AFTER
from events_server.wire.violations import unpack_violations
from rest_bridge.gather import Gatherer
from tests.harness.data import ev
from tests.harness.keys import create_key
from tests.harness.metrics import scrape, server_metrics_url, value
from tests.harness.rpc import gathered_call
from tests.harness.servers import LoopThread, serving
from tests.harness.streams import queued

Metadata = tuple[tuple[str, str], ...]

# What an answer is, as a caller can tell: the code, the message, the violations and the
# Retry-After; or the results (entry ids aside: they name the moment, not the answer).
Answer = tuple[Any, ...]


def _results(reply: pb.CreateEventsResponse) -> Answer:
    return (
        "OK",
        reply.accepted,
        reply.duplicates,
        [(r.status, r.partition) for r in reply.results],
    )


def _refusal(code: grpc.StatusCode, details: str, trailers: Sequence[tuple[str, Any]]) -> Answer:
    retry_after = [v for k, v in trailers if k == MD_RETRY_AFTER]
    return (code.name, details, unpack_violations(trailers), retry_after)


def alone(target: str, metadata: Metadata, events: list[pb.Event]) -> Answer:
    """The answer of a CreateEvents call of its own."""
    with grpc.insecure_channel(target) as channel:
        stub = events_pb2_grpc.EventsServiceStub(channel)
        try:
            reply = stub.CreateEvents(
                pb.CreateEventsRequest(events=events), metadata=metadata, timeout=10
            )
        except grpc.RpcError as error:
            call: grpc.Call = error  # type: ignore[assignment]  # a failed call is both
            trailers: list[tuple[str, Any]] = list(call.trailing_metadata() or ())
            return _refusal(error.code(), error.details() or "", trailers)
    return _results(reply)


def gathered(target: str, requests: list[tuple[Metadata, list[pb.Event]]]) -> list[Answer]:
    """Each sub-request's answer, from one gathered call (as the bridge makes it)."""
    call = pb.GatheredRequest(
        requests=[
            pb.SubRequest(
                request=pb.CreateEventsRequest(events=events).SerializeToString(),
                metadata=dict(metadata),
            )
            for metadata, events in requests
        ]
    )
    reply = gathered_call(target, call)
    answers: list[Answer] = []
    for sub in reply.responses:
        if sub.code == 0:
            answers.append(_results(sub.response))
            continue
        trailers = [
            (t.key, t.value if t.key.endswith("-bin") else t.value.decode()) for t in sub.trailers
        ]
        code = next(c for c in grpc.StatusCode if c.value[0] == sub.code)
        answers.append(_refusal(code, sub.details, trailers))
    return answers


@pytest.fixture
def own_server(loop: LoopThread, settings: Settings, rdb: redis.Redis) -> Iterator[str]:
    """A server of this test's own (its calls and metrics are this test's alone)."""
    with serving(loop, settings) as (_, target):
        yield target


def test_each_sub_request_gets_the_answer_it_gets_alone_and_only_good_ones_are_queued(
    own_server: str, settings: Settings, api_key: str, rdb: redis.Redis, keys: KeySpace
) -> None:
    narrow = create_key(settings.redis_url, settings.key_prefix, ["shop-a"], "narrow")
    keyed = (("x-api-key", api_key),)

    def requests(run: str) -> list[tuple[Metadata, list[pb.Event]]]:
        return [
            ((("x-api-key", "evk_not-a-key"),), [ev(user_id="bad-key")]),
            (keyed, [ev(user_id="invalid", deduplication_id=f"{run}-x"), ev(tenant="")]),
            ((("x-api-key", narrow),), [ev(tenant="shop-b", user_id="foreign")]),
            (keyed, [ev(user_id="good-1", deduplication_id=f"{run}-1")]),
            (keyed, [ev(user_id="good-2"), ev(user_id="good-3", deduplication_id=f"{run}-3")]),
        ]

    together = gathered(own_server, requests("gathered"))
    queued_together = sorted(e.event.user_id for _, e in queued(rdb, keys))
    # The same requests, each in a CreateEvents call of its own (other deduplication ids,
    # so that none meets a copy queued above; they route by user id all the same).
    separately = [alone(own_server, metadata, events) for metadata, events in requests("alone")]

    assert together == separately
    assert [answer[0] for answer in together] == [
        "UNAUTHENTICATED",
        "INVALID_ARGUMENT",
        "PERMISSION_DENIED",
        "OK",
        "OK",
    ]
    assert together[1][2]  # the violations themselves, not just the code
    assert queued_together == ["good-1", "good-2", "good-3"]
    assert len(queued(rdb, keys)) == 6  # and as many again, alone


def test_only_the_bridge_may_make_gathered_calls(
    loop: LoopThread, settings: Settings, api_key: str, rdb: redis.Redis, keys: KeySpace
) -> None:
    token = "a-bridge-token-of-16+-chars"
    with (
        serving(loop, Settings(**{**settings.model_dump(), "bridge_token": token})) as (_, target),
        pytest.raises(grpc.RpcError) as refused,
    ):
        gathered(target, [((("x-api-key", api_key),), [ev()])])
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert queued(rdb, keys) == []


def test_the_bridge_gathers_concurrent_requests(
    bridge: str, server: EventsServer, api_key: str, rdb: redis.Redis
) -> None:
    before, http_before = scrape(server_metrics_url(server)), scrape(f"{bridge}/metrics")
    count = 300

    async def load() -> list[int]:
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=bridge, limits=limits, timeout=30) as client:
            answers = await asyncio.gather(
                *(
                    client.post(
                        "/create-events",
                        json=[{"tenant": "shop-a", "market": "us", "type": "click"}],
                        headers={"x-api-key": api_key},
                    )
                    for _ in range(count)
                )
            )
        return [answer.status_code for answer in answers]

    assert asyncio.run(load()) == [200] * count
    after, http_after = scrape(server_metrics_url(server)), scrape(f"{bridge}/metrics")

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    posts = value(http_after, "events_http_requests_total", **POST_200) - value(
        http_before, "events_http_requests_total", **POST_200
    )
    calls = grew("events_gathered_call_requests_count")
    assert posts == count
    assert grew("events_gathered_call_requests_sum") == count  # every request, once
    assert grew("events_gathered_requests_total", code="OK") == count
    # Fewer calls than requests: what arrived while calls were out went together.
    assert calls < count
    assert grew("events_grpc_requests_total", method=GATHERED_METHOD, code="OK") == calls

    # And alone, a request is a call of its own (no timer held it for company).
    lone_before = scrape(server_metrics_url(server))
    with httpx.Client(base_url=bridge, timeout=10) as client:
        answer = client.post(
            "/create-events",
            json=[{"tenant": "shop-a", "market": "us", "type": "click"}],
            headers={"x-api-key": api_key},
        )
    assert answer.status_code == 200
    lone_after = scrape(server_metrics_url(server))
    ones = {"le": "1.0"}
    assert (
        value(lone_after, "events_gathered_call_requests_bucket", **ones)
        - value(lone_before, "events_gathered_call_requests_bucket", **ones)
        == 1
    )


POST_200 = {"route": "/create-events", "method": "POST", "status": "200"}


def gatherer_on(
    channel: grpc.aio.Channel, max_requests: int, large_bytes: int = 1 << 62
) -> Gatherer:
    """A bridge's gatherer on ``channel``: one call out at a time, up to 1 MiB a call."""
    return Gatherer(
        lambda: events_pb2_grpc.BridgeIngestStub(channel),
        lambda: events_pb2_grpc.EventsServiceStub(channel),
        timeout_seconds=10,
        max_calls=1,
        max_requests=max_requests,
        max_bytes=1 << 20,
        large_bytes=large_bytes,
    )


def test_a_lone_request_leaves_at_once_and_later_ones_wait_for_the_call_out(
    loop: LoopThread, grpc_target: str, api_key: str, rdb: redis.Redis
) -> None:
    async def scenario() -> tuple[tuple[int, int], int, int, int]:
        async with grpc.aio.insecure_channel(grpc_target) as channel:
            gatherer = gatherer_on(channel, max_requests=64)
            metadata = (("x-api-key", api_key),)
            request = pb.CreateEventsRequest(events=[ev()])
            first = asyncio.create_task(gatherer.create_events(request, metadata))
            await asyncio.sleep(0)  # the first runs up to its first wait
            at_once = (gatherer.calls, gatherer.out)
            later = [
                asyncio.create_task(gatherer.create_events(request, metadata)) for _ in range(9)
            ]
            await asyncio.sleep(0)
            while_out = gatherer.calls
            replies = await asyncio.gather(first, *later)
            assert all(reply.accepted == 1 for reply in replies)
            return at_once, while_out, gatherer.calls, gatherer.requests

    at_once, while_out, calls, requests = loop.run(scenario())
    assert at_once == (1, 1)  # sent before anything was awaited: no timer
    assert while_out == 1  # the nine wait while the first call is out...
    assert (calls, requests) == (2, 10)  # ...and then go together


def test_large_requests_waiting_send_a_second_call_while_the_first_is_out(
    loop: LoopThread, grpc_target: str, api_key: str, rdb: redis.Redis
) -> None:
    async def scenario() -> tuple[int, int]:
        async with grpc.aio.insecure_channel(grpc_target) as channel:
            gatherer = gatherer_on(channel, max_requests=2, large_bytes=4096)
            metadata = (("x-api-key", api_key),)
            big = pb.CreateEventsRequest(
                events=[ev(url="u" * 3000, user_id=f"b{n}") for n in range(2)]
            )
            tasks = [asyncio.create_task(gatherer.create_events(big, metadata)) for _ in range(7)]
            await asyncio.sleep(0)
            most_out = gatherer.out
            await asyncio.gather(*tasks)
            return most_out, gatherer.requests

    most_out, requests = loop.run(scenario())
    assert most_out > 1  # the first call out did not hold the rest back
    assert requests == 7


def test_a_request_that_waited_past_the_budget_is_refused_alone_and_fresh_ones_are_queued(
    own_server: str, settings: Settings, api_key: str, rdb: redis.Redis, keys: KeySpace
) -> None:
    budget_us = int(settings.redis_timeout_seconds * 1e6)

    def sub(user: str, waited_us: int) -> pb.SubRequest:
        return pb.SubRequest(
            request=pb.CreateEventsRequest(events=[ev(user_id=user)]).SerializeToString(),
            metadata={"x-api-key": api_key},
            waited_us=waited_us,
        )

    reply = gathered_call(
        own_server,
        pb.GatheredRequest(
            requests=[
                sub("stale", budget_us),
                sub("fresh", 0),
                sub("older", budget_us // 4),
                sub("past-half", budget_us * 3 // 4),
            ]
        ),
    )
    codes = [grpc.StatusCode.OK.value[0], grpc.StatusCode.UNAVAILABLE.value[0]]
    # The budget counts the bridge's queue: a hung Redis costs a request it once. The ones
    # that spent more than half of it are refused alone; the others of the call keep theirs.
    assert [r.code for r in reply.responses] == [codes[1], codes[0], codes[0], codes[1]]
    assert "waited" in reply.responses[0].details
    assert "waited" in reply.responses[3].details
    assert sorted(e.event.user_id for _, e in queued(rdb, keys)) == ["fresh", "older"]


def test_an_old_request_does_not_cut_short_the_time_of_a_fresh_one_gathered_with_it(
    loop: LoopThread, grpc_target: str, api_key: str, rdb: redis.Redis, keys: KeySpace
) -> None:
    async def scenario() -> list[Any]:
        async with grpc.aio.insecure_channel(grpc_target) as channel:
            gatherer = gatherer_on(channel, max_requests=64)
            metadata = (("x-api-key", api_key),)

            def send(user: str) -> asyncio.Task[pb.CreateEventsResponse]:
                request = pb.CreateEventsRequest(events=[ev(user_id=user)])
                return asyncio.create_task(gatherer.create_events(request, metadata))

            # Redis stalls for half a second (within the server's 1 s budget): the first
            # call stays out, and the two after it go out together once it is stalled.
            await asyncio.to_thread(rdb.client_pause, 500)
            first = send("first")
            await asyncio.sleep(0)
            gatherer._timeout = 0.2  # a request with little time left...
            old = send("old")
            await asyncio.sleep(0)
            gatherer._timeout = 10  # ...and a fresh one, in the same call
            fresh = send("fresh")
            return list(await asyncio.gather(first, old, fresh, return_exceptions=True))

    first, old, fresh = loop.run(scenario())
    assert isinstance(first, pb.CreateEventsResponse)
    assert isinstance(old, grpc.aio.AioRpcError)
    assert old.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # its own deadline, alone
    assert isinstance(fresh, pb.CreateEventsResponse)  # not failed with it
    assert fresh.accepted == 1
    assert "fresh" in {e.event.user_id for _, e in queued(rdb, keys)}
