"""WebSocket /ws/create-events over real sockets: Depict's frames, answers, handshakes, logs.

Faults and bounds: test_ws_limits.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from websockets.exceptions import ConnectionClosed
from websockets.frames import Close

from events_server.queue.keys import KeySpace
from events_server.server.auth import new_key
from events_server.server.settings import Settings
from rest_bridge.cli import uvicorn_options
from rest_bridge.config import BridgeSettings
from tests.harness.keys import create_key, store_key
from tests.harness.metrics import scrape, value
from tests.harness.processes import BridgeProcess, run_events_server
from tests.harness.streams import queued
from tests.harness.waiting import eventually
from tests.harness.ws import (
    JSON_TYPE,
    ask,
    event,
    frame,
    opened,
    refusal,
    refused,
    run,
    with_ws_id,
)


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


def test_uvicorn_gets_the_websocket_settings() -> None:
    options = uvicorn_options(
        BridgeSettings(
            ws_max_frame_bytes=4096, ws_ping_interval_seconds=7, ws_ping_timeout_seconds=9
        )
    )
    assert options["ws"] == "rest_bridge.ws_protocol:GuardedWebSocketProtocol"
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
