"""The command lines: every setting has a flag and an env variable, bad settings fail early."""

from __future__ import annotations

import subprocess
import sys

import pytest

from events_server.cli import main as events_server_main
from events_server.server.settings import Settings
from rest_bridge.cli import main as bridge_main
from rest_bridge.config import BridgeSettings


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
