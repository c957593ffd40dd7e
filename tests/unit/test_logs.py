"""Structured logs, piece by piece: JSON lines, request ids, client IPs, redacted keys."""

from __future__ import annotations

import io
import json
import logging
from typing import Any

import pytest

from events_server.ops.logs import (
    JsonFormatter,
    accept_request_id,
    client_ip_for_log,
    request_id,
    setup_logging,
)
from rest_bridge.access import redact_query


def test_json_lines_carry_the_request_id_and_extra_fields() -> None:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("test_logs.json")
    logger.addHandler(handler)
    logger.propagate = False
    token = request_id.set("req-1")
    try:
        logger.warning("hello %s", "world", extra={"status": 200, "path": "/x"})
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("failed")
    finally:
        request_id.reset(token)
        logger.removeHandler(handler)
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert first["msg"] == "hello world"
    assert first["level"] == "WARNING"
    assert first["logger"] == "test_logs.json"
    assert (first["request_id"], first["status"], first["path"]) == ("req-1", 200, "/x")
    assert first["ts"].endswith("+00:00")
    assert "ValueError: boom" in second["exc"]


def test_setup_logging_makes_every_logger_write_json() -> None:
    out = io.StringIO()
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    try:
        setup_logging("INFO", out)
        logging.getLogger("test_logs.library").info("started")
        logging.getLogger("test_logs.library").debug("not at INFO")
        # uvicorn's own handlers would print a second, plain copy of its lines.
        assert not logging.getLogger("uvicorn.error").handlers
    finally:
        root.handlers[:], root.level = saved[0], saved[1]
    [line] = out.getvalue().splitlines()
    assert json.loads(line)["msg"] == "started"


@pytest.mark.parametrize(
    ("ip", "mode", "shown"),
    [
        ("203.0.113.77", "full", "203.0.113.77"),
        ("203.0.113.77", "truncated", "203.0.113.0"),
        ("2001:db8:1234:5678::1", "truncated", "2001:db8:1234::"),
        ("::ffff:203.0.113.77", "truncated", "203.0.113.0"),
        ("203.0.113.77", "none", ""),
        ("/run/events.sock", "truncated", ""),
    ],
)
def test_client_ips_can_be_truncated(ip: str, mode: Any, shown: str) -> None:
    assert client_ip_for_log(ip, mode) == shown


@pytest.mark.parametrize(
    ("query", "logged"),
    [
        ("api_key=s3cret", "api_key=[REDACTED]"),
        ("a=1&api_key=s3cret&b=2", "a=1&api_key=[REDACTED]&b=2"),
        ("api%5Fkey=s3cret", "api%5Fkey=[REDACTED]"),  # what Starlette reads as api_key
        ("API_KEY=s3cret&X-API-KEY=s3cret", "API_KEY=[REDACTED]&X-API-KEY=[REDACTED]"),
        ("api_key", "api_key=[REDACTED]"),
        ("q=api_key&page=2", "q=api_key&page=2"),
    ],
)
def test_keys_are_redacted_from_query_strings(query: str, logged: str) -> None:
    assert redact_query(query) == logged


def test_only_sane_request_ids_are_taken_from_callers() -> None:
    assert accept_request_id("req-42.a:b_c") == "req-42.a:b_c"
    for bad in (None, "", "has space", "x" * 129, "line\nbreak", "ключ"):
        fresh = accept_request_id(bad)
        assert fresh != bad
        assert len(fresh) == 32
