"""The command lines: every setting has a flag and an env variable, bad settings fail early."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import httpx
import pytest
import redis
from pydantic import ValidationError

from events_server.cli import main as events_server_main
from events_server.server.settings import Settings
from rest_bridge.cli import main as bridge_main
from rest_bridge.config import BridgeSettings
from tests.harness.processes import events_env
from tests.harness.valkey import free_port


def _help(module: str, *args: str) -> str:
    return subprocess.run(
        [sys.executable, "-m", module, *args, "--help"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
        env={"COLUMNS": "200", "PATH": ""},
    ).stdout


def test_serve_help_lists_every_setting_with_env_and_default() -> None:
    text = _help("events_server", "serve")
    for name, field in Settings.model_fields.items():
        assert f"--{name.replace('_', '-')}" in text
        assert f"default: {field.default}]" in text
    assert "[env REDIS_URL;" in text
    assert "[env EVENTS_PARTITIONS;" in text


def test_bridge_help_lists_every_setting_with_env_and_default() -> None:
    text = _help("rest_bridge")
    for name, field in BridgeSettings.model_fields.items():
        assert f"--{name.replace('_', '-')}" in text
        assert f"default: {field.default}]" in text
    assert "--host HOST" in text
    assert "--port PORT" in text


def test_flags_override_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from events_server.cli.main import build_parser  # noqa: PLC0415
    from events_server.ops.settings import settings_from_args  # noqa: PLC0415

    monkeypatch.setenv("EVENTS_PARTITIONS", "4")
    monkeypatch.setenv("REDIS_URL", "redis://env-host:1/0")
    args = build_parser().parse_args(["serve", "--partitions", "12"])
    settings = settings_from_args(Settings, args)
    assert (settings.partitions, settings.redis_url) == (12, "redis://env-host:1/0")


@pytest.mark.parametrize(
    ("main", "argv"),
    [
        (events_server_main, ["serve", "--partitions", "0"]),
        (events_server_main, ["serve", "--key-prefix", "a{b}"]),
        (events_server_main, ["serve", "--metrics-addr", "9464"]),
        (
            events_server_main,
            ["serve", "--max-event-bytes", "65536", "--max-request-bytes", "65536"],
        ),
        (bridge_main, ["--port", "70000"]),
    ],
)
def test_invalid_settings_fail_at_start_up(
    main: object, argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert callable(main)
    assert main(argv) == 2
    assert "invalid settings" in capsys.readouterr().err


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
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "rest_bridge", "--grpc-target", grpc_target, "--port", str(port),
         "--workers", "2", "--log-level", "warning"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        with httpx.Client(
            base_url=f"http://127.0.0.1:{port}", timeout=5, headers={"x-api-key": api_key}
        ) as client:
            deadline = time.monotonic() + 20
            while True:
                try:
                    if client.get("/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "bridge workers did not start"
                time.sleep(0.1)
            event = {"tenant": "t", "market": "m", "type": "click"}
            for _ in range(10):
                assert client.post("/create-events", json=[event]).status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_fsync_durability_is_refused_on_a_cluster() -> None:
    with pytest.raises(ValidationError, match="not supported with redis_cluster"):
        Settings(durability="fsync", redis_cluster=True)
