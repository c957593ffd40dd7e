"""The JSON Lines sink: the line format, rotation, completing files, recovery after a crash."""

from __future__ import annotations

import json
from pathlib import Path

from google.protobuf.timestamp_pb2 import Timestamp

from events_server.consumer import JsonlSink, Message
from events_server.pb import events_pb2 as pb
from events_server.wire.codec import envelope_to_dict
from tests.harness.data import ev


def message(n: int) -> Message:
    """A message whose event's url says n."""
    envelope = pb.Envelope(
        event=ev(url=f"https://shop.example/{n}"),
        received_at=Timestamp(seconds=1_700_000_000 + n),
        client_ip="10.0.0.1",
    )
    return Message(partition=n % 4, entry_id=f"{n}-0", envelope=envelope, deliveries=1)


def lines(directory: Path, pattern: str = "*.jsonl") -> list[dict[str, object]]:
    """Every JSON line of the matching files, file by file in name order."""
    found = []
    for path in sorted(directory.glob(pattern)):
        text = path.read_text()
        assert text.endswith("\n")
        found += [json.loads(line) for line in text.splitlines()]
    return found


def test_a_line_is_what_tail_prints(tmp_path: Path) -> None:
    sink = JsonlSink(tmp_path, "c1")
    sink.write(message(7))
    sink.close()
    [line] = lines(tmp_path)
    assert line == {"partition": 3, "entry_id": "7-0", **envelope_to_dict(message(7).envelope)}
    assert line["event"] == {
        "tenant": "shop-a",
        "market": "us",
        "type": "add_to_cart",
        "user_id": "user-1",
        "url": "https://shop.example/7",
    }


def test_files_rotate_by_size_and_are_completed_on_close(tmp_path: Path) -> None:
    sink = JsonlSink(tmp_path, "c1", max_bytes=1000)
    for n in range(20):
        sink.write(message(n))
    assert len(list(tmp_path.glob("*.jsonl.open"))) == 1  # the one being written
    sink.close()
    assert list(tmp_path.glob("*.jsonl.open")) == []
    files = sorted(tmp_path.glob("c1-*.jsonl"))
    assert len(files) > 2
    assert all(f.stat().st_size < 1000 + 400 for f in files)  # at most one line past the limit
    assert [line["entry_id"] for line in lines(tmp_path)] == [f"{n}-0" for n in range(20)]


def test_files_rotate_by_age(tmp_path: Path) -> None:
    sink = JsonlSink(tmp_path, "c1", max_seconds=0.0)
    for n in range(3):
        sink.write(message(n))
    sink.close()
    assert len(list(tmp_path.glob("*.jsonl"))) == 3


def test_a_crashed_file_is_cut_to_its_last_whole_line_and_completed(tmp_path: Path) -> None:
    whole = json.dumps({"partition": 0, "entry_id": "1-0"}) + "\n"
    (tmp_path / "c1-20250101T000000000000Z.jsonl.open").write_text(whole + '{"partition": 0, "ent')
    (tmp_path / "c1-20250101T000001000000Z.jsonl.open").write_text('{"partial')
    other = tmp_path / "c1-b-20250101T000000000000Z.jsonl.open"  # consumer "c1-b", alive
    other.write_text('{"theirs')

    JsonlSink(tmp_path, "c1").close()

    assert (tmp_path / "c1-20250101T000000000000Z.jsonl").read_text() == whole
    assert not (tmp_path / "c1-20250101T000001000000Z.jsonl.open").exists()
    assert not (tmp_path / "c1-20250101T000001000000Z.jsonl").exists()
    assert other.read_text() == '{"theirs'
