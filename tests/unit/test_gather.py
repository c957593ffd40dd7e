"""The bridge's Gatherer: what a gathered call takes from what waits (no call is made here)."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc

from events_server.pb import events_pb2 as pb
from rest_bridge.gather import Gatherer
from rest_bridge.gather_batch import Pending


def _never() -> Any:
    raise AssertionError("no call is made: max_calls is 0")


def _gatherer(max_requests: int = 64, max_bytes: int = 1 << 20) -> Gatherer:
    return Gatherer(
        _never,
        _never,
        timeout_seconds=5,
        max_calls=0,
        max_requests=max_requests,
        max_bytes=max_bytes,
    )


def _request(n: int) -> pb.CreateEventsRequest:
    return pb.CreateEventsRequest(events=[pb.Event(tenant="t", market="m", user_id=f"u{n}")])


def test_a_call_takes_the_credentials_waiting_round_robin() -> None:
    async def scenario() -> list[list[str]]:
        gatherer = _gatherer(max_requests=4)
        waiting = [
            asyncio.create_task(gatherer.create_events(_request(n), (("x-api-key", "flood"),)))
            for n in range(10)
        ]
        light = asyncio.create_task(
            gatherer.create_events(_request(99), (("grpcgateway-origin", "https://light"),))
        )
        await asyncio.sleep(0)
        calls = []
        while batch := gatherer._take():
            calls.append([_user(p) for p in batch])
        for task in (*waiting, light):
            task.cancel()
        await asyncio.gather(*waiting, light, return_exceptions=True)
        return calls

    calls = asyncio.run(scenario())
    # The light origin's one request goes in the first call, not behind the flood's ten.
    assert calls[0] == ["u0", "u99", "u1", "u2"]
    assert [len(c) for c in calls] == [4, 4, 3]


def test_a_call_holds_at_most_max_bytes_but_a_larger_request_goes_alone() -> None:
    async def scenario() -> list[int]:
        gatherer = _gatherer(max_bytes=64 * 1024)
        big = pb.CreateEventsRequest(events=[pb.Event(tenant="t", market="m", url="x" * 70_000)])
        tasks = [
            asyncio.create_task(gatherer.create_events(r, (("x-api-key", "k"),)))
            for r in (big, _request(1), _request(2))
        ]
        await asyncio.sleep(0)
        sizes = []
        while batch := gatherer._take():
            sizes.append(len(batch))
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return sizes

    assert asyncio.run(scenario()) == [1, 2]


def test_a_request_out_of_time_or_given_up_on_is_never_sent() -> None:
    async def scenario() -> tuple[list[str], BaseException | None, bool]:
        gatherer = Gatherer(
            _never, _never, timeout_seconds=0.01, max_calls=0, max_requests=64, max_bytes=1 << 20
        )
        stale = asyncio.create_task(gatherer.create_events(_request(1), (("x-api-key", "k"),)))
        gone = asyncio.create_task(gatherer.create_events(_request(2), (("x-api-key", "k"),)))
        await asyncio.sleep(0.02)
        gone.cancel()
        await asyncio.sleep(0)
        gatherer._timeout = 5
        fresh = asyncio.create_task(gatherer.create_events(_request(3), (("x-api-key", "k"),)))
        await asyncio.sleep(0)
        taken = [_user(p) for p in gatherer._take()]
        fresh.cancel()
        results = await asyncio.gather(stale, gone, fresh, return_exceptions=True)
        return (
            taken,
            results[0] if isinstance(results[0], BaseException) else None,
            gone.cancelled(),
        )

    taken, stale_error, gone_cancelled = asyncio.run(scenario())
    assert taken == ["u3"]
    assert isinstance(stale_error, grpc.aio.AioRpcError)
    assert stale_error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert gone_cancelled


def _user(pending: Pending) -> str:
    assert isinstance(pending.request, pb.CreateEventsRequest)
    return pending.request.events[0].user_id
