"""The access-line writer: the sample's sequence, lines as Logger.log would write them, and
the operator's logging configuration (filters, formatters, levels) still in force."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from events_server.ops.access_log import AccessLog, Sampler
from events_server.ops.logs import JsonFormatter, request_id
from events_server.ops.settings import ACCESS_LOG_SAMPLE
from events_server.server.settings import Settings
from rest_bridge.config import BridgeSettings

FIELDS = {
    "method": "POST",
    "path": "/create-events",
    "status": 200,
    "duration_ms": 1.25,
    "client_ip": "203.0.113.0",
    "query": "api_key=[REDACTED]",
}


def kept(share: float, asked: int) -> list[int]:
    sampler = Sampler(share)
    return [n for n in range(1, asked + 1) if sampler.keep()]


def test_the_sample_keeps_an_evenly_spaced_share_from_the_first() -> None:
    assert kept(1.0, 5) == [1, 2, 3, 4, 5]
    assert kept(0.0, 1000) == []
    assert kept(0.25, 12) == [1, 5, 9]
    assert kept(0.01, 250) == [1, 101, 201]
    assert len(kept(1 / 3, 3000)) == 1000
    assert len(kept(0.001, 10_000)) == 10


def test_both_processes_default_to_the_same_sample() -> None:
    assert Settings().access_log_sample == BridgeSettings().access_log_sample == ACCESS_LOG_SAMPLE


@pytest.fixture
def logger() -> Iterator[logging.Logger]:
    """A logger of the test's own, at INFO, with no handlers yet."""
    logger = logging.getLogger("test_access_log.lines")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    yield logger
    logger.handlers.clear()
    logger.filters.clear()


def capture(logger: logging.Logger, formatter: logging.Formatter) -> io.StringIO:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter)
    logger.addHandler(handler)
    return out


def test_a_line_is_what_logger_log_writes(logger: logging.Logger) -> None:
    out = capture(logger, JsonFormatter())
    token = request_id.set("req-7")
    try:
        logger.info("%s %s %d", "POST", "/create-events", 200, extra=FIELDS)
        AccessLog(logger.name, 1.0).write(logging.INFO, "POST /create-events 200", FIELDS)
    finally:
        request_id.reset(token)
    generic, written = out.getvalue().splitlines()
    # Byte for byte but the time, in the same order.
    assert generic.split('"level"', 1)[1] == written.split('"level"', 1)[1]
    line = json.loads(written)
    assert list(line) == ["ts", "level", "logger", "msg", "request_id", *FIELDS]
    assert line["msg"] == "POST /create-events 200"
    assert line["ts"].endswith("+00:00")


def test_the_operators_filters_formatters_and_levels_hold(logger: logging.Logger) -> None:
    class Hide(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            record.client_ip = "hidden"  # as a filter may rewrite a field
            record.extra_note = "added"  # or add one
            return getattr(record, "status", 0) != 204  # or drop a line

    logger.addFilter(Hide())
    json_out = capture(logger, JsonFormatter())
    plain_out = capture(
        logger, logging.Formatter("%(levelname)s %(name)s %(message)s status=%(status)s")
    )
    warnings = capture(logger, JsonFormatter())
    logger.handlers[-1].setLevel(logging.WARNING)
    access = AccessLog(logger.name, 1.0)
    access.write(logging.INFO, "POST /create-events 200", FIELDS)
    access.write(logging.INFO, "POST /create-events 204", {**FIELDS, "status": 204})
    access.write(logging.WARNING, "POST /create-events 503", {**FIELDS, "status": 503})
    lines = [json.loads(x) for x in json_out.getvalue().splitlines()]
    assert [x["status"] for x in lines] == [200, 503]
    assert {x["client_ip"] for x in lines} == {"hidden"}
    assert {x["extra_note"] for x in lines} == {"added"}
    assert plain_out.getvalue().splitlines() == [
        f"INFO {logger.name} POST /create-events 200 status=200",
        f"WARNING {logger.name} POST /create-events 503 status=503",
    ]
    assert [json.loads(x)["status"] for x in warnings.getvalue().splitlines()] == [503]


def test_a_level_the_logger_does_not_log_uses_up_no_sample(logger: logging.Logger) -> None:
    access = AccessLog(logger.name, 0.5)
    assert not access.wanted(logging.DEBUG, ok=True)
    assert not access.wanted(logging.DEBUG, ok=False)
    # The first successful line at INFO is still the sample's first.
    assert [access.wanted(logging.INFO, ok=True) for _ in range(4)] == [True, False, True, False]
    assert access.wanted(logging.INFO, ok=False)  # refusals and errors: always
