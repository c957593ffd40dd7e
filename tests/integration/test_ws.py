"""WebSocket /ws/create-events over real sockets: Depict's frames, answers, faults and bounds."""

from __future__ import annotations

import asyncio
import json
import socket
import time
import uuid
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import redis
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.frames import Close
from websockets.http11 import Response
from websockets.typing import Origin

from events_server.pb import events_pb2 as pb
from events_server.queue.keys import KeySpace
from events_server.server.auth import new_key
from events_server.server.settings import Settings
from rest_bridge.cli import uvicorn_options
from rest_bridge.config import BridgeSettings
from tests.harness.keys import create_key, store_key
from tests.harness.metrics import scrape, value
from tests.harness.processes import BridgeProcess, run_events_server
from tests.harness.proxy import FaultProxy, proxy_to
from tests.harness.servers import LoopThread, UvicornThread, serving
from tests.harness.streams import queued
from tests.harness.valkey import SessionValkey
from tests.harness.waiting import eventually

T = TypeVar("T")

PATH = "/ws/create-events"
JSON_TYPE = {"content-type": "application/json"}


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def ws_url(base: str, **query: str) -> str:
    url = base.replace("http://", "ws://", 1) + PATH
    return url + ("?" + "&".join(f"{k}={v}" for k, v in query.items()) if query else "")


def opened(base: str, key: str | None = None, origin: str | None = None) -> connect:
    """A client connection (an async context manager), with the key in the query."""
    url = ws_url(base, api_key=key) if key else ws_url(base)
    return connect(url, origin=Origin(origin) if origin else None, compression=None)


def event(tenant: str = "shop-x", **fields: Any) -> dict[str, Any]:
    """A Depict-like event: no deduplication_id."""
    return {"tenant": tenant, "market": "se", "type": "page_view", "user_id": "u-1", **fields}


def frame(frame_id: str, ev: Any) -> str:
    return json.dumps({"id": frame_id, "event": ev})


async def ask(ws: ClientConnection, text: str, within: float = 10) -> dict[str, Any]:
    """Send a frame and read the next answer."""
    await ws.send(text)
    answer: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), within))
    return answer


async def resent_until_answered(
    ws: ClientConnection, text: str, frame_id: str, within: float = 30
) -> dict[str, Any]:
    """Send a frame every 2 s, as Depict's client resends, until its answer comes."""
    deadline = time.monotonic() + within
    while True:
        await ws.send(text)
        with suppress(TimeoutError):
            while True:  # answers to other frames are not this one's
                answer: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), 2))
                if answer.get("id") == frame_id:
                    return answer
        assert time.monotonic() < deadline, f"{frame_id} unanswered for {within}s"


async def nothing_arrives(ws: ClientConnection, within: float = 0.5) -> bool:
    try:
        await asyncio.wait_for(ws.recv(), within)
    except TimeoutError:
        return True
    return False


def with_ws_id(client: redis.Redis, keys: KeySpace, frame_id: str) -> list[pb.Envelope]:
    return [e for _, e in queued(client, keys) if e.ws_message_id == frame_id]


def refused(base: str, key: str | None = None, origin: str | None = None) -> Response:
    """The HTTP answer to a refused handshake."""

    async def attempt() -> Response:
        with pytest.raises(InvalidStatus) as caught:
            async with opened(base, key, origin):
                pass
        return caught.value.response

    return run(attempt())


def refusal(base: str, key: str | None = None, origin: str | None = None) -> tuple[int, Any]:
    """The HTTP status and JSON body of a refused handshake."""
    response = refused(base, key, origin)
    assert response.headers["Content-Type"] == "application/json"
    return response.status_code, json.loads(response.body or b"null")


def frames_counted(base: str, outcome: str) -> float:
    return value(scrape(f"{base}/metrics"), "events_ws_frames_total", outcome=outcome)


async def until_counted(base: str, outcome: str, at_least: float, within: float = 15) -> None:
    deadline = time.monotonic() + within
    while await asyncio.to_thread(frames_counted, base, outcome) < at_least:
        assert time.monotonic() < deadline, f"no {outcome} frame counted within {within}s"
        await asyncio.sleep(0.05)


@contextmanager
def own_bridge(target: str, **overrides: Any) -> Iterator[str]:
    """A bridge of its own (its own limits) in front of ``target``; its base URL."""
    settings = {"grpc_target": target, "grpc_timeout_seconds": 3.0, "log_level": "WARNING"}
    bridge = UvicornThread(BridgeSettings.model_validate({**settings, **overrides}))
    bridge.start()
    try:
        yield bridge.url
    finally:
        bridge.stop()


@pytest.fixture
def storefront(settings: Settings, rdb: redis.Redis) -> str:
    """A storefront origin of its own (no cached answer applies to it), for tenant shop-a."""
    page = f"https://ws-{uuid.uuid4().hex[:8]}.example"
    run_events_server(settings, "storefronts", "add", "--tenant", "shop-a", "--origin", page)
    return page


# --- answers ---------------------------------------------------------------------------


def test_a_frame_is_answered_ok_and_queued_with_its_id_and_context(
    bridge: str, api_key: str, rdb: redis.Redis, keys: KeySpace
) -> None:
    async def scenario() -> dict[str, Any]:
        async with opened(bridge, api_key) as ws:
            return await ask(ws, frame("4d1ccywqn6.2", event(url="https://shop.example/p")))

    assert run(scenario()) == {"id": "4d1ccywqn6.2", "status": "ok"}
    [envelope] = with_ws_id(rdb, keys, "4d1ccywqn6.2")
    assert envelope.event.url == "https://shop.example/p"
    assert not envelope.event.HasField("deduplication_id")
    assert envelope.user_agent.startswith("Python/")  # the handshake's headers are forwarded
    assert envelope.api_key_id.startswith("key_")


def test_an_invalid_event_is_not_ok_with_the_422_detail_of_a_post_and_recorded(
    bridge: str, api_key: str, http: httpx.Client, rdb: redis.Redis, keys: KeySpace
) -> None:
    bad = [
        event("shop-d", type="clack"),
        event("shop-d", nope=1),
        event("shop-d", market=""),  # the server's refusal
        event("shop-d", url="\ud800"),  # JSON allows a lone surrogate; UTF-8 does not
        event("shop-d", document_width=float("nan")),  # Python's JSON writes NaN
    ]

    async def scenario() -> list[dict[str, Any]]:
        async with opened(bridge, api_key) as ws:
            return [await ask(ws, frame(f"bad-{n}", ev)) for n, ev in enumerate(bad)]

    answers = run(scenario())
    for n, (answer, ev) in enumerate(zip(answers, bad, strict=True)):
        post = http.post("/create-events", content=json.dumps([ev]), headers=JSON_TYPE)
        assert post.status_code == 422
        assert answer == {"id": f"bad-{n}", "status": "not-ok", "detail": post.json()["detail"]}
    assert queued(rdb, keys) == []
    # Each refusal recorded once, by the bridge or the server, for its tenant; but the
    # last two, whose tenant the record cannot read (not strict JSON), go to the key's
    # own tenants, as a POST's do.
    eventually(lambda: int(rdb.xlen(keys.rejected("shop-d"))) == 2 * 3)


def test_numbers_are_kept_as_the_text_a_post_keeps(
    bridge: str, api_key: str, http: httpx.Client, rdb: redis.Redis, keys: KeySpace
) -> None:
    numbers: dict[str, Any] = {
        "document_width": 1280,
        "entity_price": 99.5,
        "product_id": -9223372036854775809,  # past 64 bits: orjson would make it a float
        "variant_ids": [123456789012345678901234567890, 1e3],
    }
    assert http.post("/create-events", json=[event(user_id="by-post", **numbers)]).is_success

    async def scenario() -> dict[str, Any]:
        async with opened(bridge, api_key) as ws:
            return await ask(ws, frame("numbers", event(user_id="by-frame", **numbers)))

    assert run(scenario()) == {"id": "numbers", "status": "ok"}
    by = {e.event.user_id: e.event for _, e in queued(rdb, keys)}
    for name in numbers:
        assert getattr(by["by-frame"], name) == getattr(by["by-post"], name), name
    assert by["by-frame"].product_id == "-9223372036854775809"


def test_what_is_not_a_frame_gets_an_error_answer_and_the_socket_stays_open(
    bridge: str, api_key: str, rdb: redis.Redis, keys: KeySpace
) -> None:
    async def scenario() -> list[dict[str, Any]]:
        async with opened(bridge, api_key) as ws:
            answers = [
                await ask(ws, text)
                for text in (
                    "not json",
                    "[1, 2]",
                    json.dumps({"event": event()}),
                    json.dumps({"id": 7, "event": event()}),
                    json.dumps({"id": "x" * 129, "event": event()}),
                )
            ]
            answers.append(await ask(ws, json.dumps({"id": "no-event"})))
            answers.append(await ask(ws, frame("after", event())))
            return answers

    *errors, missing, after = run(scenario())
    assert [e["status"] for e in errors] == ["error"] * 5
    assert all(isinstance(e["detail"], str) for e in errors)
    assert "id" not in errors[0]
    assert "id" not in errors[2]
    assert errors[3]["id"] == 7  # repeated, so that the client can match it
    assert errors[4]["id"] == "x" * 129
    assert missing == {
        "id": "no-event",
        "status": "not-ok",
        "detail": [{"loc": ["body", 0], "msg": "Field required", "type": "missing"}],
    }
    assert after == {"id": "after", "status": "ok"}
    assert len(queued(rdb, keys)) == 1


def test_the_same_id_resent_five_times_is_queued_once(
    bridge: str, api_key: str, rdb: redis.Redis, keys: KeySpace
) -> None:
    text = frame("resent-5", event(user_id="u-resent"))

    async def scenario() -> list[dict[str, Any]]:
        async with opened(bridge, api_key) as ws:
            answers = [await ask(ws, text) for _ in range(3)]
        async with opened(bridge, api_key) as ws:  # a reconnect resends it too
            await ws.send(text)
            await ws.send(text)  # at once: while the first may still be in flight
            await ws.send(frame("marker", event(user_id="u-marker")))
            # The second is answered too, unless it arrived while the first was in flight.
            while (answer := json.loads(await asyncio.wait_for(ws.recv(), 10)))["id"] != "marker":
                answers.append(answer)
        return answers

    answers = run(scenario())
    assert answers in ([{"id": "resent-5", "status": "ok"}] * n for n in (4, 5))
    assert len(with_ws_id(rdb, keys, "resent-5")) == 1
    assert sorted(e.event.user_id for _, e in queued(rdb, keys)) == ["u-marker", "u-resent"]


def test_a_frame_for_another_stores_tenant_is_not_ok_and_recorded_for_its_own(
    bridge: str, settings: Settings, rdb: redis.Redis, keys: KeySpace
) -> None:
    key = create_key(settings.redis_url, settings.key_prefix, ["shop-a"])

    async def scenario() -> dict[str, Any]:
        async with opened(bridge, key) as ws:
            return await ask(ws, frame("foreign", event("shop-b")))

    answer = run(scenario())
    assert answer["status"] == "not-ok"
    [detail] = answer["detail"]
    assert detail["loc"] == ["body", 0, "tenant"]
    assert detail["type"] == "permission_denied"
    assert "'shop-b'" in detail["msg"]
    assert queued(rdb, keys) == []
    eventually(lambda: int(rdb.xlen(keys.rejected("shop-a"))) == 1)
    assert rdb.xlen(keys.rejected("shop-b")) == 0


# --- the handshake ---------------------------------------------------------------------


def test_no_origin_and_no_key_is_refused_401(bridge: str) -> None:
    status, body = refusal(bridge)
    assert status == 401
    assert "no Origin and no API key" in body["detail"]
    assert refused(bridge).headers["WWW-Authenticate"] == "APIKey"


def test_an_unregistered_origin_is_refused_403(bridge: str, rdb: redis.Redis) -> None:
    status, body = refusal(bridge, origin=f"https://nobody-{uuid.uuid4().hex[:6]}.example")
    assert status == 403
    assert "may not open /ws/create-events" in body["detail"]
    assert refusal(bridge, origin="null")[0] == 403


def test_a_bad_key_or_an_origin_the_key_does_not_list_is_refused(
    bridge: str, settings: Settings, rdb: redis.Redis
) -> None:
    assert refusal(bridge, key="evk_nope") == (401, {"detail": "unknown or revoked API key"})
    key = create_key(
        settings.redis_url, settings.key_prefix, ["shop-a"], origins=["https://a.example"]
    )
    status, body = refusal(bridge, key=key, origin="https://b.example")
    assert status == 403
    assert "'https://b.example' may not use key" in body["detail"]

    async def listed() -> dict[str, Any]:
        async with opened(bridge, key, origin="https://a.example") as ws:
            return await ask(ws, frame("listed", event("shop-a")))

    assert run(listed())["status"] == "ok"


def test_a_registered_storefront_writes_its_tenant_without_a_key(
    bridge: str, storefront: str, rdb: redis.Redis, keys: KeySpace
) -> None:
    async def scenario() -> list[dict[str, Any]]:
        async with opened(bridge, origin=storefront) as ws:
            return [
                await ask(ws, frame("kl-1", event("shop-a"))),
                await ask(ws, frame("kl-2", event("shop-b"))),
            ]

    mine, foreign = run(scenario())
    assert mine == {"id": "kl-1", "status": "ok"}
    [envelope] = with_ws_id(rdb, keys, "kl-1")
    assert envelope.storefront_origin == storefront
    assert envelope.api_key_id == ""
    assert foreign["status"] == "not-ok"
    assert foreign["detail"][0]["loc"] == ["body", 0, "tenant"]
    assert "'shop-b'" in foreign["detail"][0]["msg"]
    assert with_ws_id(rdb, keys, "kl-2") == []


def test_a_key_revoked_while_open_closes_the_socket_with_4100(
    bridge: str, settings: Settings, rdb: redis.Redis
) -> None:
    record, secret = new_key(["shop-a"], label="ws-revoked")
    store_key(redis.Redis.from_url(settings.redis_url), settings.key_prefix, record)

    async def scenario() -> Close | None:
        async with opened(bridge, secret) as ws:
            assert (await ask(ws, frame("before", event("shop-a"))))["status"] == "ok"
            run_events_server(settings, "keys", "revoke", record.id)
            deadline = time.monotonic() + settings.key_cache_seconds + 10
            while time.monotonic() < deadline:  # the server's key cache lags
                try:
                    await ask(ws, frame(f"after-{time.monotonic()}", event("shop-a")))
                except ConnectionClosed as closed:
                    return closed.rcvd
                await asyncio.sleep(0.2)
            pytest.fail("the socket stayed open")

    close = run(scenario())
    assert close is not None
    assert (close.code, close.reason) == (4100, "unknown or revoked API key")


# --- faults: nothing is acknowledged that is not in Redis, and resends are queued once ---


def test_a_reply_lost_on_the_way_back_is_unanswered_and_the_resend_is_queued_once(
    grpc_target: str, api_key: str, rdb: redis.Redis, keys: KeySpace
) -> None:
    proxy = FaultProxy("127.0.0.1", int(grpc_target.rsplit(":", 1)[1]), protocol="http2")
    text = frame("lost-reply", event(user_id="u-lost"))
    try:
        with own_bridge(f"127.0.0.1:{proxy.port}") as base:

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
            async with opened(base, api_key), opened(base, api_key):
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


def test_uvicorn_gets_the_websocket_settings() -> None:
    options = uvicorn_options(
        BridgeSettings(
            ws_max_frame_bytes=4096, ws_ping_interval_seconds=7, ws_ping_timeout_seconds=9
        )
    )
    assert options["ws"] == "websockets-sansio"
    assert (options["ws_max_size"], options["ws_ping_interval"], options["ws_ping_timeout"]) == (
        4096,
        7,
        9,
    )
    assert options["ws_per_message_deflate"] is False


# --- logs and metrics --------------------------------------------------------------------


def test_each_connection_logs_open_and_close_lines_with_counts_and_never_the_key(
    grpc_target: str, settings: Settings, tmp_path: Path, rdb: redis.Redis
) -> None:
    key = create_key(settings.redis_url, settings.key_prefix, ["shop-a"], label="ws-logs")
    log_path = tmp_path / "bridge.log"
    bridge = BridgeProcess(grpc_target, log_path, "--log-level", "DEBUG")
    bridge.start()
    try:

        async def scenario() -> None:
            async with opened(bridge.url, key) as ws:
                await ask(ws, frame("l-1", event("shop-a")))
                await ask(ws, frame("l-1", event("shop-a")))
                await ask(ws, frame("l-2", event("shop-a", type="clack")))
                await ask(ws, "nope")

        run(scenario())

        def lines() -> list[dict[str, Any]]:
            text = log_path.read_text()
            return [json.loads(x) for x in text.splitlines() if x.startswith("{")]

        eventually(lambda: any(x["msg"].startswith("WS /ws/create-events closed") for x in lines()))
        metrics = scrape(f"{bridge.url}/metrics")
    finally:
        bridge.stop()
    assert key not in log_path.read_text()
    ws_lines = [
        x for x in lines() if x["logger"] == "rest_bridge.access" and x.get("method") == "WS"
    ]
    opening, closing = ws_lines
    assert opening["status"] == 101
    assert opening["query"] == "api_key=[REDACTED]"
    assert closing["close_code"] == 1000
    assert (closing["frames"], closing["accepted"], closing["duplicate"]) == (4, 1, 1)
    assert (closing["not_ok"], closing["error"]) == (1, 1)
    uvicorn_lines = [x["msg"] for x in lines() if x["logger"].startswith("uvicorn")]
    assert not any('"WebSocket ' in x for x in uvicorn_lines)  # its access lines show the query
    assert "< GET /ws/create-events?api_key=[REDACTED] HTTP/1.1" in uvicorn_lines
    assert value(metrics, "events_ws_handshakes_total", status="101") == 1
    assert value(metrics, "events_ws_frames_total", outcome="duplicate") == 1
    assert value(metrics, "events_ws_closes_total", code="1000") == 1
    assert value(metrics, "events_ws_connections_open") == 0
