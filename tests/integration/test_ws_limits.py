"""WebSocket /ws/create-events under faults (a lost reply, Redis down) and at its bounds."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from typing import Any

import pytest
import redis
from websockets.exceptions import ConnectionClosed, InvalidStatus

from events_server.queue.keys import KeySpace
from events_server.server.settings import Settings
from tests.harness.metrics import scrape, value
from tests.harness.proxy import FaultProxy, proxy_to
from tests.harness.servers import LoopThread, serving
from tests.harness.streams import queued
from tests.harness.valkey import SessionValkey
from tests.harness.waiting import eventually
from tests.harness.ws import (
    PATH,
    ask,
    event,
    frame,
    frames_counted,
    nothing_arrives,
    opened,
    own_bridge,
    refused,
    resent_until_answered,
    run,
    until_counted,
    with_ws_id,
)

# --- faults: nothing is acknowledged that is not in Redis, and resends are queued once ---


def test_a_reply_lost_on_the_way_back_is_unanswered_and_the_resend_is_queued_once(
    grpc_target: str, api_key: str, rdb: redis.Redis, keys: KeySpace
) -> None:
    proxy = FaultProxy("127.0.0.1", int(grpc_target.rsplit(":", 1)[1]), protocol="http2")
    text = frame("lost-reply", event(user_id="u-lost"))
    try:
        # On the gRPC stream: the proxy sits on the gRPC hop, and the batch link would go
        # around it (test_batch_link.py cuts the link itself).
        with own_bridge(f"127.0.0.1:{proxy.port}", grpc_batch_link=False) as base:

            async def scenario() -> dict[str, Any]:
                async with opened(base, api_key) as ws:
                    await ask(ws, frame("warm-up", event()))  # the channel is up
                    proxy.cut_next_reply()
                    await ws.send(text)
                    await until_counted(base, "unanswered", 1)
                    assert await nothing_arrives(ws)  # never a not-ok for it
                    return await ask(ws, text)  # the client's resend

            assert run(scenario()) == {"id": "lost-reply", "status": "ok"}
    finally:
        proxy.close()
    assert proxy.cuts == 1
    [envelope] = with_ws_id(rdb, keys, "lost-reply")  # the first attempt queued it
    assert envelope.event.user_id == "u-lost"


def test_redis_down_leaves_frames_unanswered_and_the_resend_after_is_queued_once(
    bridge: str, api_key: str, valkey: SessionValkey, rdb: redis.Redis, keys: KeySpace
) -> None:
    process = valkey.killable()
    text = frame("outage", event(user_id="u-outage"))

    async def scenario() -> list[dict[str, Any]]:
        async with opened(bridge, api_key) as ws:
            await ask(ws, frame("warm-up", event()))
            before = await asyncio.to_thread(frames_counted, bridge, "unanswered")
            process.kill()
            try:
                for _ in range(2):
                    await ws.send(text)
                    await until_counted(bridge, "unanswered", before + 1)
                    assert await nothing_arrives(ws)
                    before += 1
            finally:
                process.start()
            answers = [await resent_until_answered(ws, text, "outage")]
            answers.append(await ask(ws, text))  # and once more after the ok
            return answers

    try:
        answers = run(scenario())
    finally:
        if process.proc is None or process.proc.poll() is not None:
            process.start()
    assert answers == [{"id": "outage", "status": "ok"}] * 2
    assert len(with_ws_id(rdb, keys, "outage")) == 1


# --- bounds ----------------------------------------------------------------------------


def test_a_frame_over_the_size_limit_closes_the_socket_with_1009(
    grpc_target: str, api_key: str, rdb: redis.Redis, keys: KeySpace
) -> None:
    def sized(frame_id: str, size: int) -> str:
        text = frame(frame_id, event(url=""))
        return frame(frame_id, event(url="x" * (size - len(text))))

    with own_bridge(grpc_target, ws_max_frame_bytes=1024) as base:

        async def scenario() -> tuple[dict[str, Any], int]:
            async with opened(base, api_key) as ws:
                fits = await ask(ws, sized("fits", 1024))
                with pytest.raises(ConnectionClosed) as caught:
                    await ask(ws, sized("too-big", 1025))
                assert caught.value.rcvd is not None
                return fits, caught.value.rcvd.code

        assert run(scenario()) == ({"id": "fits", "status": "ok"}, 1009)
    assert [e.ws_message_id for _, e in queued(rdb, keys)] == ["fits"]


def test_at_the_in_flight_limit_the_socket_is_not_read(  # noqa: PLR0917
    loop: LoopThread,
    settings: Settings,
    api_key: str,
    valkey: SessionValkey,
    rdb: redis.Redis,
    keys: KeySpace,
) -> None:
    hanging = {"redis_timeout_seconds": 6.0}  # a write waits this long on a silent Redis
    with (
        proxy_to(valkey.url) as proxy,
        serving(loop, settings.model_copy(update={"redis_url": proxy.url, **hanging})) as (
            _,
            target,
        ),
        own_bridge(target, ws_max_in_flight=2, grpc_timeout_seconds=8.0) as base,
    ):

        def in_flight() -> float:
            return value(scrape(f"{base}/metrics"), "events_ws_frames_in_flight")

        async def scenario() -> list[dict[str, Any]]:
            async with opened(base, api_key) as ws:
                await ask(ws, frame("warm-up", event()))  # key cached, Redis connected
                proxy.set_mode("blackhole")  # the writes hang until the server's timeout
                await ws.send(frame("a", event(user_id="u-a")))
                await ws.send(frame("b", event(user_id="u-b")))
                for _ in range(20):  # frames the bridge would answer at once, were they read
                    await ws.send("not json")
                await asyncio.to_thread(eventually, lambda: in_flight() == 2)
                assert await nothing_arrives(ws)
                assert await asyncio.to_thread(in_flight) == 2
                proxy.set_mode("pass")  # the hung writes fail (or go through) now
                answers: list[dict[str, Any]] = []
                while sum(a["status"] == "error" for a in answers) < 20:
                    answers.append(json.loads(await asyncio.wait_for(ws.recv(), 15)))
                for frame_id in ("a", "b"):  # the client resends what is unanswered
                    text = frame(frame_id, event(user_id=f"u-{frame_id}"))
                    answers.append(await resent_until_answered(ws, text, frame_id))
                return answers

        answers = run(scenario())
    assert all(a["status"] in ("error", "ok") for a in answers)  # never a not-ok
    assert answers[-2:] == [{"id": "a", "status": "ok"}, {"id": "b", "status": "ok"}]
    assert sorted(e.event.user_id for _, e in queued(rdb, keys)) == ["u-1", "u-a", "u-b"]


def test_past_the_connection_limit_the_handshake_is_refused_503(
    grpc_target: str, api_key: str
) -> None:
    with own_bridge(grpc_target, ws_max_connections=2) as base:

        async def scenario() -> None:
            async with opened(base, api_key) as one, opened(base, api_key) as two:
                for ws in (one, two):  # in use: a silent one would be closed to admit more
                    assert (await ask(ws, frame("in-use", event())))["status"] == "ok"
                answer = await asyncio.to_thread(refused, base, api_key)
                assert answer.status_code == 503
                assert answer.headers["Retry-After"] == "1"
                assert "ws_max_connections" in json.loads(answer.body or b"")["detail"]
            # Both closed: there is room again (once the bridge has seen them go).
            deadline = time.monotonic() + 10
            while True:
                try:
                    async with opened(base, api_key) as ws:
                        assert (await ask(ws, frame("room", event())))["status"] == "ok"
                        return
                except InvalidStatus:
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.05)

        run(scenario())


def test_an_idle_socket_is_closed_with_1000(grpc_target: str, api_key: str) -> None:
    with own_bridge(grpc_target, ws_idle_timeout_seconds=0.5) as base:

        async def scenario() -> tuple[int, str]:
            async with opened(base, api_key) as ws:
                await ask(ws, frame("one", event()))
                with pytest.raises(ConnectionClosed) as caught:
                    await asyncio.wait_for(ws.recv(), 20)
                assert caught.value.rcvd is not None
                return caught.value.rcvd.code, caught.value.rcvd.reason

        code, reason = run(scenario())
    assert code == 1000
    assert "ws_idle_timeout_seconds" in reason


def test_a_client_that_answers_no_ping_is_disconnected(grpc_target: str, api_key: str) -> None:
    with own_bridge(grpc_target, ws_ping_interval_seconds=0.2, ws_ping_timeout_seconds=0.3) as base:
        host, port = base.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=20) as sock:
            handshake = (
                f"GET {PATH}?api_key={api_key} HTTP/1.1\r\nHost: {host}\r\n"
                "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n"
            )
            sock.sendall(handshake.encode())
            received = b""
            while chunk := sock.recv(4096):  # never answering the pings; until closed
                received += chunk
    assert received.startswith(b"HTTP/1.1 101")
    close = b"\x88"  # a close frame (FIN + opcode 8): code 1011, "keepalive ping timeout"
    assert close + b"\x18\x03\xf3keepalive ping timeout" in received
