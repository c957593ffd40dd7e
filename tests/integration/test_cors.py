"""CORS over real HTTP: the server's key origins decide, the bridge answers preflights and POSTs."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import httpx
import pytest
import redis
import redis.asyncio as aioredis

from events_server.ops.logs import request_id
from events_server.pb import events_pb2_grpc
from events_server.queue.keys import KeySpace
from events_server.server.auth import KeyStore, digest_of
from events_server.server.settings import Settings
from rest_bridge import cors as cors_module
from rest_bridge.config import BridgeSettings
from rest_bridge.cors import Cors
from tests.harness.keys import create_key
from tests.harness.servers import LoopThread, bridged, lonely_bridge, serving
from tests.harness.streams import queued
from tests.harness.waiting import eventually
from tests.harness.web import cors_headers

URL = "/create-events"
ALLOWED = "https://allowed.example"
GLOBAL = "https://global.example"
EVENT = {"tenant": "shop-o", "market": "us", "type": "click", "user_id": "u-1"}
ALLOW_HEADERS = "Content-Type, Content-Encoding, X-API-KEY, X-Request-Id"
CHECK = "/events.v1.Origins/Check"


@dataclass(frozen=True)
class Keys:
    """Keys of the tenant shop-o."""

    listed: str  # lists ALLOWED
    plain: str  # lists no origin: the server's global list applies


@pytest.fixture(scope="module")
def cors_keys(valkey: Any, settings: Settings) -> Keys:
    """The module's keys (they outlive each test's clean-up, as the session's key does)."""
    return Keys(
        listed=create_key(valkey.url, settings.key_prefix, ["shop-o"], origins=[ALLOWED]),
        plain=create_key(valkey.url, settings.key_prefix, ["shop-o"]),
    )


@pytest.fixture(scope="module")
def cors_server(loop: LoopThread, settings: Settings, cors_keys: Keys) -> Iterator[str]:
    """A server on the session's Redis whose answers are never cached, with a global origin."""
    own = settings.model_copy(update={"key_cache_seconds": 0.0, "cors_origins": (GLOBAL,)})
    with serving(loop, own) as (_, target):
        yield target


@pytest.fixture(scope="module")
def cors_bridge(cors_server: str) -> Iterator[str]:
    """A bridge that asks the server every time (no CORS cache): answers follow the keys."""
    with bridged(cors_server, cors_cache_seconds=0) as url:
        yield url


@pytest.fixture(scope="module")
def wildcard_bridge(loop: LoopThread, settings: Settings, cors_keys: Keys) -> Iterator[str]:
    """A bridge in front of a server with EVENTS_CORS_ORIGINS=*."""
    own = settings.model_copy(update={"key_cache_seconds": 0.0, "cors_origins": ("*",)})
    with serving(loop, own) as (_, target), bridged(target, cors_cache_seconds=0) as url:
        yield url


@pytest.fixture
def web(cors_bridge: str) -> Iterator[httpx.Client]:
    """A client of the CORS bridge (no key: each test sends its own)."""
    with httpx.Client(base_url=cors_bridge, timeout=10) as client:
        yield client


def preflight(client: httpx.Client, origin: str, **params: str) -> httpx.Response:
    """What a browser sends before a cross-origin JSON POST."""
    return client.options(
        URL,
        params=params,
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type,x-api-key",
        },
    )


# --- preflights ---------------------------------------------------------------------------


@pytest.mark.usefixtures("cors_keys")
def test_a_preflight_from_an_origin_a_key_lists_is_echoed_with_credentials(
    web: httpx.Client,
) -> None:
    answer = preflight(web, ALLOWED)
    assert answer.status_code == 204
    assert answer.content == b""
    assert cors_headers(answer) == {
        "access-control-allow-origin": ALLOWED,
        "access-control-allow-credentials": "true",
        "access-control-allow-methods": "POST",
        "access-control-allow-headers": ALLOW_HEADERS,
        "access-control-max-age": "600",
        "vary": "Origin",
    }


@pytest.mark.parametrize(
    "origin",
    [
        "null",
        "https://allowed.example.evil",  # a suffix of the allowed name is another site
        "http://allowed.example",  # so is another scheme
        "https://allowed.example:8443",  # and another port
        "https://evil.example",
    ],
)
@pytest.mark.usefixtures("cors_keys")
def test_a_preflight_from_any_other_origin_is_403_without_cors_headers(
    web: httpx.Client, origin: str
) -> None:
    answer = preflight(web, origin)
    assert answer.status_code == 403
    assert cors_headers(answer) == {}
    detail = answer.json()["detail"]
    assert origin in detail
    assert "never allowed" in detail if origin == "null" else "is not allowed" in detail


def test_a_preflight_with_a_key_in_the_query_is_decided_for_that_key(
    web: httpx.Client, cors_keys: Keys
) -> None:
    # The plain key lists no origin: the global list applies to it, not other keys' origins.
    assert preflight(web, ALLOWED, api_key=cors_keys.plain).status_code == 403
    assert preflight(web, GLOBAL, api_key=cors_keys.plain).status_code == 204
    assert preflight(web, ALLOWED, api_key=cors_keys.listed).status_code == 204
    refused = preflight(web, GLOBAL, api_key=cors_keys.listed)
    assert refused.status_code == 403
    assert "not among the API key's origins" in refused.json()["detail"]


@pytest.mark.usefixtures("cors_keys")
def test_a_preflight_without_a_key_is_allowed_for_the_global_list_too(web: httpx.Client) -> None:
    answer = preflight(web, GLOBAL)
    assert answer.status_code == 204
    assert answer.headers["access-control-allow-origin"] == GLOBAL
    assert answer.headers["access-control-allow-credentials"] == "true"


def test_options_without_the_preflight_headers_is_not_a_preflight(web: httpx.Client) -> None:
    answer = web.options(URL, headers={"Origin": ALLOWED})
    assert answer.status_code == 405  # FastAPI's answer: only POST is served
    assert "access-control-allow-origin" not in answer.headers


# --- actual requests ---------------------------------------------------------------------


def test_a_post_from_an_allowed_origin_is_queued_and_readable_by_the_page(
    web: httpx.Client, cors_keys: Keys, rdb: redis.Redis, keys: KeySpace
) -> None:
    answer = web.post(URL, json=[EVENT], headers={"Origin": ALLOWED, "X-API-KEY": cors_keys.listed})
    assert answer.status_code == 200, answer.text
    assert cors_headers(answer) == {
        "access-control-allow-origin": ALLOWED,
        "access-control-allow-credentials": "true",
        "access-control-expose-headers": "Retry-After, X-Request-Id",
        "vary": "Origin",
    }
    [(_, envelope)] = queued(rdb, keys)
    assert envelope.event.user_id == "u-1"


def test_a_page_whose_answers_are_known_gets_the_same_headers_each_time(
    cors_server: str, cors_keys: Keys, rdb: redis.Redis, keys: KeySpace
) -> None:
    # The first POST asks the server (CORS and admission); the next ones are answered from
    # what the bridge keeps, without waiting (rest_bridge.hot): the same headers each time.
    page = {"Origin": ALLOWED, "X-API-KEY": cors_keys.listed}
    with bridged(cors_server, cors_cache_seconds=3600) as url, httpx.Client(base_url=url) as client:
        answers = [
            client.post(URL, json=[{**EVENT, "user_id": f"u-{n}"}], headers=page) for n in range(4)
        ]
        refused = [
            client.post(URL, json=[EVENT], headers={**page, "Origin": "https://other.example"})
            for _ in range(2)
        ]
    assert [a.status_code for a in answers] == [200] * 4
    assert all(cors_headers(a) == cors_headers(answers[0]) for a in answers)
    assert cors_headers(answers[0])["access-control-allow-origin"] == ALLOWED
    assert [a.json()["accepted"] for a in answers] == [1] * 4
    assert [r.status_code for r in refused] == [403] * 2
    assert all(cors_headers(r) == {} for r in refused)
    assert len(queued(rdb, keys)) == 4


@pytest.mark.parametrize(
    "origin", ["https://allowed.example.evil", "http://allowed.example", "null"]
)
def test_a_post_from_a_refused_origin_gets_no_cors_headers_and_the_server_refuses_it(
    web: httpx.Client, cors_keys: Keys, rdb: redis.Redis, keys: KeySpace, origin: str
) -> None:
    # A beacon or a form needs no preflight: the server checks the Origin it is forwarded.
    answer = web.post(URL, json=[EVENT], headers={"Origin": origin, "X-API-KEY": cors_keys.listed})
    assert answer.status_code == 403
    assert cors_headers(answer) == {}
    assert "may not use key" in answer.json()["detail"]
    assert queued(rdb, keys) == []


@pytest.mark.parametrize(
    ("body", "headers", "status"),
    [
        (b"[{", {"Content-Type": "application/json"}, 422),
        (b"[]", {"Content-Type": "application/xml"}, 415),
        (b"[]", {"Content-Type": "application/json", "Content-Encoding": "br"}, 415),
        (b" " * (1024 * 1024 + 1), {"Content-Type": "application/json"}, 413),
    ],
    ids=["422", "415-type", "415-encoding", "413"],
)
def test_the_bridges_own_errors_carry_cors_headers_for_an_allowed_page(
    web: httpx.Client, cors_keys: Keys, body: bytes, headers: dict[str, str], status: int
) -> None:
    page = {"Origin": ALLOWED, "X-API-KEY": cors_keys.listed}
    answer = web.post(URL, content=body, headers={**headers, **page})
    assert answer.status_code == status
    assert answer.headers["access-control-allow-origin"] == ALLOWED
    assert answer.headers["access-control-expose-headers"] == "Retry-After, X-Request-Id"


def test_a_key_without_origins_falls_back_to_the_global_list(
    web: httpx.Client, cors_keys: Keys, rdb: redis.Redis, keys: KeySpace
) -> None:
    allowed = web.post(URL, json=[EVENT], headers={"Origin": GLOBAL, "X-API-KEY": cors_keys.plain})
    assert allowed.status_code == 200, allowed.text
    assert allowed.headers["access-control-allow-origin"] == GLOBAL
    assert allowed.headers["access-control-allow-credentials"] == "true"
    # Another key's origin is no origin of this key's.
    refused = web.post(URL, json=[EVENT], headers={"Origin": ALLOWED, "X-API-KEY": cors_keys.plain})
    assert refused.status_code == 403
    assert cors_headers(refused) == {}
    assert len(queued(rdb, keys)) == 1


def test_a_wildcard_allows_any_page_but_never_with_credentials(
    wildcard_bridge: str, cors_keys: Keys, rdb: redis.Redis, keys: KeySpace
) -> None:
    with httpx.Client(base_url=wildcard_bridge, timeout=10) as client:
        page = {"Origin": "https://any.example", "X-API-KEY": cors_keys.plain}
        answer = client.post(URL, json=[EVENT], headers=page)
        assert answer.status_code == 200, answer.text
        assert cors_headers(answer) == {
            "access-control-allow-origin": "*",
            "access-control-expose-headers": "Retry-After, X-Request-Id",
            "vary": "Origin",
        }
        ask = preflight(client, "https://any.example")
        assert ask.status_code == 204
        assert ask.headers["access-control-allow-origin"] == "*"
        assert "access-control-allow-credentials" not in ask.headers
        # "*" is no "null", and a key's own list still rules.
        assert preflight(client, "null").status_code == 403
        null = client.post(URL, json=[EVENT], headers={**page, "Origin": "null"})
        assert (null.status_code, cors_headers(null)) == (403, {})
        listed = {"Origin": "https://any.example", "X-API-KEY": cors_keys.listed}
        assert client.post(URL, json=[EVENT], headers=listed).status_code == 403
    assert len(queued(rdb, keys)) == 1


# --- when the server is asked ------------------------------------------------------------


class CallLog(logging.Handler):
    """The (method, request id) of every gRPC call the in-process servers log."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, str | None]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.calls.append((getattr(record, "method", ""), request_id.get()))


@pytest.fixture
def grpc_calls() -> Iterator[CallLog]:
    """Every gRPC call the servers in this process answer from now on."""
    handler = CallLog()
    logger = logging.getLogger("events_server.access")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


@pytest.mark.usefixtures("rdb")
def test_a_request_without_origin_makes_no_check_and_gets_no_cors_headers(
    web: httpx.Client, cors_keys: Keys, grpc_calls: CallLog
) -> None:
    answer = web.post(
        URL, json=[EVENT], headers={"X-API-KEY": cors_keys.listed, "X-Request-ID": "no-origin"}
    )
    assert answer.status_code == 200
    assert cors_headers(answer) == {}
    with_origin = {"X-API-KEY": cors_keys.listed, "Origin": ALLOWED, "X-Request-ID": "origin"}
    assert web.post(URL, json=[EVENT], headers=with_origin).status_code == 200
    # A Check would come before the write; the writes' lines are there, so is every Check.
    eventually(lambda: ("/events.v1.EventsService/CreateEvents", "origin") in grpc_calls.calls)
    assert (CHECK, "no-origin") not in grpc_calls.calls
    assert (CHECK, "origin") in grpc_calls.calls


def test_answers_are_cached_per_origin_and_key_for_cors_cache_seconds(
    cors_server: str, cors_bridge: str, valkey: Any, settings: Settings, grpc_calls: CallLog
) -> None:
    origin = "https://cached.example"
    secret = create_key(valkey.url, settings.key_prefix, ["shop-o"], origins=[origin])
    with (
        bridged(cors_server, cors_cache_seconds=3600) as caching,
        httpx.Client(base_url=caching, timeout=10) as cached,
        httpx.Client(base_url=cors_bridge, timeout=10) as uncached,
    ):
        for rid in ("first", "second"):
            answer = cached.options(
                URL,
                params={"api_key": secret},
                headers={
                    "Origin": origin,
                    "Access-Control-Request-Method": "POST",
                    "X-Request-ID": rid,
                },
            )
            assert answer.status_code == 204
        assert [rid for method, rid in grpc_calls.calls if method == CHECK] == ["first"]
        revoke(valkey.url, settings.key_prefix, secret)
        # The server now refuses (it caches nothing here); the caching bridge keeps its answer.
        assert preflight(uncached, origin, api_key=secret).status_code == 403
        assert preflight(cached, origin, api_key=secret).status_code == 204
        # Another key (here none) is another entry: asked afresh.
        assert preflight(cached, origin).status_code == 403


def revoke(redis_url: str, prefix: str, secret: str) -> None:
    """Revoke the key with this secret, as ``events-server keys revoke`` does."""

    async def run() -> None:
        client = aioredis.Redis.from_url(redis_url)
        try:
            store = KeyStore(client, KeySpace(prefix, 1))
            key = await store.find(digest_of(secret))
            assert key is not None
            await store.revoke(key.id)
        finally:
            await client.aclose()

    asyncio.run(run())


def test_the_cache_is_bounded(
    loop: LoopThread, cors_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cors_module, "CACHE_LIMIT", 5)

    async def ask(count: int) -> int:
        async with grpc.aio.insecure_channel(cors_server) as channel:
            stub = events_pb2_grpc.OriginsStub(channel)
            cors = Cors(lambda: stub, BridgeSettings(cors_cache_seconds=3600))
            for n in range(count):
                await cors.decide(f"https://shop-{n}.example", None)
            return len(cors._cache)

    assert loop.run(ask(12)) <= 5


def test_a_server_that_cannot_be_asked_is_a_503_with_retry_after() -> None:
    with lonely_bridge() as url, httpx.Client(base_url=url, timeout=10) as client:
        for answer in (
            preflight(client, ALLOWED),
            client.post(URL, json=[EVENT], headers={"Origin": ALLOWED, "X-API-KEY": "k"}),
        ):
            assert answer.status_code == 503
            assert answer.headers["retry-after"] == "1"
            assert answer.json()["detail"]
            assert cors_headers(answer) == {}
