"""The queue commands as an operator runs them: consume (with a crash), groups, trim, replay."""

from __future__ import annotations

import json
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from events_server.pb import events_pb2_grpc
from events_server.server.settings import Settings
from tests.harness.consumers import Entry, produce
from tests.harness.processes import events_env, run_events_server
from tests.harness.streams import Queue
from tests.harness.waiting import eventually


def events_server(settings: Settings, *args: str) -> str:
    """Run an events-server command to completion; its stdout."""
    return run_events_server(settings, *args).stdout


def started(command: list[str], settings: Settings) -> subprocess.Popen[str]:
    """Start ``events-server consume``; return once it has its signal handlers in place."""
    proc = subprocess.Popen(command, env=events_env(settings), stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 15)
    assert ready, "consume did not start"
    assert proc.stdout.readline().startswith("events-server consuming group sink as c1")
    return proc


def written(directory: Path) -> list[dict[str, Any]]:
    """The whole lines written so far, in complete and in open files."""
    while True:
        found = []
        try:
            for path in sorted(directory.glob("*.jsonl*")):
                text = path.read_text()
                found += [json.loads(line) for line in text[: text.rfind("\n") + 1].splitlines()]
        except FileNotFoundError:
            continue  # an open file was completed (renamed) meanwhile: look again
        return found


@pytest.mark.slow
def test_consume_to_jsonl_survives_a_crash_then_groups_trim_and_replay(
    stub: events_pb2_grpc.EventsServiceStub, queue: Queue, tmp_path: Path
) -> None:
    queue.rdb.xadd(queue.keys.stream(0), {"e": b"\xff\xff\xff"})  # not an Envelope: a dead letter
    queued: set[Entry] = set()

    def trickle() -> None:  # events keep coming while the consumers run and crash
        for _ in range(15):
            queued.update(produce(stub, 100))
            time.sleep(0.05)

    producer = threading.Thread(target=trickle)
    out = tmp_path / "out"
    consume = [
        sys.executable, "-m", "events_server", "consume",
        "--group", "sink", "--to-jsonl", str(out), "--consumer", "c1",
        "--max-file-bytes", "20000", "--batch-size", "50", "--block-seconds", "0.1",
        "--lease-seconds", "1", "--claim-idle-seconds", "0.5",
    ]  # fmt: skip
    first = started(consume, queue.settings)
    try:
        producer.start()
        eventually(lambda: len(written(out)) >= 200, within=15)
    finally:
        first.kill()
        first.wait(10)
    left_open = list(out.glob("*.jsonl.open"))
    assert left_open  # it died writing

    # The same consumer again: it completes the file it left, and takes up its entries.
    second = started(consume, queue.settings)
    try:
        producer.join(30)
        assert len(queued) == 1500
        eventually(
            lambda: {(line["partition"], line["entry_id"]) for line in written(out)} >= queued,
            within=20,
        )
    finally:
        second.send_signal(signal.SIGTERM)
        assert second.wait(15) == 0
    assert list(out.glob("*.jsonl.open")) == []
    assert all(path.with_suffix("").exists() for path in left_open)  # .jsonl.open -> .jsonl
    assert len(list(out.glob("c1-*.jsonl"))) > 2
    assert {(line["partition"], line["entry_id"]) for line in written(out)} == queued

    [group] = [
        json.loads(line) for line in events_server(queue.settings, "groups", "--json").splitlines()
    ]
    assert (group["group"], group["pending"], group["lag"], group["dead_letters"]) == (
        "sink",
        0,
        0,
        1,
    )
    assert "sink" in events_server(queue.settings, "groups")

    assert events_server(queue.settings, "trim").startswith("removed 1501 acknowledged entries")
    assert sum(queue.rdb.xlen(stream) for stream in queue.keys.streams()) == 0

    replayed = events_server(queue.settings, "replay", "--from-dead-letter", "--group", "sink")
    assert replayed == "replayed 1 dead letters of group sink (partition 0: 1)\n"
    assert queue.rdb.xlen(queue.keys.stream(0)) == 1
    assert queue.rdb.xlen(queue.keys.dead_letters(0, "sink")) == 0
    # Unread again by the group, so trim keeps it.
    assert events_server(queue.settings, "trim") == "removed 0 acknowledged entries\n"
    assert queue.rdb.xlen(queue.keys.stream(0)) == 1
