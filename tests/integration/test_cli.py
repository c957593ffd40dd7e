"""The commands against the real servers: tail --follow, bridge workers, Redis away."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import httpx
import pytest
import redis

from events_server.server.settings import Settings
from tests.harness.processes import BridgeProcess, events_env, run_events_server
from tests.harness.valkey import free_port


def test_tail_follow_prints_new_envelopes(
    http: httpx.Client, settings: Settings, rdb: redis.Redis
) -> None:
    env = events_env(settings)
    proc = subprocess.Popen(
        [sys.executable, "-m", "events_server", "tail", "--count", "0", "--follow"],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        # Wait until it blocks in XREAD: an event sent before that is not new to it.
        deadline = time.monotonic() + 20
        while not any(c.get("cmd") == "xread" for c in rdb.client_list()):
            assert time.monotonic() < deadline, "tail --follow never reached XREAD"
            time.sleep(0.05)
        event = {"tenant": "t", "market": "se", "type": "ws_click", "click_location": ""}
        assert http.post("/create-events", json=[event]).status_code == 200
        assert proc.stdout is not None
        line = json.loads(proc.stdout.readline())
        assert line["event"] == event
    finally:
        proc.kill()
        proc.wait(10)


def test_bridge_workers_serve_the_contract(api_key: str, grpc_target: str) -> None:
    bridge = BridgeProcess(grpc_target, None, "--workers", "2", "--log-level", "warning")
    bridge.spawn()
    try:
        assert bridge.ready("/readyz", within=20), "bridge workers did not start"
        with httpx.Client(base_url=bridge.url, timeout=5, headers={"x-api-key": api_key}) as client:
            event = {"tenant": "t", "market": "m", "type": "click"}
            for _ in range(10):
                assert client.post("/create-events", json=[event]).status_code == 200
        bridge.signal(signal.SIGTERM)
        assert bridge.wait(15) == 0
    finally:
        bridge.kill()


@pytest.mark.parametrize(
    "command", [["groups"], ["trim"], ["partitions"], ["groups", "--redis-cluster"]]
)
def test_an_unreachable_redis_is_a_clear_error_not_a_traceback(
    settings: Settings, command: list[str]
) -> None:
    down = settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{free_port()}/0"})
    done = run_events_server(down, *command, check=False)
    assert done.returncode == 1
    assert done.stderr.startswith(f"events-server {command[0]}: redis: ")
    assert "Traceback" not in done.stderr
