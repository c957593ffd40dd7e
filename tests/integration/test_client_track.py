"""events_server.client's track() and the batcher's against the real server: v2 events queued,
retries safe, bad ones refused before sending."""

from __future__ import annotations

import asyncio

import pytest
import redis

from events_server.client import EventsClient, InvalidEventsError, SyncEventsClient
from events_server.pb import events_pb2 as pb
from events_server.queue.keys import KeySpace
from events_server.server.app import EventsServer
from tests.harness.data import ev, mapping, purchase, unavailable
from tests.harness.metrics import calls
from tests.harness.rpc import ACCEPTED, DUPLICATE
from tests.harness.streams import queued

TRACK = "/events.v1.EventsService/Track"


def kinds(rdb: redis.Redis, keys: KeySpace) -> list[str]:
    return sorted(e.WhichOneof("tracked") or "event" for _, e in queued(rdb, keys))


def test_track_queues_each_kind_and_fills_in_an_unavailable_products_id(
    api_key: str, grpc_target: str, rdb: redis.Redis, keys: KeySpace
) -> None:
    report = unavailable().product_unavailable

    async def send() -> tuple[pb.CreateEventsResponse, pb.CreateEventsResponse]:
        async with EventsClient(grpc_target, api_key=api_key) as client:
            first = await client.track([purchase(), mapping().transaction_mapping, report])
            # The same purchase again (a reloaded page): a duplicate, as any resend.
            return first, await client.track([purchase().purchase])

    first, again = asyncio.run(send())
    assert [r.status for r in first.results] == [ACCEPTED] * 3
    assert [r.status for r in again.results] == [DUPLICATE]
    assert not report.HasField("deduplication_id")  # the caller's message is left alone
    assert kinds(rdb, keys) == ["product_unavailable", "purchase", "transaction_mapping"]
    (filled,) = [
        e.product_unavailable for _, e in queued(rdb, keys) if e.HasField("product_unavailable")
    ]
    assert len(filled.deduplication_id) == 36  # a uuid4


def test_track_refuses_what_is_no_v2_event_before_sending(
    api_key: str, grpc_target: str, server: EventsServer, rdb: redis.Redis, keys: KeySpace
) -> None:
    async def send() -> None:
        async with EventsClient(grpc_target, api_key=api_key) as client:
            await client.track([purchase(), ev()])  # type: ignore[list-item]

    before = calls(server, method=TRACK)
    with pytest.raises(InvalidEventsError) as caught:
        asyncio.run(send())
    assert [(v.field, v.reason) for v in caught.value.violations] == [("events[1]", "type")]
    assert calls(server, method=TRACK) == before
    assert queued(rdb, keys) == []


def test_the_server_names_the_field_of_an_invalid_tracked_event(
    api_key: str, grpc_target: str, rdb: redis.Redis, keys: KeySpace
) -> None:
    async def send() -> None:
        async with EventsClient(grpc_target, api_key=api_key) as client:
            await client.track([purchase(currency="kr")])

    with pytest.raises(InvalidEventsError) as caught:
        asyncio.run(send())
    assert [(v.field, v.reason) for v in caught.value.violations] == [
        ("events[0].purchase.currency", "string_pattern_mismatch")
    ]
    assert queued(rdb, keys) == []


def test_the_batcher_sends_v2_events_in_track_calls_of_their_own(
    api_key: str, grpc_target: str, server: EventsServer, rdb: redis.Redis, keys: KeySpace
) -> None:
    async def scenario() -> list[pb.EventResult]:
        async with (
            EventsClient(grpc_target, api_key=api_key) as client,
            client.batcher(max_events=10, max_delay_seconds=60) as batcher,
        ):
            futures = [
                await batcher.add(ev(user_id="u-1")),
                await batcher.track(purchase()),
                await batcher.track(purchase()),  # the same transaction, in the same batch
                await batcher.track(unavailable().product_unavailable),
            ]
            with pytest.raises(InvalidEventsError) as caught:
                await batcher.track(purchase(products=[]))
            assert [(v.field, v.reason) for v in caught.value.violations] == [
                ("event.purchase.products", "too_short")
            ]
            await batcher.flush()
            return [future.result() for future in futures]

    before = calls(server), calls(server, method=TRACK)
    results = asyncio.run(scenario())
    assert [r.status for r in results] == [ACCEPTED, ACCEPTED, DUPLICATE, ACCEPTED]
    # One CreateEvents call, one Track call.
    assert (calls(server) - before[0], calls(server, method=TRACK) - before[1]) == (1, 1)
    assert kinds(rdb, keys) == ["event", "product_unavailable", "purchase"]


def test_sync_client_and_batcher_track(
    api_key: str, grpc_target: str, rdb: redis.Redis, keys: KeySpace
) -> None:
    with SyncEventsClient(grpc_target, api_key=api_key) as client:
        reply = client.track([mapping()])
        assert [r.status for r in reply.results] == [ACCEPTED]
        with client.batcher(max_events=2, max_delay_seconds=60) as batcher:
            first = batcher.track(mapping())
            second = batcher.track(purchase())
            assert first.result(10).status == DUPLICATE
            assert second.result(10).status == ACCEPTED
    assert kinds(rdb, keys) == ["purchase", "transaction_mapping"]
