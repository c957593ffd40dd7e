"""Structured logs: JSON lines, request ids across bridge and server, one access line, no keys."""

from __future__ import annotations

import io
import json
import logging
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from events_server.ops.logs import (
    JsonFormatter,
    accept_request_id,
    client_ip_for_log,
    request_id,
    setup_logging,
)
from events_server.pb import events_pb2_grpc
from events_server.server.settings import Settings
from rest_bridge.access import redact_query
from tests.harness.data import ev
from tests.harness.keys import create_key
from tests.harness.processes import events_env
from tests.harness.rpc import send
from tests.harness.valkey import free_port
from tests.harness.waiting import eventually

ACCESS_LOGGERS = ("events_server.access", "rest_bridge.access")
EVENT = {"tenant": "my_store", "market": "us", "type": "click"}


# --- pieces ---------------------------------------------------------------------------


def test_json_lines_carry_the_request_id_and_extra_fields() -> None:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("test_logs.json")
    logger.addHandler(handler)
    logger.propagate = False
    token = request_id.set("req-1")
    try:
        logger.warning("hello %s", "world", extra={"status": 200, "path": "/x"})
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("failed")
    finally:
        request_id.reset(token)
        logger.removeHandler(handler)
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert first["msg"] == "hello world"
    assert first["level"] == "WARNING"
    assert first["logger"] == "test_logs.json"
    assert (first["request_id"], first["status"], first["path"]) == ("req-1", 200, "/x")
    assert first["ts"].endswith("+00:00")
    assert "ValueError: boom" in second["exc"]


def test_setup_logging_makes_every_logger_write_json() -> None:
    out = io.StringIO()
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    try:
        setup_logging("INFO", out)
        logging.getLogger("test_logs.library").info("started")
        logging.getLogger("test_logs.library").debug("not at INFO")
        # uvicorn's own handlers would print a second, plain copy of its lines.
        assert not logging.getLogger("uvicorn.error").handlers
    finally:
        root.handlers[:], root.level = saved[0], saved[1]
    [line] = out.getvalue().splitlines()
    assert json.loads(line)["msg"] == "started"


@pytest.mark.parametrize(
    ("ip", "mode", "shown"),
    [
        ("203.0.113.77", "full", "203.0.113.77"),
        ("203.0.113.77", "truncated", "203.0.113.0"),
        ("2001:db8:1234:5678::1", "truncated", "2001:db8:1234::"),
        ("::ffff:203.0.113.77", "truncated", "203.0.113.0"),
        ("203.0.113.77", "none", ""),
        ("/run/events.sock", "truncated", ""),
    ],
)
def test_client_ips_can_be_truncated(ip: str, mode: Any, shown: str) -> None:
    assert client_ip_for_log(ip, mode) == shown


@pytest.mark.parametrize(
    ("query", "logged"),
    [
        ("api_key=s3cret", "api_key=[REDACTED]"),
        ("a=1&api_key=s3cret&b=2", "a=1&api_key=[REDACTED]&b=2"),
        ("api%5Fkey=s3cret", "api%5Fkey=[REDACTED]"),  # what Starlette reads as api_key
        ("API_KEY=s3cret&X-API-KEY=s3cret", "API_KEY=[REDACTED]&X-API-KEY=[REDACTED]"),
        ("api_key", "api_key=[REDACTED]"),
        ("q=api_key&page=2", "q=api_key&page=2"),
    ],
)
def test_keys_are_redacted_from_query_strings(query: str, logged: str) -> None:
    assert redact_query(query) == logged


def test_only_sane_request_ids_are_taken_from_callers() -> None:
    assert accept_request_id("req-42.a:b_c") == "req-42.a:b_c"
    for bad in (None, "", "has space", "x" * 129, "line\nbreak", "ключ"):
        fresh = accept_request_id(bad)
        assert fresh != bad
        assert len(fresh) == 32


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


# --- no key material, ever: the real processes' whole output ----------------------------

KEY_WAYS = ("query", "encoded-query", "header", "cookie", "metadata")
UNKNOWN_KEY = "evk_unknown-s3cret-9999"


LAST_REQUEST = "last-request"


def _wait_http(url: str) -> None:
    def up() -> bool:
        try:
            return httpx.get(url, timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    eventually(up, within=20)


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
    )
    server_out, bridge_out = tmp_path / "server.log", tmp_path / "bridge.log"
    http_port = free_port()
    with server_out.open("w") as server_log, bridge_out.open("w") as bridge_log:
        server = subprocess.Popen(
            [sys.executable, "-m", "events_server", "serve", "--grpc-addr", "127.0.0.1:0"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=server_log,
            text=True,
        )
        bridge: subprocess.Popen[bytes] | None = None
        try:
            assert server.stdout is not None
            target = re.findall(r"listening on (\S+) ", server.stdout.readline())[0]
            bridge = subprocess.Popen(
                [sys.executable, "-m", "rest_bridge", "--grpc-target", target],
                env={**env, "EVENTS_HTTP_PORT": str(http_port)},
                stdout=bridge_log,
                stderr=subprocess.STDOUT,
            )
            base = f"http://127.0.0.1:{http_port}"
            _wait_http(f"{base}/readyz")
            _send_keys_every_way(secrets, base, target)
            # The bridge writes an access line after answering: wait for the last one.
            eventually(lambda: LAST_REQUEST in bridge_out.read_text())
        finally:
            for proc in (bridge, server):
                if proc is not None:
                    proc.terminate()
                    proc.wait(15)
        assert server.stdout is not None
        server_stdout = server.stdout.read()

    output = server_out.read_text() + server_stdout + bridge_out.read_text()
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
