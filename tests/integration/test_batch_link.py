"""The batch link (events_server.server.batch_link, rest_bridge.batch_link): the bridge's
batches on it, counted as gathered calls; a ticket only for the bridge; and the link's port
attacked as an outsider would (no ticket, a forged or replayed one, silence, a flood of
connections, garbage, a frame over the limit, a client that never reads), each beside a
legitimate gatherer whose answers and latency are asserted. Falling back to the gRPC
stream where no link is offered, and the drain at shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
import redis

from events_server.pb import events_pb2 as pb
from events_server.pb import events_pb2_grpc
from events_server.queue.keys import KeySpace
from events_server.server.batch_link import MAX_HANDSHAKES, MAX_HANDSHAKES_PER_PEER
from events_server.server.gathered_stream import STREAM_BATCHES
from events_server.server.settings import Settings
from events_server.wire.batch_link import (
    ACCEPTED,
    HANDSHAKE_SECONDS,
    HEADER,
    TICKET_BYTES,
    frame,
)
from events_server.wire.metadata import GATHERED_METHOD, GATHERED_STREAM_METHOD
from rest_bridge.gather import Gatherer
from tests.harness.data import ev
from tests.harness.gathering import batch, drained, gatherer_on
from tests.harness.metrics import scrape, server_metrics_url, value
from tests.harness.servers import LoopThread, serving
from tests.harness.streams import queued
from tests.harness.waiting import eventually, until
from tests.harness.ws import (
    ask,
    nothing_arrives,
    opened,
    own_bridge,
    resent_until_answered,
    run,
    until_counted,
    with_ws_id,
)
from tests.harness.ws import event as ws_event
from tests.harness.ws import frame as frame_text

LEGIT_SECONDS = 2.0
"""How long the legitimate gatherer's request may take beside an attack (it takes a few
milliseconds alone): not a speed test, a test that the attack did not hold it up."""


def linked_gatherer(channel: grpc.aio.Channel) -> Gatherer:
    """A bridge's gatherer on ``channel``, on the batch link, as the bridge builds it."""
    return gatherer_on(channel, link_host="127.0.0.1")


@pytest.fixture
def own_server(loop: LoopThread, settings: Settings, rdb: redis.Redis) -> Iterator[Any]:
    """A server of this test's own (its links and metrics are this test's alone)."""
    with serving(loop, settings) as (server, target):
        yield server, target


async def legit(gatherer: Gatherer, api_key: str, user: str) -> float:
    """One legitimate request's seconds (asserted answered)."""
    started = time.perf_counter()
    reply = await gatherer.create_events(
        pb.CreateEventsRequest(events=[ev(user_id=user)]), (("x-api-key", api_key),)
    )
    assert reply.accepted == 1
    return time.perf_counter() - started


async def ticket(target: str) -> pb.BatchLinkOffer:
    """A ticket, asked as the bridge asks it (a loopback caller is the bridge here)."""
    async with grpc.aio.insecure_channel(target) as channel:
        offer: pb.BatchLinkOffer = await events_pb2_grpc.BridgeIngestStub(channel).OpenBatchLink(
            pb.BatchLinkRequest()
        )
    return offer


async def closed_by_server(reader: asyncio.StreamReader, within: float = 5.0) -> bytes:
    """What the server sent before closing the connection (it must close it in time; a
    reset, when it closed with bytes of ours unread, is a close too)."""
    try:
        return await asyncio.wait_for(reader.read(), within)
    except ConnectionResetError:
        return b""


def test_batches_go_on_the_link_and_each_counts_as_a_gathered_call(
    loop: LoopThread, own_server: Any, api_key: str, rdb: redis.Redis, keys: KeySpace
) -> None:
    server, target = own_server
    before = scrape(server_metrics_url(server))

    async def scenario() -> tuple[int, list[int], bool]:
        async with grpc.aio.insecure_channel(target) as channel:
            gatherer = linked_gatherer(channel)
            metadata = (("x-api-key", api_key),)
            replies: list[pb.CreateEventsResponse] = []
            for wave in range(3):
                replies += await asyncio.gather(
                    *(
                        gatherer.create_events(
                            pb.CreateEventsRequest(events=[ev(user_id=f"w{wave}-{n}")]), metadata
                        )
                        for n in range(20)
                    )
                )
            on_link = gatherer.link._connection is not None and len(server.links.links) == 1
            gatherer.link.close()
            return gatherer.calls, [reply.accepted for reply in replies], on_link

    calls, accepted, on_link = loop.run(scenario())
    after = scrape(server_metrics_url(server))

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert accepted == [1] * 60
    assert len(queued(rdb, keys)) == 60
    assert on_link
    assert calls > 1
    assert grew("events_grpc_request_duration_seconds_count", method=GATHERED_STREAM_METHOD) == 0
    assert grew("events_grpc_requests_total", method=GATHERED_METHOD, code="OK") == calls
    assert grew("events_gathered_requests_total", code="OK") == 60


def test_only_the_bridge_gets_a_ticket(loop: LoopThread, settings: Settings, api_key: str) -> None:
    token = "a-bridge-token-of-16+-chars"

    async def scenario(target: str) -> tuple[grpc.StatusCode, str, int]:
        async with grpc.aio.insecure_channel(target) as channel:
            stub = events_pb2_grpc.BridgeIngestStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.OpenBatchLink(pb.BatchLinkRequest())
            offer = await stub.OpenBatchLink(
                pb.BatchLinkRequest(), metadata=(("x-events-bridge-token", token),)
            )
        return refused.value.code(), refused.value.details() or "", len(offer.ticket)

    with serving(loop, Settings(**{**settings.model_dump(), "bridge_token": token})) as (_, target):
        code, details, ticket_bytes = loop.run(scenario(target))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert "is for the REST bridge only" in details
    assert ticket_bytes == TICKET_BYTES  # the bridge, known by its token, gets one


@pytest.mark.parametrize(
    "opening",
    [
        pytest.param("batch", id="a-batch-without-a-ticket"),
        pytest.param("forged", id="a-forged-ticket"),
        pytest.param("replayed", id="a-ticket-used-already"),
        pytest.param("garbage", id="a-megabyte-of-garbage"),
        pytest.param("more", id="a-ticket-and-a-batch-before-it-is-taken"),
    ],
)
def test_a_connection_without_a_good_ticket_is_closed_and_nothing_is_stored(
    *,
    loop: LoopThread,
    own_server: Any,
    api_key: str,
    rdb: redis.Redis,
    keys: KeySpace,
    opening: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server, target = own_server
    port = server.links.port
    before = scrape(server_metrics_url(server))

    async def scenario() -> tuple[bytes, list[float]]:
        async with grpc.aio.insecure_channel(target) as channel:
            gatherer = linked_gatherer(channel)
            seconds = [await legit(gatherer, api_key, "before")]
            attack = frame(batch(1, api_key, "intruder").SerializeToString())
            if opening == "forged":
                attack = frame(os.urandom(TICKET_BYTES)) + attack
            elif opening == "replayed":
                offer = await ticket(target)
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(frame(offer.ticket))
                assert await reader.readexactly(len(ACCEPTED)) == ACCEPTED  # its first use
                writer.close()
                attack = frame(offer.ticket) + attack
            elif opening == "garbage":
                attack = os.urandom(1 << 20)
            elif opening == "more":
                attack = frame((await ticket(target)).ticket) + attack
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            with contextlib.suppress(ConnectionError):
                writer.write(attack)
                await writer.drain()
            got = await closed_by_server(reader)
            seconds.append(await legit(gatherer, api_key, "after"))
            writer.close()
            gatherer.link.close()
            return got, seconds

    with caplog.at_level(logging.WARNING, logger="events_server.server.batch_link"):
        got, seconds = loop.run(scenario())
    assert got == b""  # closed, and nothing answered (not even ACCEPTED)
    assert max(seconds) < LEGIT_SECONDS
    users = {e.event.user_id for _, e in queued(rdb, keys)}
    assert users == {"before", "after"}  # the intruder's event is not stored
    assert any("batch link: refused" in r.getMessage() for r in caplog.records)
    after = scrape(server_metrics_url(server))
    connections = "events_batch_link_connections_total"
    assert (
        value(after, connections, outcome="refused") - value(before, connections, outcome="refused")
        == 1
    )


def test_a_silent_connection_is_closed_after_the_handshake_seconds(
    loop: LoopThread, own_server: Any, api_key: str
) -> None:
    server, target = own_server

    async def scenario() -> tuple[float, float]:
        async with grpc.aio.insecure_channel(target) as channel:
            gatherer = linked_gatherer(channel)
            reader, writer = await asyncio.open_connection("127.0.0.1", server.links.port)
            started = time.perf_counter()
            # The legitimate requests go on beside the silent connection.
            seconds = max([await legit(gatherer, api_key, f"beside-{n}") for n in range(5)])
            assert await closed_by_server(reader, HANDSHAKE_SECONDS + 3) == b""
            waited = time.perf_counter() - started
            writer.close()
            gatherer.link.close()
            return waited, seconds

    waited, seconds = loop.run(scenario())
    assert HANDSHAKE_SECONDS - 0.1 <= waited < HANDSHAKE_SECONDS + 2
    assert seconds < LEGIT_SECONDS


async def flood(port: int, sources: list[str], each: int) -> list[socket.socket]:
    """``each`` connections to the link's port from each of ``sources`` (loopback
    addresses), sending nothing. Plain sockets, not blocking (the server accepts on this
    same loop), so that each is made whether or not the server closes it."""
    sockets = []
    for source in sources:
        for _ in range(each):
            sock = socket.socket()
            sock.setblocking(False)
            sock.bind((source, 0))
            await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
            sockets.append(sock)
    return sockets


def closed_of(sockets: list[socket.socket]) -> int:
    """How many of ``sockets`` the server has closed."""
    closed = 0
    for sock in sockets:
        try:
            closed += sock.recv(1) == b""
        except BlockingIOError:  # open, and nothing sent
            pass
        except ConnectionResetError:
            closed += 1
    return closed


def test_a_flood_from_many_addresses_is_bounded_and_the_bridge_is_still_served(
    loop: LoopThread, own_server: Any, api_key: str
) -> None:
    server, target = own_server
    sources = [f"127.0.0.{n}" for n in range(2, 12)]  # 10 hosts, 10 connections each

    async def scenario() -> tuple[int, int, float]:
        async with grpc.aio.insecure_channel(target) as channel:
            gatherer = linked_gatherer(channel)
            await legit(gatherer, api_key, "opens-the-link")  # the bridge's link is open
            sockets = await flood(server.links.port, sources, 10)
            await until(lambda: server.links.handshaking == MAX_HANDSHAKES, within=5)
            seconds = max([await legit(gatherer, api_key, f"beside-{n}") for n in range(5)])
            await asyncio.sleep(0.2)
            closed = closed_of(sockets)
            waiting = server.links.handshaking
            for sock in sockets:
                sock.close()
            gatherer.link.close()
            return closed, waiting, seconds

    closed, waiting, seconds = loop.run(scenario())
    assert waiting == MAX_HANDSHAKES  # never more waiting for a ticket at once
    assert closed == 100 - MAX_HANDSHAKES  # the rest closed on arrival
    assert seconds < LEGIT_SECONDS
    eventually(lambda: server.links.handshaking == 0)  # and each is let go when it goes


def test_a_flood_from_one_address_leaves_room_for_the_bridge_to_open_its_link(
    loop: LoopThread, own_server: Any, api_key: str
) -> None:
    server, target = own_server

    async def scenario() -> tuple[int, int, float, bool]:
        sockets = await flood(server.links.port, ["127.0.0.2"], 40)
        await until(lambda: server.links.handshaking == MAX_HANDSHAKES_PER_PEER, within=5)
        async with grpc.aio.insecure_channel(target) as channel:
            gatherer = linked_gatherer(channel)  # opens its link during the flood
            seconds = max([await legit(gatherer, api_key, f"during-{n}") for n in range(5)])
            linked = gatherer.link._connection is not None
            gatherer.link.close()
        await asyncio.sleep(0.2)
        closed = closed_of(sockets)
        waiting = server.links.handshaking
        for sock in sockets:
            sock.close()
        return closed, waiting, seconds, linked

    closed, waiting, seconds, linked = loop.run(scenario())
    assert waiting == MAX_HANDSHAKES_PER_PEER
    assert closed == 40 - MAX_HANDSHAKES_PER_PEER
    assert linked  # on the link, not pushed back to the gRPC stream
    assert seconds < LEGIT_SECONDS


def test_a_frame_over_the_limit_ends_the_link_unread(
    loop: LoopThread, own_server: Any, api_key: str, rdb: redis.Redis, keys: KeySpace
) -> None:
    server, target = own_server

    async def scenario() -> tuple[bytes, float]:
        async with grpc.aio.insecure_channel(target) as channel:
            gatherer = linked_gatherer(channel)
            reader, writer = await asyncio.open_connection("127.0.0.1", server.links.port)
            writer.write(frame((await ticket(target)).ticket))
            assert await reader.readexactly(len(ACCEPTED)) == ACCEPTED
            # Announces 4 GiB - 1 and sends a little of it: closed on the header alone.
            writer.write(HEADER.pack(0xFFFFFFFF) + b"x" * 1024)
            got = await closed_by_server(reader)
            seconds = await legit(gatherer, api_key, "beside")
            writer.close()
            gatherer.link.close()
            return got, seconds

    got, seconds = loop.run(scenario())
    assert got == b""
    assert seconds < LEGIT_SECONDS
    assert [e.event.user_id for _, e in queued(rdb, keys)] == ["beside"]


def test_a_link_that_never_reads_is_worked_a_bounded_number_at_a_time(
    loop: LoopThread, own_server: Any, api_key: str, rdb: redis.Redis
) -> None:
    server, target = own_server
    count = STREAM_BATCHES * 6

    async def scenario() -> tuple[int, float, int]:
        async with grpc.aio.insecure_channel(target) as channel:
            gatherer = linked_gatherer(channel)
            reader, writer = await asyncio.open_connection("127.0.0.1", server.links.port)
            writer.write(frame((await ticket(target)).ticket))
            assert await reader.readexactly(len(ACCEPTED)) == ACCEPTED
            # Redis holds every write a moment: the batches read stay in the server.
            await asyncio.to_thread(rdb.client_pause, 600)
            writer.write(
                b"".join(
                    frame(batch(n, api_key, f"f{n}").SerializeToString())
                    for n in range(1, count + 1)
                )
            )
            peak = 0
            ends = time.perf_counter() + 0.5
            while time.perf_counter() < ends:
                peak = max(peak, sum(link.working for link in server.links.links))
                await asyncio.sleep(0.002)
            await until(lambda: not any(link.working for link in server.links.links), within=10)
            seconds = await legit(gatherer, api_key, "beside")
            # It never reads: every batch was still worked, a bounded number at a time.
            answers = 0
            buffered = await asyncio.wait_for(reader.read(1 << 22), 5)
            answers += len(buffered)
            writer.close()
            gatherer.link.close()
            return peak, seconds, answers

    peak, seconds, answered_bytes = loop.run(scenario())
    # The legitimate gatherer's own link counts a batch at most.
    assert STREAM_BATCHES <= peak <= STREAM_BATCHES + 1
    assert seconds < LEGIT_SECONDS + 0.6  # Redis was paused for 0.6 s of it
    assert answered_bytes > 0


def test_without_a_link_offered_batches_go_on_the_stream_with_one_warning(
    loop: LoopThread, settings: Settings, api_key: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario(target: str) -> tuple[list[int], bool]:
        async with grpc.aio.insecure_channel(target) as channel:
            gatherer = linked_gatherer(channel)
            metadata = (("x-api-key", api_key),)
            replies = []
            for wave in range(2):
                replies += await asyncio.gather(
                    *(
                        gatherer.create_events(
                            pb.CreateEventsRequest(events=[ev(user_id=f"s{wave}{n}")]), metadata
                        )
                        for n in range(10)
                    )
                )
            return [r.accepted for r in replies], gatherer.link._connection is None

    no_link = Settings(**{**settings.model_dump(), "batch_link": False})
    with (
        caplog.at_level(logging.WARNING, logger="rest_bridge.batch_link"),
        serving(loop, no_link) as (server, target),
    ):
        assert server.links is not None
        assert server.links.port == 0
        accepted, unlinked = loop.run(scenario(target))
    assert accepted == [1] * 20
    assert unlinked
    warnings = [r for r in caplog.records if "no batch link" in r.getMessage()]
    assert len(warnings) == 1  # said once, not per batch


def test_a_stopping_server_drains_the_link_and_answers_what_it_read(
    loop: LoopThread, settings: Settings, api_key: str, rdb: redis.Redis, keys: KeySpace
) -> None:
    async def scenario(server: Any, target: str) -> tuple[list[Any], grpc.StatusCode | None]:
        async with grpc.aio.insecure_channel(target) as channel:
            gatherer = linked_gatherer(channel)

            def told() -> bool:
                connection = gatherer.link._connection
                return connection is not None and connection.over

            return await drained(server, gatherer, rdb, api_key, told)

    with serving(loop, settings) as (server, target):
        answers, late = loop.run(scenario(server, target))
    # What was out when the server began to stop was read before it drained: answered.
    assert [getattr(a, "accepted", a) for a in answers] == [1] * 5
    # Later, no batch on that link, and no new one: the stopping server refuses it.
    assert late == grpc.StatusCode.UNAVAILABLE
    assert {f"out-{n}" for n in range(5)} <= {e.event.user_id for _, e in queued(rdb, keys)}


def test_a_link_cut_under_a_frame_leaves_it_unanswered_and_the_resend_is_queued_once(
    loop: LoopThread, own_server: Any, api_key: str, rdb: redis.Redis, keys: KeySpace
) -> None:
    server, target = own_server
    text = frame_text("cut-link", ws_event(user_id="u-cut"))

    async def cut() -> int:
        links = list(server.links.links)
        for link in links:
            link.close()
        return len(links)

    with own_bridge(target) as base:

        async def scenario() -> tuple[int, dict[str, Any]]:
            async with opened(base, api_key) as ws:
                await ask(ws, frame_text("warm-up", ws_event()))  # the link is up
                # Redis holds the write: the batch is in the server when its link is cut.
                await asyncio.to_thread(rdb.client_pause, 700)
                await ws.send(text)
                await until(lambda: any(link.working for link in server.links.links), within=5)
                cuts = await asyncio.to_thread(loop.run, cut())
                await until_counted(base, "unanswered", 1)
                assert await nothing_arrives(ws)  # never a not-ok for it
                return cuts, await resent_until_answered(ws, text, "cut-link")

        cuts, answer = run(scenario())
    assert cuts == 1
    assert answer == {"id": "cut-link", "status": "ok"}
    # Queued once: by the first attempt (its write was in Redis's hands) or by the resend.
    [envelope] = with_ws_id(rdb, keys, "cut-link")
    assert envelope.event.user_id == "u-cut"


def test_a_link_port_that_cannot_be_reached_is_tried_again_ever_less_often(
    loop: LoopThread,
    own_server: Any,
    api_key: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server, target = own_server

    async def scenario() -> tuple[list[float], bool]:
        # The server offers its port, but nothing listens there any more (a firewall, a
        # port not published): each connection is refused.
        await asyncio.to_thread(loop.run, closed_listener(server))
        async with grpc.aio.insecure_channel(target) as channel:
            gatherer = linked_gatherer(channel)
            seconds = []
            for attempt in range(3):
                seconds.append(await legit(gatherer, api_key, f"refused-{attempt}"))
                gatherer.link.fallback_until = 0.0  # as if its window had passed
            return seconds, gatherer.link._connection is None

    with caplog.at_level(logging.WARNING, logger="rest_bridge.batch_link"):
        seconds, unlinked = loop.run(scenario())
    assert unlinked
    assert max(seconds) < LEGIT_SECONDS  # answered on the gRPC stream meanwhile
    windows = [r.getMessage().rsplit(" for ", 1)[1] for r in caplog.records]
    assert windows == ["30 s", "60 s", "120 s"]  # each failure in a row doubles the wait


async def closed_listener(server: Any) -> None:
    server.links._listener.close()
    await server.links._listener.wait_closed()
