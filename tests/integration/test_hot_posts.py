"""The JSON POSTs served from the protocol's callbacks (rest_bridge.hot) and the one lazily
set timer of a connection (rest_bridge.http_protocol), on real sockets: a request whose
body came with its head gets the same answer as one whose body came later (which uvicorn's
task serves), a client gone before its answer costs nothing, and the head and keep-alive
bounds hold however many requests moved them, with a legitimate client served beside."""

from __future__ import annotations

import json
import socket
import time
from urllib.parse import urlsplit

import httpx
import redis

from events_server.queue.keys import KeySpace
from events_server.server.settings import Settings
from tests.harness.keys import create_key
from tests.harness.servers import bridged
from tests.harness.streams import queued

EVENT = {"tenant": "shop-h", "market": "us", "type": "click", "user_id": "u-1"}
ACCEPTANCE_SECONDS = 2.0

Answer = tuple[bytes, dict[bytes, bytes], bytes]


def _connect(url: str) -> socket.socket:
    parts = urlsplit(url)
    return socket.create_connection((parts.hostname, parts.port), timeout=10)


def _post(key: str, rid: str, body: bytes) -> bytes:
    head = (
        "POST /create-events HTTP/1.1\r\nhost: bridge\r\ncontent-type: application/json\r\n"
        f"x-api-key: {key}\r\nx-request-id: {rid}\r\ncontent-length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def _answer(sock: socket.socket) -> Answer:
    """One response off ``sock``: status line, headers, body (by content-length)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed before an answer: {data!r}"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    status, *lines = head.split(b"\r\n")
    headers = dict(line.split(b": ", 1) for line in lines)
    while len(rest) < int(headers[b"content-length"]):
        rest += sock.recv(65536)
    return status, headers, rest


def _closed_within(sock: socket.socket, seconds: float) -> float | None:
    """How long until the bridge closed ``sock`` (None: still open after ``seconds``)."""
    started = time.monotonic()
    sock.settimeout(seconds)
    try:
        data = sock.recv(1)
    except TimeoutError:
        return None
    except ConnectionResetError:
        data = b""
    assert data == b"", data
    return time.monotonic() - started


def _legit(url: str, key: str) -> float:
    started = time.monotonic()
    answer = httpx.post(
        f"{url}/create-events", json=[EVENT], headers={"x-api-key": key}, timeout=10
    )
    assert answer.status_code == 200, answer.text
    return time.monotonic() - started


def test_a_body_after_its_head_gets_the_answer_of_one_that_came_with_it(
    bridge: str, api_key: str, rdb: redis.Redis, keys: KeySpace
) -> None:
    whole = _post(api_key, "whole-1", json.dumps([{**EVENT, "user_id": "u-whole"}]).encode())
    late = _post(api_key, "late-2", json.dumps([{**EVENT, "user_id": "u-late"}]).encode())
    head, _, body = late.partition(b"\r\n\r\n")
    with _connect(bridge) as sock:
        sock.sendall(whole)
        first = _answer(sock)
        sock.sendall(head + b"\r\n\r\n")
        time.sleep(0.2)  # the head's read is over: uvicorn's task reads the body
        sock.sendall(body)
        second = _answer(sock)
    for (status, headers, answer), rid in ((first, b"whole-1"), (second, b"late-2")):
        assert status == b"HTTP/1.1 200 OK"
        assert headers.pop(b"x-request-id") == rid
        headers.pop(b"date")
        assert headers == {
            b"content-type": b"application/json",
            b"content-length": b"%d" % len(answer),
        }
        reply = json.loads(answer)
        assert (reply["accepted"], reply["duplicates"]) == (1, 0)
        assert reply["results"][0]["status"] == "accepted"
    users = sorted(envelope.event.user_id for _, envelope in queued(rdb, keys))
    assert users == ["u-late", "u-whole"]


def test_a_client_gone_before_its_answer_leaves_its_event_queued_and_others_served(
    bridge: str, api_key: str, rdb: redis.Redis, keys: KeySpace
) -> None:
    body = json.dumps([{**EVENT, "user_id": "u-gone"}]).encode()
    for n in range(20):
        with _connect(bridge) as sock:
            sock.sendall(_post(api_key, f"gone-{n}", body))
        # closed at once: nobody reads the answer
    assert _legit(bridge, api_key) <= ACCEPTANCE_SECONDS
    deadline = time.monotonic() + 5
    while len(queued(rdb, keys)) < 21 and time.monotonic() < deadline:
        time.sleep(0.05)
    gone = [e for _, e in queued(rdb, keys) if e.event.user_id == "u-gone"]
    assert len(gone) == 20  # each one taken in full, its answer dropped


def test_a_client_gone_before_its_answer_is_served_by_the_task_too(
    bridge: str, api_key: str, rdb: redis.Redis, keys: KeySpace, settings: Settings
) -> None:
    # uvicorn's task serves a request whose caller the bridge has not admitted yet (it asks
    # the server first) or whose body came after its head; by the time it reads the body,
    # the client is gone. A client that sent everything (a beacon as its page closes) is
    # served all the same; one that left before its whole body is not.
    fresh = create_key(settings.redis_url, settings.key_prefix, ["shop-h"], "fresh")
    whole = json.dumps([{**EVENT, "user_id": "u-unknown"}]).encode()
    for n in range(5):
        with _connect(bridge) as sock:
            sock.sendall(_post(fresh, f"unknown-{n}", whole))
    late = json.dumps([{**EVENT, "user_id": "u-late"}]).encode()
    for n in range(5):
        head, _, body = _post(api_key, f"late-{n}", late).partition(b"\r\n\r\n")
        with _connect(bridge) as sock:
            sock.sendall(head + b"\r\n\r\n")
            time.sleep(0.05)  # the head's read is over: uvicorn's task reads the body
            sock.sendall(body)
    cut = json.dumps([{**EVENT, "user_id": "u-cut"}]).encode()
    with _connect(bridge) as sock:
        sock.sendall(_post(api_key, "cut-0", cut)[:-5])
    assert _legit(bridge, api_key) <= ACCEPTANCE_SECONDS
    deadline = time.monotonic() + 5
    while len(queued(rdb, keys)) < 11 and time.monotonic() < deadline:
        time.sleep(0.05)
    users = sorted(e.event.user_id for _, e in queued(rdb, keys))
    assert users == ["u-1"] + ["u-late"] * 5 + ["u-unknown"] * 5


def test_a_connection_idle_past_keep_alive_is_closed_one_in_use_is_not(
    grpc_target: str, api_key: str
) -> None:
    body = json.dumps([EVENT]).encode()
    with bridged(grpc_target, keep_alive_timeout_seconds=0.5) as url:
        with _connect(url) as busy, _connect(url) as idle:
            idle.sendall(_post(api_key, "idle-0", body))
            assert _answer(idle)[0] == b"HTTP/1.1 200 OK"
            # 8 requests 0.3 s apart: each moves the bound, none lets it pass.
            for n in range(8):
                busy.sendall(_post(api_key, f"busy-{n}", body))
                assert _answer(busy)[0] == b"HTTP/1.1 200 OK"
                time.sleep(0.3)
            assert _closed_within(idle, 0.1) is not None  # idle 2.4 s: long gone
            busy.sendall(_post(api_key, "busy-last", body))
            assert _answer(busy)[0] == b"HTTP/1.1 200 OK"
            took = _closed_within(busy, 3)
        assert took is not None
        assert 0.3 <= took <= 1.5
        assert _legit(url, api_key) <= ACCEPTANCE_SECONDS


def test_a_head_stalled_after_many_requests_is_answered_408_in_time(
    grpc_target: str, api_key: str
) -> None:
    body = json.dumps([EVENT]).encode()
    with bridged(grpc_target, header_timeout_seconds=1.0) as url:
        with _connect(url) as sock:
            # Each request's head is in well within the bound: 12 of them over 2.4 s.
            for n in range(12):
                sock.sendall(_post(api_key, f"quick-{n}", body))
                assert _answer(sock)[0] == b"HTTP/1.1 200 OK"
                time.sleep(0.2)
            started = time.monotonic()
            sock.sendall(b"POST /create-events HTTP/1.1\r\nhost: bridge\r\n")
            assert _legit(url, api_key) <= ACCEPTANCE_SECONDS
            status, _, detail = _answer(sock)
            took = time.monotonic() - started
        assert status == b"HTTP/1.1 408 Request Timeout"
        assert b"header_timeout_seconds" in detail
        assert 0.9 <= took <= 2.0
