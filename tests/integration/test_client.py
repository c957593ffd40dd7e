"""events_server.client against the real server: ids, validation, refusals, batches."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
import pytest
import redis

from events_server.client import (
    EventsClient,
    InvalidEventsError,
    PermissionDeniedError,
    SyncEventsClient,
    UnauthenticatedError,
    UnavailableError,
)
from events_server.pb import events_pb2 as pb
from events_server.pb import events_pb2_grpc
from events_server.queue.keys import KeySpace
from events_server.server.app import EventsServer
from events_server.server.settings import Settings
from events_server.wire.violations import FieldViolation
from tests.harness.data import contract_examples, ev
from tests.harness.metrics import calls
from tests.harness.rpc import ACCEPTED, DUPLICATE
from tests.harness.streams import queued
from tests.harness.valkey import free_port

T = TypeVar("T")


# The contract's first example.
EXAMPLE_EVENT: dict[str, Any] = contract_examples()[0][0]


# --- sending -----------------------------------------------------------------------


def test_dicts_and_typed_events_are_queued_with_ids_filled_in(
    api_key: str, grpc_target: str, rdb: redis.Redis, keys: KeySpace
) -> None:
    typed = ev()
    own_id = ev(deduplication_id="order-7")

    async def send() -> pb.CreateEventsResponse:
        async with EventsClient(grpc_target, api_key=api_key) as client:
            return await client.send([EXAMPLE_EVENT, typed, own_id])

    reply = asyncio.run(send())
    assert [r.status for r in reply.results] == [ACCEPTED] * 3
    assert not typed.HasField("deduplication_id")  # the caller's message is left alone
    ids = {e.event.deduplication_id for _, e in queued(rdb, keys)}
    assert "order-7" in ids
    filled = ids - {"order-7"}
    assert len(filled) == 2
    assert all(uuid.UUID(i).version == 4 for i in filled)
    example = next(e.event for _, e in queued(rdb, keys) if e.event.type == pb.EVENT_TYPE_PAGE_VIEW)
    assert example.entity_identifiers == {"sku": "31415"}
    assert example.url == EXAMPLE_EVENT["url"]


def test_malformed_dicts_are_refused_before_sending(
    api_key: str, grpc_target: str, server: EventsServer, rdb: redis.Redis, keys: KeySpace
) -> None:
    before = calls(server, "INVALID_ARGUMENT") + calls(server)
    bad: list[Any] = [
        {"tenant": "t", "market": "m", "type": "refund"},
        {"tenant": 5, "type": "click", "colour": "red", "variant_ids": "v1"},
        "page_view",
        {**EXAMPLE_EVENT, "user_id": "\ud800", "variant_ids": ["ok", "\udfff"]},
    ]

    async def send() -> None:
        async with EventsClient(grpc_target, api_key=api_key) as client:
            await client.send([EXAMPLE_EVENT, *bad])

    with pytest.raises(InvalidEventsError) as caught:
        asyncio.run(send())
    assert [(v.field, v.reason) for v in caught.value.violations] == [
        ("events[1].type", "enum"),
        ("events[2].tenant", "string_type"),
        ("events[2].colour", "extra_forbidden"),
        ("events[2].variant_ids", "list_type"),
        ("events[2].market", "missing"),
        ("events[3]", "type"),
        ("events[4].user_id", "string_unicode"),
        ("events[4].variant_ids", "string_unicode"),
    ]
    assert caught.value.request_id is None  # never sent
    assert calls(server, "INVALID_ARGUMENT") + calls(server) == before
    assert queued(rdb, keys) == []


def test_invalid_argument_carries_the_servers_violations(
    api_key: str, grpc_target: str, rdb: redis.Redis, keys: KeySpace
) -> None:
    async def send() -> None:
        async with EventsClient(grpc_target, api_key=api_key) as client:
            await client.send([ev(), ev(tenant="", dsid=""), ev(type=0)])

    with pytest.raises(InvalidEventsError) as caught:
        asyncio.run(send())
    error = caught.value
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.violations == [
        FieldViolation("events[1].tenant", "tenant must not be empty", "string_too_short"),
        FieldViolation("events[1].dsid", "dsid must not be empty when set", "string_too_short"),
        FieldViolation(
            "events[2].type",
            "type is required (EVENT_TYPE_UNSPECIFIED is not a type)",
            "missing",
        ),
    ]
    assert error.request_id
    assert error.request_id in str(error)
    assert queued(rdb, keys) == []


class Refusing(events_pb2_grpc.EventsServiceServicer):
    """A real EventsService that refuses every call with one status, as auth will."""

    def __init__(self, code: grpc.StatusCode) -> None:
        self.code = code
        self.api_keys: list[str | None] = []

    async def CreateEvents(
        self, request: pb.CreateEventsRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.CreateEventsResponse:
        metadata = dict(context.invocation_metadata() or ())
        self.api_keys.append(metadata.get("x-api-key"))  # type: ignore[arg-type]
        await context.abort(self.code, "no")
        raise AssertionError("abort raises")

    async def Track(
        self, request: pb.TrackRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.CreateEventsResponse:
        await context.abort(self.code, "no")
        raise AssertionError("abort raises")


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        (grpc.StatusCode.UNAUTHENTICATED, UnauthenticatedError),
        (grpc.StatusCode.PERMISSION_DENIED, PermissionDeniedError),
    ],
)
def test_auth_refusals_are_their_own_exceptions_and_not_retried(
    code: grpc.StatusCode, kind: type[Exception]
) -> None:
    refusing = Refusing(code)

    async def scenario() -> None:
        server = grpc.aio.server()
        events_pb2_grpc.add_EventsServiceServicer_to_server(refusing, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with EventsClient(f"127.0.0.1:{port}", api_key="k-123") as client:
                await client.send([ev()])
        finally:
            await server.stop(0)

    with pytest.raises(kind) as caught:
        asyncio.run(scenario())
    assert caught.value.code == code  # type: ignore[attr-defined]
    assert refusing.api_keys == ["k-123"]  # sent once, with the key as metadata


# --- the batcher ----------------------------------------------------------------------


Futures = list[asyncio.Future[pb.EventResult]]


def batched(
    server: EventsServer,
    target: str,
    api_key: str,
    count: int,
    observe: Callable[[Futures], Awaitable[T]],
    **limits: Any,
) -> tuple[list[pb.EventResult], T, float]:
    """Add ``count`` events (users u-0...) to a batcher of these ``limits``, ``observe`` their
    futures, close the batcher: the results, what was observed, the calls the server got."""

    async def scenario() -> tuple[list[pb.EventResult], T]:
        async with EventsClient(target, api_key=api_key) as client:
            batcher = client.batcher(**limits)
            futures = [await batcher.add(ev(user_id=f"u-{i}")) for i in range(count)]
            seen = await observe(futures)
            await batcher.close()
            return [future.result() for future in futures], seen

    before = calls(server)
    results, seen = asyncio.run(scenario())
    return results, seen, calls(server) - before


def test_batcher_flushes_when_full(
    api_key: str, grpc_target: str, server: EventsServer, rdb: redis.Redis, keys: KeySpace
) -> None:
    async def fourth_waiting(futures: Futures) -> bool:
        # Three filled a batch and went out at once; the fourth waits for more (or 60 s).
        await asyncio.wait_for(asyncio.gather(*futures[:3]), 10)
        return not futures[3].done()

    results, waiting, sent = batched(
        server, grpc_target, api_key, 4, fourth_waiting, max_events=3, max_delay_seconds=60
    )
    assert waiting
    assert [r.status for r in results] == [ACCEPTED] * 4
    assert sent == 2  # the full batch, then the rest on close
    assert len(queued(rdb, keys)) == 4


def test_batcher_flushes_after_the_delay(
    api_key: str, grpc_target: str, server: EventsServer, rdb: redis.Redis, keys: KeySpace
) -> None:
    async def queued_early(futures: Futures) -> int:
        early = len(queued(rdb, keys))  # still held by the batcher
        await asyncio.wait_for(asyncio.gather(*futures), 10)  # sent before the close
        return early

    results, early, sent = batched(
        server, grpc_target, api_key, 2, queued_early, max_events=1000, max_delay_seconds=1.0
    )
    assert early == 0
    assert [r.status for r in results] == [ACCEPTED, ACCEPTED]
    assert sent == 1  # both in one call
    assert len(queued(rdb, keys)) == 2


def test_batcher_refuses_a_bad_event_without_sinking_its_batch(
    api_key: str, grpc_target: str, rdb: redis.Redis, keys: KeySpace
) -> None:
    async def scenario() -> pb.EventResult:
        async with (
            EventsClient(grpc_target, api_key=api_key) as client,
            client.batcher(max_delay_seconds=0.05) as b,
        ):
            good = await b.add(ev(user_id="good"))
            with pytest.raises(InvalidEventsError) as caught:
                await b.add(ev(tenant=""))
            assert [(v.field, v.reason) for v in caught.value.violations] == [
                ("event.tenant", "string_too_short")
            ]
            with pytest.raises(InvalidEventsError):
                await b.add({"tenant": "t", "market": "m"})
            return await good

    assert asyncio.run(scenario()).status == ACCEPTED
    assert [e.event.user_id for _, e in queued(rdb, keys)] == ["good"]


def test_an_event_only_the_server_can_refuse_fails_alone_and_the_rest_is_queued(
    api_key: str, grpc_target: str, settings: Settings, rdb: redis.Redis, keys: KeySpace
) -> None:
    too_long = "x" * (settings.max_string_length + 1)  # a server limit add() cannot know

    async def scenario() -> list[BaseException | pb.EventResult]:
        async with (
            EventsClient(grpc_target, api_key=api_key) as client,
            client.batcher(max_events=4, max_delay_seconds=5) as b,
        ):
            futures = [
                await b.add(ev(user_id="first")),
                await b.add(ev(user_id="long", url=too_long)),
                await b.add(ev(user_id="third")),
                await b.add(ev(user_id="fourth")),
            ]
            return list(await asyncio.gather(*futures, return_exceptions=True))

    first, long, third, fourth = asyncio.run(scenario())
    assert isinstance(long, InvalidEventsError)
    assert [(v.field, v.reason) for v in long.violations] == [("event.url", "string_too_long")]
    assert [r.status for r in (first, third, fourth)] == [ACCEPTED] * 3  # type: ignore[union-attr]
    assert sorted(e.event.user_id for _, e in queued(rdb, keys)) == ["first", "fourth", "third"]


def test_batcher_failures_reach_every_future(
    api_key: str,
) -> None:
    async def scenario() -> list[BaseException | pb.EventResult]:
        target = f"127.0.0.1:{free_port()}"  # nobody there
        async with EventsClient(target, deadline_seconds=0.3, api_key=api_key) as client:
            batcher = client.batcher(max_events=2)
            futures = [await batcher.add(ev()) for _ in range(2)]
            await batcher.close()
            return await asyncio.gather(*futures, return_exceptions=True)

    outcomes = asyncio.run(scenario())
    assert len(outcomes) == 2
    assert all(isinstance(o, UnavailableError) for o in outcomes)


# --- without an event loop ------------------------------------------------------------


def test_sync_client_and_batcher(
    api_key: str, grpc_target: str, rdb: redis.Redis, keys: KeySpace
) -> None:
    with SyncEventsClient(grpc_target, api_key=api_key) as client:
        reply = client.send([{**EXAMPLE_EVENT, "deduplication_id": "s-1"}])
        assert [r.status for r in reply.results] == [ACCEPTED]
        with client.batcher(max_events=2, max_delay_seconds=60) as batcher:
            first = batcher.add({**EXAMPLE_EVENT, "deduplication_id": "s-1"})
            second = batcher.add(ev(deduplication_id="s-2"))
            assert first.result(10).status == DUPLICATE
            assert second.result(10).status == ACCEPTED
        with pytest.raises(InvalidEventsError):
            client.send([ev(market="")])
    assert len(queued(rdb, keys)) == 2
