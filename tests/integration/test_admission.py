"""Nothing costly before the caller is known: the bridge refuses an unknown one on its headers."""

from __future__ import annotations

import socket
import uuid
from urllib.parse import urlsplit

import httpx
import pytest
import redis

from events_server.server.app import EventsServer
from events_server.wire.metadata import ADMIT_METHOD
from tests.harness.metrics import scrape, server_metrics_url, value


def head_only(base: str, *headers: str) -> tuple[str, dict[str, str]]:
    """POST the headers of a 1 MiB body, never the body: the status line and headers sent
    back within 10 s (the bridge's body timeout is 30 s: an answer means it read no body)."""
    url = urlsplit(base)
    lines = [
        "POST /create-events HTTP/1.1",
        f"Host: {url.hostname}",
        "Content-Type: application/json",
        f"Content-Length: {1024 * 1024}",
        *headers,
    ]
    with socket.create_connection((url.hostname or "", url.port or 80), timeout=10) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(65536)
            assert chunk, "closed without an answer"
            answer += chunk
    head = answer.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    fields = dict(line.lower().split(": ", 1) for line in head[1:])
    return head[0], fields


@pytest.mark.parametrize(
    ("credentials", "status"),
    [
        ((), "401"),
        (("X-API-KEY: evk_made-up",), "401"),
        ((f"Origin: https://{uuid.uuid4().hex[:12]}.nowhere.example",), "403"),
    ],
    ids=["no-key", "made-up-key", "unregistered-origin"],
)
def test_an_unknown_caller_is_refused_before_its_body_is_read(
    bridge: str, credentials: tuple[str, ...], status: str
) -> None:
    line, fields = head_only(bridge, *credentials)
    assert line.split(" ")[1] == status
    assert fields["connection"] == "close"  # the body unread: the connection cannot be reused


def test_a_known_callers_admission_is_kept_and_its_body_read(
    bridge: str, server: EventsServer, api_key: str, rdb: redis.Redis
) -> None:
    url = server_metrics_url(server)
    # A page origin of its own: no admission of this (key, origin) is kept yet.
    origin = {"origin": f"https://{uuid.uuid4().hex[:12]}.example"}
    before = scrape(url)
    body = [{"tenant": "shop-a", "market": "us", "type": "click"}]
    with httpx.Client(base_url=bridge, headers={"x-api-key": api_key}, timeout=10) as http:
        for _ in range(5):
            answer = http.post("/create-events", json=body, headers=origin)
            # Asked once, with the page's origin: this key lists none, and none is global.
            assert answer.status_code == 403
        assert http.post("/create-events", json=body).status_code == 200
        assert http.post("/create-events", json=body).status_code == 200
    after = scrape(url)

    def asked(code: str) -> float:
        return value(after, "events_grpc_requests_total", method=ADMIT_METHOD, code=code) - value(
            before, "events_grpc_requests_total", method=ADMIT_METHOD, code=code
        )

    # Refusals are asked each time (a key may come into force any moment); an admission
    # is kept (the session key may be kept from an earlier test: at most once).
    assert asked("PERMISSION_DENIED") == 5
    assert asked("OK") <= 1
