"""A WebSocket client of /ws/create-events for the tests, as Depict's client behaves."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager, suppress
from typing import Any, TypeVar

import pytest
import redis
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus
from websockets.http11 import Response
from websockets.typing import Origin

from events_server.pb import events_pb2 as pb
from events_server.queue.keys import KeySpace
from rest_bridge.config import BridgeSettings
from tests.harness.metrics import scrape, value
from tests.harness.servers import UvicornThread
from tests.harness.streams import queued

T = TypeVar("T")

PATH = "/ws/create-events"
JSON_TYPE = {"content-type": "application/json"}


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a client coroutine on a fresh event loop of the test's own."""
    return asyncio.run(coro)


def ws_url(base: str, **query: str) -> str:
    """The endpoint's ws:// URL on a bridge's http:// base URL."""
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
    """A frame's text, as Depict's client writes it."""
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
    """Whether no answer comes within ``within`` seconds."""
    try:
        await asyncio.wait_for(ws.recv(), within)
    except TimeoutError:
        return True
    return False


def with_ws_id(client: redis.Redis, keys: KeySpace, frame_id: str) -> list[pb.Envelope]:
    """The queued envelopes that name the frame id."""
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
    """A bridge's count of frames with this outcome so far."""
    return value(scrape(f"{base}/metrics"), "events_ws_frames_total", outcome=outcome)


async def until_counted(base: str, outcome: str, at_least: float, within: float = 15) -> None:
    """Wait until a bridge has counted ``at_least`` frames with this outcome."""
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
