"""Logs of the real processes: request ids across bridge and server, one access line, no keys."""

from __future__ import annotations

import io
import json
import logging
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from events_server.ops.logs import (
    JsonFormatter,
)
from events_server.pb import events_pb2_grpc
from events_server.server.settings import Settings
from events_server.wire.metadata import BATCH_LINK_METHOD, GATHERED_METHOD
from tests.harness.data import ev
from tests.harness.keys import create_key
from tests.harness.processes import BridgeProcess, ServerProcess, events_env, http_ok
from tests.harness.rpc import send
from tests.harness.servers import LoopThread, bridged, own_settings, serving
from tests.harness.valkey import valkey_process
from tests.harness.waiting import eventually
from tests.harness.web import keyed_client

ACCESS_LOGGERS = ("events_server.access", "rest_bridge.access")


EVENT = {"tenant": "my_store", "market": "us", "type": "click"}


# --- in-process: bridge and server of the session --------------------------------------


@pytest.fixture
def access_lines() -> Iterator[Callable[[], list[dict[str, Any]]]]:
    """The access lines both processes write from now on, as parsed JSON."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    loggers = [logging.getLogger(name) for name in ACCESS_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    yield lambda: [json.loads(line) for line in out.getvalue().splitlines()]
    for logger, level in zip(loggers, levels, strict=True):
        logger.removeHandler(handler)
        logger.setLevel(level)


def _lines_of(
    lines: Callable[[], list[dict[str, Any]]], rid: str, count: int = 2
) -> list[dict[str, Any]]:
    # The bridge logs after the response has gone out, so its line may trail it a little.
    eventually(lambda: len([x for x in lines() if x.get("request_id") == rid]) >= count)
    return [x for x in lines() if x.get("request_id") == rid]


@pytest.mark.usefixtures("rdb")
def test_the_callers_request_id_flows_from_bridge_to_server(
    http: httpx.Client, access_lines: Callable[[], list[dict[str, Any]]]
) -> None:
    answer = http.post("/create-events", json=[EVENT], headers={"X-Request-ID": "req-4711"})
    assert answer.status_code == 200
    assert answer.headers["x-request-id"] == "req-4711"
    bridge_line, server_line = sorted(
        _lines_of(access_lines, "req-4711"), key=lambda x: x["logger"], reverse=True
    )
    assert bridge_line["logger"] == "rest_bridge.access"
    assert (bridge_line["method"], bridge_line["path"], bridge_line["status"]) == (
        "POST",
        "/create-events",
        200,
    )
    assert bridge_line["duration_ms"] > 0
    assert server_line["logger"] == "events_server.access"
    assert server_line["method"] == "/events.v1.EventsService/CreateEvents"
    assert (server_line["code"], server_line["events"], server_line["accepted"]) == ("OK", 1, 1)
    # The default keeps the network, not the host.
    assert bridge_line["client_ip"] == server_line["client_ip"] == "127.0.0.0"


@pytest.mark.usefixtures("rdb")
@pytest.mark.parametrize("path", ["/v2/create-events", "/v2/track"])
def test_a_v2_request_has_its_access_line_in_each_process(
    http: httpx.Client, access_lines: Callable[[], list[dict[str, Any]]], path: str
) -> None:
    body = {"tenant": "my_store", "market": "us", "events": [{"transaction_id": "T-1"}]}
    answer = http.post(f"{path}?api_key=secret", json=body, headers={"X-Request-ID": "req-v2"})
    assert answer.status_code == 200, answer.text
    bridge_line, server_line = sorted(
        _lines_of(access_lines, "req-v2"), key=lambda x: x["logger"], reverse=True
    )
    assert (bridge_line["method"], bridge_line["path"], bridge_line["status"]) == (
        "POST",
        path,
        200,
    )
    assert bridge_line["query"] == "api_key=[REDACTED]"
    assert server_line["method"] == "/events.v1.EventsService/Track"
    assert (server_line["code"], server_line["events"], server_line["accepted"]) == ("OK", 1, 1)


@pytest.mark.usefixtures("rdb")
def test_a_request_id_is_made_when_none_or_a_bad_one_was_sent(
    http: httpx.Client, access_lines: Callable[[], list[dict[str, Any]]]
) -> None:
    for sent in ({}, {"X-Request-ID": "not a token"}):
        answer = http.post("/create-events", json=[{**EVENT, "tenant": ""}], headers=sent)
        assert answer.status_code == 422
        made = answer.headers["x-request-id"]
        assert made != sent.get("X-Request-ID")
        lines = _lines_of(access_lines, made)
        assert len(lines) == 2  # one access line per request, in each process
        assert {line["logger"] for line in lines} == set(ACCESS_LOGGERS)
        assert {line.get("code") for line in lines} == {"INVALID_ARGUMENT", None}


def test_direct_grpc_callers_get_their_request_id_logged(
    stub: events_pb2_grpc.EventsServiceStub, access_lines: Callable[[], list[dict[str, Any]]]
) -> None:
    send(stub, ev(), metadata=(("x-request-id", "svc-call-9"),))
    [line] = _lines_of(access_lines, "svc-call-9", 1)
    assert line["code"] == "OK"


# --- the sample: successful lines only; refusals and errors always ---------------------


SUCCESSES = 8


@pytest.mark.parametrize("sample", [0.0, 0.25, 1.0])
def test_refusals_and_errors_are_logged_at_any_sample(
    loop: LoopThread,
    tmp_path: Path,
    access_lines: Callable[[], list[dict[str, Any]]],
    sample: float,
) -> None:
    """A bridge and a server of their own at one sample, on a Valkey that goes away."""
    with valkey_process(tmp_path / "valkey") as valkey:
        settings = own_settings(
            valkey.url, "sample", access_log_sample=sample, redis_timeout_seconds=0.5
        )
        secret = create_key(valkey.url, settings.key_prefix, ["my_store"])
        with (
            serving(loop, settings) as (_, target),
            bridged(target, access_log_sample=sample) as url,
            keyed_client(url, secret) as client,
        ):
            for n in range(SUCCESSES):
                sent = client.post("/create-events", json=[EVENT], headers=rid(f"ok-{n}"))
                assert sent.status_code == 200, sent.text
            refused = client.post(
                "/create-events", json=[{**EVENT, "tenant": ""}], headers=rid("no")
            )
            assert refused.status_code == 422
            valkey.stop()
            failed = client.post("/create-events", json=[EVENT], headers=rid("failed"))
            assert failed.status_code == 503, failed.text
    # Both lines of each, whatever the sample.
    assert outcomes(_lines_of(access_lines, "no")) == {422, "INVALID_ARGUMENT"}
    assert outcomes(_lines_of(access_lines, "failed")) == {503, "UNAVAILABLE"}
    lines = access_lines()
    bridge_ok = [x["request_id"] for x in lines if x.get("status") == 200]
    server_ok = [x["request_id"] for x in lines if x.get("code") == "OK" and "events" in x]
    every = [f"ok-{n}" for n in range(SUCCESSES)]
    if sample == 1.0:
        assert bridge_ok == server_ok == every
    elif sample == 0.0:
        assert bridge_ok == server_ok == []
        assert not [x for x in lines if x.get("code") == "OK"]  # nor the gathered calls'
    else:
        # The bridge's sample is its requests' alone: the 1st, 5th... The server's counts
        # every successful line of its own: the batch link's ticket (its first), then each
        # request's and its batch's, in turn: the 1st, 5th, 9th, 13th, 17th of those 17.
        assert bridge_ok == ["ok-0", "ok-4"]
        server_lines = [x["method"] for x in lines if x.get("code") == "OK"]
        assert server_lines == [BATCH_LINK_METHOD] + [GATHERED_METHOD] * 4
        assert server_ok == []


def rid(value: str) -> dict[str, str]:
    return {"X-Request-ID": value}


def outcomes(lines: list[dict[str, Any]]) -> set[object]:
    """The statuses (bridge) and codes (server) of a request's lines."""
    return {x.get("status", x.get("code")) for x in lines}


# --- no key material, ever: the real processes' whole output ----------------------------


KEY_WAYS = ("query", "encoded-query", "header", "cookie", "metadata")


UNKNOWN_KEY = "evk_unknown-s3cret-9999"


LAST_REQUEST = "last-request"


def test_no_key_material_is_logged(settings: Settings, tmp_path: Path) -> None:
    """Both real processes at DEBUG, keys sent every way they can come: none is in the output."""
    secrets = {
        way: create_key(settings.redis_url, settings.key_prefix, ["my_store"], label=way)
        for way in KEY_WAYS
    }
    env = events_env(
        settings,
        EVENTS_METRICS_ADDR="127.0.0.1:0",
        EVENTS_LOG_LEVEL="DEBUG",
        EVENTS_ACCESS_LOG_SAMPLE="1",  # every line, so that all of them are searched
    )
    server = ServerProcess(env, tmp_path / "server.log")
    bridge = BridgeProcess(server.start(), tmp_path / "bridge.log", env=env)
    try:
        bridge.spawn()
        eventually(lambda: http_ok(f"{bridge.url}/readyz"), within=20)
        _send_keys_every_way(secrets, bridge.url, server.target)
        # The bridge writes an access line after answering: wait for the last one.
        eventually(lambda: LAST_REQUEST in bridge.log())
    finally:
        bridge.stop()
        server.signal(signal.SIGTERM)
        server.wait(15)
    try:
        output = server.log() + server.printed() + bridge.log()
    finally:
        server.kill()
    for where, secret in [*secrets.items(), ("unknown key", UNKNOWN_KEY)]:
        assert secret not in output, f"the key sent in the {where} was logged"
    # The logs are there (and JSON): the absence above means something.
    lines = [json.loads(x) for x in output.splitlines() if x.startswith("{")]
    access = [x for x in lines if x["logger"] in ACCESS_LOGGERS]
    assert len([x for x in access if x["logger"] == "rest_bridge.access"]) >= 6
    assert len([x for x in access if x["logger"] == "events_server.access"]) >= 5
    assert any(x.get("query") == "api_key=[REDACTED]" for x in access)
    assert any(x.get("query") == "api%5Fkey=[REDACTED]&x=1" for x in access)


def _send_keys_every_way(secrets: dict[str, str], base: str, grpc_target: str) -> None:
    with httpx.Client(base_url=base, timeout=10) as client:
        url = "/create-events"
        assert client.post(url, params={"api_key": secrets["query"]}, json=[EVENT]).is_success
        encoded = f"{url}?api%5Fkey={secrets['encoded-query']}&x=1"
        assert client.post(encoded, json=[EVENT]).is_success
        assert client.post(url, headers={"X-API-KEY": secrets["header"]}, json=[EVENT]).is_success
        client.cookies.set("X-API-KEY", secrets["cookie"])
        assert client.post(url, json=[EVENT]).is_success
        # Failures log more: a 422 from each side, a 404, a probe.
        assert client.post(url, json=[{**EVENT, "tenant": ""}]).status_code == 422
        json_type = {"content-type": "application/json"}
        assert client.post(url, content=b"[{", headers=json_type).status_code == 422
        # A beacon (key in the query), the bridge's own 413 and 415, a preflight and a
        # page's POST (Origins.Check calls with the key), an unknown key's 401.
        query = {"api_key": secrets["query"]}
        beacon = {"content-type": "text/plain;charset=UTF-8"}
        assert client.post(url, params=query, content=b"[]", headers=beacon).is_success
        too_big = b" " * (1024 * 1024 + 1)
        assert client.post(url, params=query, content=too_big, headers=json_type).status_code == 413
        html = {"content-type": "text/html"}
        assert client.post(url, params=query, content=b"[]", headers=html).status_code == 415
        page = {"origin": "https://shop.example", "access-control-request-method": "POST"}
        assert client.options(url, params=query, headers=page).status_code == 403
        assert client.post(url, params=query, json=[EVENT], headers=page).status_code == 403
        unknown = {"api_key": UNKNOWN_KEY}
        assert client.post(url, params=unknown, json=[EVENT]).status_code == 401
        assert client.get(f"/nope?api_key={secrets['query']}").status_code == 404
        assert client.get("/readyz", headers={"X-Request-ID": LAST_REQUEST}).status_code == 200
    with grpc.insecure_channel(grpc_target) as channel:
        stub = events_pb2_grpc.EventsServiceStub(channel)
        send(stub, ev(tenant="my_store"), metadata=(("x-api-key", secrets["metadata"]),))
        with pytest.raises(grpc.RpcError):
            send(stub, ev(tenant=""), metadata=(("x-api-key", secrets["metadata"]),))
