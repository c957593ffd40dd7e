"""The lean routes' replies on real sockets: HTTP/1.1 as uvicorn keeps it (keep-alive,
pipelining, Expect: 100-continue, chunked bodies, Connection: close), each with its request
id, and a client that never reads its answers beside one that does (rest_bridge.responses
writes a whole reply at once, and leaves a connection whose writes are paused to uvicorn)."""

from __future__ import annotations

import json
import logging
import socket
import time
from urllib.parse import urlsplit

import httpx
import pytest
import redis

from events_server.queue.keys import KeySpace
from tests.harness.streams import queued

EVENT = {"tenant": "shop-b", "market": "us", "type": "click", "user_id": "u-1"}
BODY = json.dumps([EVENT]).encode()


def _connect(bridge: str) -> socket.socket:
    url = urlsplit(bridge)
    return socket.create_connection((url.hostname, url.port), timeout=10)


def _post(key: str, *headers: str, body: bytes = BODY, chunked: bool = False) -> bytes:
    lines = [
        "POST /create-events HTTP/1.1",
        "host: bridge",
        "content-type: application/json",
        f"x-api-key: {key}",
        *headers,
    ]
    if chunked:
        lines.append("transfer-encoding: chunked")
        half = len(body) // 2
        payload = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in (body[:half], body[half:]))
        body = payload + b"0\r\n\r\n"
    else:
        lines.append(f"content-length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def _responses(sock: socket.socket, count: int) -> list[tuple[bytes, dict[bytes, bytes], bytes]]:
    """``count`` responses read off ``sock``: status line, headers, body (by content-length)."""
    data = b""
    found: list[tuple[bytes, dict[bytes, bytes], bytes]] = []
    while len(found) < count:
        head, sep, rest = data.partition(b"\r\n\r\n")
        if sep:
            status, *lines = head.split(b"\r\n")
            headers = dict(line.split(b": ", 1) for line in lines)
            length = int(headers.get(b"content-length", b"0"))
            if len(rest) >= length:
                found.append((status, headers, rest[:length]))
                data = rest[length:]
                continue
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return found


def test_pipelined_posts_are_answered_in_order_each_with_its_request_id(
    bridge: str, api_key: str, rdb: redis.Redis, keys: KeySpace
) -> None:
    with _connect(bridge) as sock:
        sock.sendall(
            _post(api_key, "x-request-id: first-1")
            + _post(api_key, "x-request-id: second-2", chunked=True)
            + _post(api_key, "x-request-id: third-3", body=b"[{}]")  # a 422 in between
            + _post(api_key, "x-request-id: fourth-4")
        )
        answers = _responses(sock, 4)
        # Still open (keep-alive): one more on the same connection.
        sock.sendall(_post(api_key, "x-request-id: fifth-5", "connection: close"))
        [last] = _responses(sock, 1)
        assert sock.recv(1) == b""  # closed after the answer it asked to be the last
    answers.append(last)
    assert [a[0] for a in answers] == [b"HTTP/1.1 200 OK"] * 2 + [
        b"HTTP/1.1 422 Unprocessable Entity"
    ] + [b"HTTP/1.1 200 OK"] * 2
    ids = [a[1][b"x-request-id"] for a in answers]
    assert ids == [b"first-1", b"second-2", b"third-3", b"fourth-4", b"fifth-5"]
    assert [a[1].get(b"connection") for a in answers] == [None] * 4 + [b"close"]
    assert all(b"date" in a[1] for a in answers)
    assert json.loads(answers[0][2])["accepted"] == 1
    assert len(queued(rdb, keys)) == 4


def test_expect_100_continue_gets_its_interim_answer_then_the_reply(
    bridge: str, api_key: str, rdb: redis.Redis, keys: KeySpace
) -> None:
    request = _post(api_key, "expect: 100-continue")
    head, _, body = request.partition(b"\r\n\r\n")
    with _connect(bridge) as sock:
        sock.sendall(head + b"\r\n\r\n")
        interim = sock.recv(64)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(body)
        [(status, headers, answer)] = _responses(sock, 1)
    assert status == b"HTTP/1.1 200 OK"
    assert json.loads(answer)["accepted"] == 1
    assert b"x-request-id" in headers
    assert len(queued(rdb, keys)) == 1


def test_an_http_1_0_post_is_answered_and_closed(bridge: str, api_key: str) -> None:
    with _connect(bridge) as sock:
        sock.sendall(_post(api_key).replace(b"HTTP/1.1", b"HTTP/1.0", 1))
        [(status, headers, _)] = _responses(sock, 1)
        assert sock.recv(1) == b""
    assert status == b"HTTP/1.1 200 OK"
    assert headers[b"connection"] == b"close"


def test_a_client_that_never_reads_its_answers_leaves_another_served(
    bridge: str, api_key: str, http: httpx.Client, caplog: pytest.LogCaptureFixture
) -> None:
    # Pipelined POSTs (each answered by a 422 of ~10 KB) whose answers are never read, sent
    # until the bridge takes no more: its writes to the socket pause, or it refuses the
    # connection (a read of pipelined requests past max_header_bytes is answered 431).
    sock = _connect(bridge)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    burst = _post(api_key, body=json.dumps([{}] * 60).encode()) * 50
    blocked_since = None
    deadline = time.monotonic() + 60
    pending = memoryview(b"")
    with caplog.at_level(logging.ERROR):
        try:
            while time.monotonic() < deadline:
                try:
                    pending = pending or memoryview(burst)
                    pending = pending[sock.send(pending) :]  # on from where a send ended
                    blocked_since = None
                except BlockingIOError:
                    blocked_since = blocked_since or time.monotonic()
                    if time.monotonic() - blocked_since > 1:
                        break  # nothing taken for a second
                    time.sleep(0.05)
                except OSError:  # refused, and closed
                    break
            for _ in range(5):
                answer = http.post("/create-events", content=BODY)
                assert answer.status_code == 200, answer.text
                assert answer.headers["x-request-id"]
        finally:
            sock.close()
        answer = http.post("/create-events", content=BODY)
        assert answer.status_code == 200, answer.text
    # Nothing written after the refusal ended the connection (it was an error per answer).
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text[:2000]
