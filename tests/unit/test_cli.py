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


@pytest.mark.parametrize("main", [events_server_main, bridge_main])
@pytest.mark.parametrize(
    "bad",
    [
        ("1.5", "less than or equal to 1"),
        ("-0.1", "greater than or equal to 0"),
        ("nan", "finite number"),
        ("1%", "valid number"),
    ],
)
@pytest.mark.parametrize("given", ["flag", "env"])
def test_an_access_log_sample_outside_0_to_1_fails_at_start_up(
    main: object,
    bad: tuple[str, str],
    given: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert callable(main)
    value, why = bad
    argv = ["serve"] if main is events_server_main else []
    if given == "flag":
        argv += ["--access-log-sample", value]
    else:
        monkeypatch.setenv("EVENTS_ACCESS_LOG_SAMPLE", value)
    if given == "flag" and value == "1%":
        with pytest.raises(SystemExit):  # argparse's own refusal of a float flag
            main(argv)
        assert "--access-log-sample: invalid float value: '1%'" in capsys.readouterr().err
        return
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "invalid settings" in err
    assert "access_log_sample" in err
    assert why in err
