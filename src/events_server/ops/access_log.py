"""Access lines: written through the configured handlers, at a fraction of the generic cost.

Both processes write one access line per request. Through ``Logger.log`` each costs a
``LogRecord`` built from scratch (the clock, the caller's frame, the thread and process
names) and, in ``JsonFormatter``, a scan of its twenty standard attributes for the extra
ones: most of a line's cost, and the same for every line. ``AccessLog.write`` copies a
record made once (per process) instead and hands it to ``Logger.handle``, so the logger's
filters, its handlers and theirs, the levels and the propagation to the root all hold as
configured; ``JsonFormatter`` knows such a record's extra fields come after the standard
ones and reads only those. What a handler gets differs only in the record's origin
(``pathname``, ``lineno``, ``funcName``: this module's, not the caller's), and a record
factory set with ``logging.setLogRecordFactory`` is not asked for these records.

Successful lines can be sampled (``access_log_sample``, both processes): refusals and
errors are always written.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

SAMPLE_SCALE = 1_000_000
"""The sample's resolution: a share is kept as millionths."""


class AccessRecord(logging.LogRecord):
    """A record copied from a template: its standard attributes first, then its fields."""


class Sampler:
    """Keeps an evenly spaced share of what it is asked about, the first one included.

    A counter, not a random draw: cheap, and the same sequence every time (at 0.25 the
    1st, 5th, 9th... successful line is written).
    """

    def __init__(self, share: float) -> None:
        self._step = round(share * SAMPLE_SCALE)
        self._credit = SAMPLE_SCALE - self._step

    def keep(self) -> bool:
        """Whether to keep this one."""
        if not self._step:
            return False
        self._credit += self._step
        if self._credit >= SAMPLE_SCALE:
            self._credit -= SAMPLE_SCALE
            return True
        return False


class AccessLog:
    """The access lines of one logger: which to write, and writing them."""

    def __init__(self, name: str, sample: float) -> None:
        self.logger = logging.getLogger(name)
        self._sampler = Sampler(sample)
        self._template: dict[str, Any] = {}
        self._pid = -1
        self._started = 0.0  # when logging was loaded, which relativeCreated counts from

    def wanted(self, level: int, ok: bool) -> bool:
        """Whether the line of a request is written at ``level``: every refusal and error
        (``ok`` False), and the sample's share of the successful ones."""
        return self.logger.isEnabledFor(level) and (not ok or self._sampler.keep())

    def write(self, level: int, msg: str, fields: dict[str, Any]) -> None:
        """Hand one line to the logger's handlers: ``msg`` (already formatted) and its fields.

        The caller asked ``wanted`` first; the fields' names must not be a LogRecord's own.
        """
        now = time.time()
        record = AccessRecord.__new__(AccessRecord)
        attrs = record.__dict__
        attrs.update(self._base())
        attrs["msg"] = msg
        attrs["levelno"] = level
        attrs["levelname"] = logging.getLevelName(level)
        attrs["created"] = now
        attrs["msecs"] = int((now - int(now)) * 1000) + 0.0
        attrs["relativeCreated"] = (now - self._started) * 1000
        attrs.update(fields)
        self.logger.handle(record)

    def _base(self) -> dict[str, Any]:
        """The standard attributes every line of this process shares (made again after a
        fork: the process id and name change)."""
        if (pid := os.getpid()) != self._pid:
            base = logging.LogRecord(self.logger.name, logging.INFO, __file__, 0, "", None, None)
            base.funcName = "write"
            self._template, self._pid = vars(base), pid
            self._started = base.created - base.relativeCreated / 1000
        return self._template
