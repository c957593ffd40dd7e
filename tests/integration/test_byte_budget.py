"""The bridge's byte budget (rest_bridge.budget) holds request bodies, and a storefront's
small requests still go through while it is spent."""

from __future__ import annotations

import socket
import time

import httpx

from rest_bridge.app import Bridge
from tests.harness.servers import UvicornThread, bridge_settings_for
from tests.harness.ws import event

MIB = 1024 * 1024
BODY = 1_000_000


def test_bodies_past_the_budget_are_not_read_and_a_small_post_still_is(
    grpc_target: str, api_key: str
) -> None:
    settings = bridge_settings_for(
        grpc_target,
        max_bytes_in_flight=MIB,
        max_connections=64,  # x one 16 KiB frame each: within the budget
        ws_max_connections=32,
        body_timeout_seconds=30.0,
    )
    bridge = UvicornThread(settings)
    bridge.start()
    app = bridge.server.config.loaded_app
    assert isinstance(app, Bridge)
    assert app.connection_guard is not None
    budget = app.connection_guard.budget
    head = (
        f"POST /create-events HTTP/1.1\r\nHost: x\r\nX-API-KEY: {api_key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {BODY}\r\n\r\n"
    ).encode()
    senders: list[socket.socket] = []
    try:
        # Four bodies of ~1 MB each, all but their last byte sent: 4 MB for the taking.
        for _ in range(4):
            sock = socket.create_connection(("127.0.0.1", bridge.port))
            sock.setblocking(False)
            data = memoryview(head + b"[" + b" " * (BODY - 3))
            deadline = time.monotonic() + 2
            while data and time.monotonic() < deadline:
                try:
                    data = data[sock.send(data) :]
                except BlockingIOError:
                    time.sleep(0.01)
            senders.append(sock)
        time.sleep(0.5)  # what the bridge would read, it has read
        held = budget.held
        with httpx.Client(base_url=bridge.url, headers={"x-api-key": api_key}) as http:
            answer = http.post("/create-events", json=[event(user_id="small")], timeout=5)
    finally:
        for sock in senders:
            sock.close()
        bridge.stop()
    # The budget, a read's worth past it, and each connection's share: not the 4 MB.
    assert held <= 2 * MIB, held
    assert answer.status_code == 200, answer.text
