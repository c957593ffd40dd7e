"""The front door's medium and low rows (issue 19): sockets that never send a frame,
storefront origins in Unicode, frame ids outside Latin-1."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from typing import Any

import pytest
import redis
from websockets.exceptions import ConnectionClosed

from events_server.queue.keys import KeySpace
from events_server.server.settings import Settings
from events_server.wire.origins import normalize_origin
from tests.harness.processes import run_events_server
from tests.harness.streams import queued
from tests.harness.ws import ask, event, frame, opened, own_bridge, run, with_ws_id
from tests.harness.ws_attacks import CONT, PING, PONG, TEXT, open_ws, read_frame, ws_frame

SLOTS = 8
CLOSE = 0x8


def test_silent_sockets_cannot_keep_a_storefront_out(grpc_target: str, api_key: str) -> None:
    # One client holds every WebSocket slot left with sockets that never send a frame; a
    # storefront's socket still opens (the one silent longest is closed, 1013), and one
    # in use is never the one closed.
    with own_bridge(grpc_target, ws_max_connections=SLOTS) as base:

        async def scenario() -> tuple[dict[str, Any], dict[str, Any]]:
            async with opened(base, api_key) as busy:
                first = await ask(busy, frame("busy-1", event()))
                silent = [await asyncio.to_thread(open_ws, base, api_key) for _ in range(SLOTS - 1)]
                try:
                    async with opened(base, api_key) as storefront:
                        answer = await ask(storefront, frame("let-in", event()))
                    assert (await ask(busy, frame("busy-2", event())))["status"] == "ok"
                finally:
                    for sock in silent:
                        sock.close()
                return first, answer

        first, answer = run(scenario())
    assert first["status"] == "ok"
    assert answer == {"id": "let-in", "status": "ok"}


def test_a_socket_that_never_sends_a_frame_is_closed_sooner(grpc_target: str, api_key: str) -> None:
    with own_bridge(grpc_target, ws_silent_timeout_seconds=0.5) as base:

        async def scenario() -> tuple[int, bool]:
            async with opened(base, api_key) as silent, opened(base, api_key) as talking:
                await ask(talking, frame("spoke", event()))
                with pytest.raises(ConnectionClosed) as caught:
                    await asyncio.wait_for(silent.recv(), 10)
                assert caught.value.rcvd is not None
                await asyncio.sleep(1.0)  # past the silent timeout: the other stays open
                answered = (await ask(talking, frame("still", event())))["status"] == "ok"
                return caught.value.rcvd.code, answered

        assert run(scenario()) == (1000, True)


def test_frame_ids_are_checked_as_the_characters_they_are(
    bridge: str, api_key: str, rdb: redis.Redis, keys: KeySpace
) -> None:
    # "x€1" once became "x?1" on its way to the server, which deduplicates on it: the
    # second event was answered ok and never queued.
    ids = ["x€1", "x?1", "x%E2%82%AC1"]

    async def scenario() -> list[dict[str, Any]]:
        async with opened(bridge, api_key) as ws:
            return [await ask(ws, frame(i, event(user_id=f"u-{n}"))) for n, i in enumerate(ids)]

    assert run(scenario()) == [{"id": i, "status": "ok"} for i in ids]
    assert sorted(e.event.user_id for _, e in queued(rdb, keys)) == ["u-0", "u-1", "u-2"]
    assert len(with_ws_id(rdb, keys, "x?1")) == 1


def test_an_origin_in_unicode_is_stored_as_browsers_send_it() -> None:
    assert normalize_origin("https://bücher.example") == "https://xn--bcher-kva.example"
    assert normalize_origin("https://BÜCHER.example:8443") == "https://xn--bcher-kva.example:8443"
    assert normalize_origin("https://xn--bcher-kva.example") == "https://xn--bcher-kva.example"
    with pytest.raises(ValueError, match="host"):
        normalize_origin("https://bü..example")


def test_a_storefront_added_in_unicode_opens_from_its_browser_origin(
    bridge: str, settings: Settings, rdb: redis.Redis
) -> None:
    label = f"bücher-{uuid.uuid4().hex[:6]}"
    added = run_events_server(
        settings, "storefronts", "add", "--tenant", "shop-a", "--origin", f"https://{label}.example"
    )
    browser = f"https://{label.encode('idna').decode()}.example"  # what a browser sends
    assert browser in added.stdout

    async def scenario() -> dict[str, Any]:
        async with opened(bridge, origin=browser) as ws:
            return await ask(ws, frame("idn", event("shop-a")))

    assert run(scenario()) == {"id": "idn", "status": "ok"}


def test_a_message_in_too_many_fragments_closes_the_socket_with_1009(
    bridge: str, api_key: str
) -> None:
    sock = open_ws(bridge, api_key)
    try:
        sock.settimeout(10)
        text = frame("split", event()).encode()
        pieces = [text[i : i + 4] for i in range(0, 4 * 17, 4)]  # 17 fragments, unfinished
        sock.sendall(
            ws_frame(TEXT, pieces[0], fin=False)
            + b"".join(ws_frame(CONT, p, fin=False) for p in pieces[1:])
        )
        opcode, payload = read_frame(sock)
    finally:
        sock.close()
    assert opcode == CLOSE
    assert int.from_bytes(payload[:2], "big") == 1009
    assert payload[2:] == b"a message in more than 16 frames (ws_max_fragments)"


def test_pings_past_ten_a_second_go_unanswered(bridge: str, api_key: str) -> None:
    sock = open_ws(bridge, api_key)
    try:
        sock.settimeout(2)
        sock.sendall(b"".join(ws_frame(PING, b"%d" % n) for n in range(30)))
        pongs = []
        with contextlib.suppress(TimeoutError):
            while True:
                opcode, payload = read_frame(sock)
                assert opcode == PONG
                pongs.append(payload)
        sock.sendall(ws_frame(PING, b"later"))  # the next second: answered again
        sock.settimeout(5)
        after = read_frame(sock)
    finally:
        sock.close()
    assert pongs == [b"%d" % n for n in range(10)]
    assert after == (PONG, b"later")
