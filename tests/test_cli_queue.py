"""The queue commands as an operator runs them: consume (with a crash), groups, trim, replay."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import redis

from events_server.config import Settings
from events_server.keys import KeySpace
from events_server.pb import events_pb2_grpc
from tests.support import free_port
from tests.test_consumer import produce
from tests.test_server import eventually


def cli_env(settings: Settings) -> dict[str, str]:
    """The environment that points the commands at the session's Valkey and keys."""
    return {
        **os.environ,
        "REDIS_URL": settings.redis_url,
        "EVENTS_KEY_PREFIX": settings.key_prefix,
        "EVENTS_PARTITIONS": str(settings.partitions),
    }


def events_server(settings: Settings, *args: str) -> str:
    """Run an events-server command to completion; its stdout."""
    done = subprocess.run(
        [sys.executable, "-m", "events_server", *args],
        env=cli_env(settings),
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return done.stdout


def written(directory: Path) -> list[dict[str, Any]]:
    """The whole lines written so far, in complete and in open files."""
    found = []
    for path in sorted(directory.glob("*.jsonl*")):
        text = path.read_text()
        found += [json.loads(line) for line in text[: text.rfind("\n") + 1].splitlines()]
    return found


@pytest.mark.slow
def test_consume_to_jsonl_survives_a_crash_then_groups_trim_and_replay(
    stub: events_pb2_grpc.EventsServiceStub,
    rdb: redis.Redis,
    settings: Settings,
    keys: KeySpace,
    tmp_path: Path,
) -> None:
    queued = produce(stub, 600)
    rdb.xadd(keys.stream(0), {"e": b"\xff\xff\xff"})  # not an Envelope: a dead letter
    out = tmp_path / "out"
    consume = [
        sys.executable, "-m", "events_server", "consume",
        "--group", "sink", "--to-jsonl", str(out), "--consumer", "c1",
        "--max-file-bytes", "20000", "--batch-size", "50", "--block-seconds", "0.1",
        "--lease-seconds", "1", "--claim-idle-seconds", "0.5",
    ]  # fmt: skip
    first = subprocess.Popen(consume, env=cli_env(settings), stdout=subprocess.DEVNULL)
    try:
        eventually(lambda: len(written(out)) >= 50, within=15)
    finally:
        first.kill()
        first.wait(10)
    assert list(out.glob("*.jsonl.open"))  # it died writing

    # The same consumer again: it completes the file it left, and takes up its entries.
    second = subprocess.Popen(consume, env=cli_env(settings), stdout=subprocess.DEVNULL)
    try:
        eventually(
            lambda: {(line["partition"], line["entry_id"]) for line in written(out)} >= queued,
            within=20,
        )
    finally:
        second.send_signal(signal.SIGTERM)
        assert second.wait(15) == 0
    assert list(out.glob("*.jsonl.open")) == []
    assert len(list(out.glob("c1-*.jsonl"))) > 2
    assert {(line["partition"], line["entry_id"]) for line in written(out)} == queued

    [group] = [
        json.loads(line) for line in events_server(settings, "groups", "--json").splitlines()
    ]
    assert (group["group"], group["pending"], group["lag"], group["dead_letters"]) == (
        "sink",
        0,
        0,
        1,
    )
    assert "sink" in events_server(settings, "groups")

    assert events_server(settings, "trim").startswith("removed 601 acknowledged entries")
    assert sum(rdb.xlen(stream) for stream in keys.streams()) == 0

    replayed = events_server(settings, "replay", "--from-dead-letter", "--group", "sink")
    assert replayed == "replayed 1 dead letters of group sink (partition 0: 1)\n"
    assert rdb.xlen(keys.stream(0)) == 1
    assert rdb.xlen(keys.dead_letters(0, "sink")) == 0
    # Unread again by the group, so trim keeps it.
    assert events_server(settings, "trim") == "removed 0 acknowledged entries\n"
    assert rdb.xlen(keys.stream(0)) == 1


@pytest.mark.parametrize(
    "command", [["groups"], ["trim"], ["partitions"], ["groups", "--redis-cluster"]]
)
def test_an_unreachable_redis_is_a_clear_error_not_a_traceback(
    settings: Settings, command: list[str]
) -> None:
    down = settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{free_port()}/0"})
    done = subprocess.run(
        [sys.executable, "-m", "events_server", *command],
        env=cli_env(down),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 1
    assert done.stderr.startswith(f"events-server {command[0]}: redis: ")
    assert "Traceback" not in done.stderr
