"""A consumer handler that writes envelopes to rotating JSON Lines files.

Each line is what ``events-server tail`` prints: the partition, the entry id, and
the envelope in JSON. A file is written as ``<name>-<utc time>.jsonl.open`` and renamed
to ``.jsonl`` once complete (rotated or closed), so a reader picking up ``*.jsonl``
never sees a half-written file. After a crash, the next start with the same name
cuts the leftover ``.open`` file back to its last whole line and completes it.

Lines are flushed to the OS before the entry is acknowledged (``fsync=True`` also
forces them to disk). Delivery is at least once: after a crash a line may appear
again; ``(partition, entry_id)`` identifies it.
"""

from __future__ import annotations

import json
import os
import re
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

from events_server.consumer.message import Message
from events_server.wire.codec import envelope_to_dict

OPEN_SUFFIX = ".jsonl.open"
DONE_SUFFIX = ".jsonl"
STAMP = re.compile(r"\d{8}T\d{12}Z")


class JsonlSink:
    """Writes each message as one JSON line; a new file every max_bytes or max_seconds."""

    def __init__(
        self,
        directory: Path,
        name: str,
        *,
        max_bytes: int = 64 * 1024 * 1024,
        max_seconds: float = 3600.0,
        fsync: bool = False,
    ) -> None:
        if "/" in name or not name:
            raise ValueError(f"not a file name prefix: {name!r}")
        self.directory = directory
        self.name = name
        self.max_bytes = max_bytes
        self.max_seconds = max_seconds
        self.fsync = fsync
        self._file: TextIO | None = None
        self._path: Path | None = None
        self._opened_at = 0.0
        self._size = 0
        directory.mkdir(parents=True, exist_ok=True)
        self._recover()

    async def __call__(self, message: Message) -> None:
        """The consumer handler: write the line (the consumer acknowledges after)."""
        self.write(message)

    def write(self, message: Message) -> None:
        """Append one message as a JSON line, rotating first if the file is full or old."""
        line = {"partition": message.partition, "entry_id": message.entry_id}
        line.update(envelope_to_dict(message.envelope))
        data = json.dumps(line, ensure_ascii=False) + "\n"
        if self._file is not None and (
            self._size >= self.max_bytes or time.monotonic() - self._opened_at >= self.max_seconds
        ):
            self._complete()
        out = self._file if self._file is not None else self._open()
        out.write(data)
        out.flush()
        if self.fsync:
            os.fsync(out.fileno())
        self._size += len(data.encode())

    def close(self) -> None:
        """Complete the current file."""
        if self._file is not None:
            self._complete()

    def _open(self) -> TextIO:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        self._path = self.directory / f"{self.name}-{stamp}{OPEN_SUFFIX}"
        self._file = self._path.open("x", encoding="utf-8")
        self._opened_at = time.monotonic()
        self._size = 0
        return self._file

    def _complete(self) -> None:
        assert self._file is not None
        assert self._path is not None
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        _finish(self._path)
        self._file = self._path = None

    def _recover(self) -> None:
        for path in sorted(self.directory.glob(f"{self.name}-*{OPEN_SUFFIX}")):
            stamp = path.name[len(self.name) + 1 : -len(OPEN_SUFFIX)]
            if not STAMP.fullmatch(stamp):
                continue  # another consumer's, whose name starts with ours
            data = path.read_bytes()
            whole = data[: data.rfind(b"\n") + 1]  # a crash may have cut the last line
            if len(whole) != len(data):
                with path.open("r+b") as file:
                    file.truncate(len(whole))
            if whole:
                _finish(path)
            else:
                path.unlink()


def _finish(path: Path) -> None:
    path.rename(path.with_name(path.name.removesuffix(OPEN_SUFFIX) + DONE_SUFFIX))
