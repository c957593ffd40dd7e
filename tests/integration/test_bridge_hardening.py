"""Hostile HTTP traffic to the bridge, each attack beside legitimate requests that must still work.

The bridge runs as a child process under ``prlimit --nofile=1024`` (the common default
limit), in front of the session's gRPC server; every loop is bounded and everything
stays on loopback. The time bounds asserted (2 s) are the hardening issue's own
acceptance criteria, far above what is measured (``python -m bench.attacks``).
"""

from __future__ import annotations

import contextlib
import gzip
import os
import shutil
import socket
import ssl
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import trustme

from rest_bridge.errors import MAX_422_BYTES, MAX_LISTED_ERRORS, TOO_MANY_ERRORS
from rest_bridge.responses import Reply
from rest_bridge.validation import validate_body, validate_large_body
from tests.harness.metrics import scrape, value
from tests.harness.processes import BridgeProcess
from tests.harness.servers import bridged
from tests.harness.tls import ca_file, https_context, issue

NOFILE = 1024
ACCEPTANCE_SECONDS = 2.0
EMPTY_OBJECTS = b"[" + b",".join([b"{}"] * 340_000) + b"]"  # 1,020,001 bytes
EVENT = {"tenant": "shop-x", "market": "us", "type": "page_view", "user_id": "u-1"}


class LimitedBridge(BridgeProcess):
    """``rest-bridge`` as a child process allowed NOFILE open files."""

    def spawn(self) -> None:
        limit = ["prlimit", f"--nofile={NOFILE}:{NOFILE}"]
        self._spawn([*limit, sys.executable, "-m", "rest_bridge", *self.argv], self.env, None)


@pytest.fixture(scope="module")
def limited(grpc_target: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LimitedBridge]:
    if shutil.which("prlimit") is None:
        message = "prlimit (util-linux) is not installed"
        if os.environ.get("CI"):
            pytest.fail(f"{message}: CI must run the descriptor-limit tests")
        pytest.skip(message)
    logs = Path(tmp_path_factory.mktemp("limited-bridge"))
    bridge = LimitedBridge(grpc_target, logs / "bridge.log", "--log-level", "WARNING")
    bridge.start()
    yield bridge
    bridge.stop()


@pytest.fixture(scope="module")
def limited_https(
    grpc_target: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LimitedBridge]:
    """The same bridge serving HTTPS (its own TLS, see rest_bridge.https)."""
    directory = Path(tmp_path_factory.mktemp("limited-https"))
    ca = trustme.CA()
    server = issue(ca, directory, "server", "127.0.0.1")
    bridge = LimitedBridge(
        grpc_target,
        directory / "bridge.log",
        "--log-level",
        "WARNING",
        "--http-tls-cert-file",
        str(server.cert),
        "--http-tls-key-file",
        str(server.key),
        verify=https_context(ca_file(ca, directory / "ca.pem")),
    )
    bridge.start()
    yield bridge
    bridge.stop()


def legit(url: str, api_key: str, verify: ssl.SSLContext | None = None) -> tuple[int, float]:
    """One legitimate one-event POST on a new connection: its status and how long it took."""
    started = time.monotonic()
    answer = httpx.post(
        f"{url}/create-events",
        json=[EVENT],
        headers={"x-api-key": api_key},
        timeout=10,
        verify=verify or True,
    )
    return answer.status_code, time.monotonic() - started


def served_in_time(results: list[tuple[int, float]]) -> bool:
    return all(status == 200 and took <= ACCEPTANCE_SECONDS for status, took in results)


def detail(body: bytes) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = orjson.loads(body)["detail"]
    return found


# --- 422 amplification ----------------------------------------------------------------


ONE_EVENT_330K_BAD_VARIANT_IDS = orjson.dumps([{**EVENT, "variant_ids": [[]] * 330_000}])

ATTACKS = {
    # (body, headers, time bound of each attacker's answer)
    "340k empty objects, gzipped": (
        gzip.compress(EMPTY_OBJECTS, 9),
        {"content-encoding": "gzip", "content-type": "application/json"},
        ACCEPTANCE_SECONDS,
    ),
    "340k empty objects, as a beacon": (
        EMPTY_OBJECTS,
        {"content-type": "text/plain;charset=UTF-8"},
        ACCEPTANCE_SECONDS,
    ),
    # Within the count: 330,000 errors in one event, parsed away from the event loop.
    "330k bad variant ids, gzipped": (
        gzip.compress(ONE_EVENT_330K_BAD_VARIANT_IDS, 9),
        {"content-encoding": "gzip", "content-type": "application/json"},
        5.0,
    ),
}


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_bodies_of_countless_errors_are_refused_fast_and_small_beside_legit_traffic(
    limited: LimitedBridge, api_key: str, attack: str
) -> None:
    body, headers, bound = ATTACKS[attack]
    assert len(body) < 2048 or "beacon" in attack
    answers: list[tuple[int, bytes, float]] = []
    stop = threading.Event()

    def attacker() -> None:
        with httpx.Client(base_url=limited.url, timeout=30, headers={"x-api-key": api_key}) as c:
            while not stop.is_set():
                started = time.monotonic()
                answer = c.post("/create-events", content=body, headers=headers)
                answers.append((answer.status_code, answer.content, time.monotonic() - started))

    threads = [threading.Thread(target=attacker, daemon=True) for _ in range(2)]
    for thread in threads:
        thread.start()
    try:
        deadline = time.monotonic() + 10
        while not answers and time.monotonic() < deadline:
            time.sleep(0.05)
        results = [legit(limited.url, api_key) for _ in range(5)]
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    assert served_in_time(results), results
    assert answers
    for status, content, took in answers:
        assert 400 <= status < 500
        assert len(content) <= MAX_422_BYTES
        assert took <= bound, (status, took)
    first = detail(answers[0][1])
    if "340k" in attack:
        assert first == [
            {
                "loc": ["body"],
                "msg": "the request has 340000 events; at most 500 are allowed"
                " (max_events_per_request)",
                "type": "too_many_events",
            }
        ]
    else:
        assert len(first) == MAX_LISTED_ERRORS + 1
        assert first[0]["loc"] == ["body", 0, "variant_ids", 0]
        assert first[-1]["type"] == TOO_MANY_ERRORS
        assert first[-1]["msg"].startswith(f"{330_000 - MAX_LISTED_ERRORS} more errors")


def test_past_50_errors_a_422_lists_50_then_how_many_more(http: httpx.Client) -> None:
    answer = http.post("/create-events", json=[{}] * 200)  # 600 errors: 3 missing fields each
    assert answer.status_code == 422
    listed = answer.json()["detail"]
    assert len(listed) == MAX_LISTED_ERRORS + 1
    assert listed[0] == {"type": "missing", "loc": ["body", 0, "tenant"], "msg": "Field required"}
    assert listed[-1] == {
        "loc": ["body"],
        "msg": "550 more errors not listed: a 422 lists the first 50",
        "type": TOO_MANY_ERRORS,
    }
    # Up to 50 errors the 422 is FastAPI's whole (test_numbers_and_422), inputs included.
    few = http.post("/create-events", json=[{}] * 16).json()["detail"]
    assert len(few) == 48
    assert few[0] == {
        "type": "missing",
        "loc": ["body", 0, "tenant"],
        "msg": "Field required",
        "input": {},
    }


BIG_ECHO = orjson.dumps([{"market": "us", "type": "click", "url": "x" * 900_000}])


@pytest.mark.parametrize("validate", [validate_body, validate_large_body])
def test_a_422_stays_within_64_kib_whatever_fastapi_would_echo(validate: Any) -> None:
    # FastAPI would echo the whole 900 kB event as the input of the missing tenant.
    reply = validate(BIG_ECHO, 16, 500)
    reply = reply[0] if isinstance(reply, tuple) else reply
    assert isinstance(reply, Reply)
    assert reply.status == 422
    assert len(reply.body) <= MAX_422_BYTES
    assert detail(reply.body) == [
        {"type": "missing", "loc": ["body", 0, "tenant"], "msg": "Field required"}
    ]


def test_both_parsing_paths_list_the_same_first_errors_and_count() -> None:
    body = orjson.dumps(
        [{**EVENT, "variant_ids": ["ok"] * 1000 + [[]] * 30_000, "colour": 1}, {}, 5]
    )
    errors = 30_000 + 1 + 3 + 1
    listed = validate_large_body(body, 16, 500)[0]
    assert isinstance(listed, Reply)
    found = detail(listed.body)
    assert [e["loc"] for e in found[:2]] == [
        ["body", 0, "variant_ids", 1000],
        ["body", 0, "variant_ids", 1001],
    ]
    assert found[-1]["msg"].startswith(f"{errors - MAX_LISTED_ERRORS} more errors")
    assert len(listed.body) <= MAX_422_BYTES


# --- connections ------------------------------------------------------------------------


def test_1100_idle_sockets_under_a_1024_descriptor_limit_leave_legit_requests_served(
    limited: LimitedBridge, api_key: str
) -> None:
    held: list[socket.socket] = []
    try:
        for _ in range(1100):
            held.append(socket.create_connection(("127.0.0.1", limited.port), timeout=5))
        results = [legit(limited.url, api_key) for _ in range(5)]
    finally:
        for sock in held:
            sock.close()
    assert served_in_time(results), results
    # The operator sees it: a metric and a log line.
    samples = scrape(f"{limited.url}/metrics")
    assert value(samples, "events_http_connections_closed_total", reason="evicted") >= 1
    assert "max_connections=896 reached" in limited.log()


def test_1100_sockets_that_never_say_hello_leave_https_requests_served(
    limited_https: LimitedBridge, api_key: str
) -> None:
    # Before its handshake a TLS connection was invisible to the bounds, for up to the
    # event loop's 60 s handshake timeout.
    bridge = limited_https
    held: list[socket.socket] = []
    try:
        for _ in range(1100):
            held.append(socket.create_connection(("127.0.0.1", bridge.port), timeout=5))
        results = [legit(bridge.url, api_key, bridge.verify) for _ in range(5)]
    finally:
        for sock in held:
            sock.close()
    assert served_in_time(results), results
    samples = scrape(f"{bridge.url}/metrics", verify=bridge.verify)
    assert value(samples, "events_http_connections_closed_total", reason="evicted") >= 1


@pytest.mark.parametrize("size", [1_000_000, 64_000_000], ids=["1MB", "64MB"])
def test_a_huge_header_is_answered_431_at_once(
    limited: LimitedBridge, api_key: str, size: int
) -> None:
    head = f"POST /create-events HTTP/1.1\r\nHost: x\r\nX-API-KEY: {api_key}\r\nX-Big: "
    with socket.create_connection(("127.0.0.1", limited.port), timeout=10) as sock:

        def send() -> None:
            # Refused before the end: the bridge does not read it all.
            with contextlib.suppress(OSError):
                sock.sendall(head.encode() + b"a" * size + b"\r\nContent-Length: 2\r\n\r\n[]")

        sender = threading.Thread(target=send, daemon=True)
        started = time.monotonic()
        sender.start()
        answer = sock.recv(65536)
        took = time.monotonic() - started
        sender.join(30)
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line == b"HTTP/1.1 431 Request Header Fields Too Large"
    assert took <= ACCEPTANCE_SECONDS
    assert b"max_header_bytes" in rest
    assert served_in_time([legit(limited.url, api_key)])


def test_a_header_within_the_limit_is_served(limited: LimitedBridge, api_key: str) -> None:
    answer = httpx.post(
        f"{limited.url}/create-events",
        json=[EVENT],
        headers={"x-api-key": api_key, "x-padding": "p" * 12_000},
        timeout=10,
    )
    assert answer.status_code == 200


def test_a_trailing_slash_is_not_redirected_and_never_echoes_the_key(
    limited: LimitedBridge, api_key: str
) -> None:
    answer = httpx.post(
        f"{limited.url}/create-events/?api_key={api_key}",
        json=[EVENT],
        follow_redirects=False,
        timeout=10,
    )
    assert answer.status_code == 404
    assert "location" not in answer.headers
    assert api_key not in answer.text
    assert all(api_key not in v for v in answer.headers.values())
    assert served_in_time([legit(limited.url, api_key)])


def recv_within(sock: socket.socket, seconds: float) -> tuple[bytes, float]:
    """What the bridge sends (b"" when it closes) within ``seconds``, and when."""
    started = time.monotonic()
    sock.settimeout(seconds)
    try:
        data = sock.recv(65536)
    except TimeoutError:
        data = b"(nothing)"
    except ConnectionResetError:
        data = b""
    return data, time.monotonic() - started


def test_connections_that_send_nothing_or_a_slow_head_are_dropped(
    grpc_target: str, api_key: str
) -> None:
    with bridged(grpc_target, header_timeout_seconds=1.0) as url:
        port = int(url.rsplit(":", 1)[1])
        with (
            socket.create_connection(("127.0.0.1", port)) as silent,
            socket.create_connection(("127.0.0.1", port)) as slow,
        ):
            slow.sendall(b"POST /create-events HTTP/1.1\r\nHost: x\r\n")
            time.sleep(0.5)
            slow.sendall(b"X-Slow: a")  # still sending, but not the whole head in time
            assert served_in_time([legit(url, api_key)])
            said, took = recv_within(slow, 5)
            assert said.startswith(b"HTTP/1.1 408 Request Timeout")
            assert took <= ACCEPTANCE_SECONDS
            assert recv_within(silent, 5)[0] == b""
        assert served_in_time([legit(url, api_key)])


def test_a_body_that_does_not_arrive_in_time_is_answered_408(
    grpc_target: str, api_key: str
) -> None:
    with bridged(grpc_target, body_timeout_seconds=1.0) as url:
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(
                b"POST /create-events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                + f"X-API-KEY: {api_key}\r\nContent-Length: 100\r\n\r\n[".encode()
            )
            said, took = recv_within(sock, 5)
        assert said.startswith(b"HTTP/1.1 408 Request Timeout")
        assert b"body_timeout_seconds" in said
        assert took <= ACCEPTANCE_SECONDS
        assert served_in_time([legit(url, api_key)])
