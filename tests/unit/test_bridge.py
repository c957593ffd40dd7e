"""The bridge's pieces without a server: keys, headers, status codes, inflating, JSON depth."""

from __future__ import annotations

import subprocess
import sys
import tracemalloc
from typing import Any

import grpc
import pydantic
import pytest

from rest_bridge.body import BodyRefused, Inflater
from rest_bridge.config import MIN_JSON_DEPTH, BridgeSettings
from rest_bridge.credentials import KeySource, api_key
from rest_bridge.errors import HTTP_STATUS
from rest_bridge.models import Event
from rest_bridge.upstream import metadata_value
from tests.harness.data import contract_examples
from tests.harness.web import bomb


def test_contract_has_an_example_per_documented_type() -> None:
    examples = contract_examples()
    assert [e[0]["type"] for e in examples] == [
        "page_view",
        "click",
        "add_to_cart",
        "purchase",
        "element_visible",
    ]


def test_header_values_gRPC_cannot_carry_are_escaped_not_fatal() -> None:
    assert metadata_value("Mozilla/5.0") == "Mozilla/5.0"
    assert metadata_value("caf\xc3\xa9 100%") == "caf%C3%A9 100%25"
    assert metadata_value("x" * 5000) == "x" * 2048


@pytest.mark.parametrize(
    ("headers", "query", "expected"),
    [
        (
            {b"x-api-key": b"from-header", b"cookie": b"X-API-KEY=from-cookie"},
            b"api_key=q",
            ("from-header", KeySource.HEADER),
        ),
        (
            {b"cookie": b"X-API-KEY=from-cookie"},
            b"x=1&api_key=from-query",
            ("from-query", KeySource.QUERY),
        ),
        (
            {b"cookie": b"theme=dark; X-API-KEY=from-cookie"},
            b"",
            ("from-cookie", KeySource.COOKIE),
        ),
        ({}, b"api_key=", (None, None)),
        ({b"cookie": b"s,=1; X-API-KEY=k"}, b"", (None, None)),  # CookieError inside
    ],
)
def test_api_key_precedence_is_header_then_query_then_cookie(
    headers: dict[bytes, bytes], query: bytes, expected: tuple[str | None, KeySource | None]
) -> None:
    assert api_key(headers, query) == expected


def test_every_grpc_code_maps_to_http_as_the_design_says() -> None:
    assert set(HTTP_STATUS) == set(grpc.StatusCode)
    assert HTTP_STATUS[grpc.StatusCode.INVALID_ARGUMENT] == 422
    assert HTTP_STATUS[grpc.StatusCode.UNAVAILABLE] == 503
    assert HTTP_STATUS[grpc.StatusCode.UNAUTHENTICATED] == 401
    assert HTTP_STATUS[grpc.StatusCode.PERMISSION_DENIED] == 403
    assert HTTP_STATUS[grpc.StatusCode.DEADLINE_EXCEEDED] == 504


# --- bodies ---------------------------------------------------------------------------


def inflate(payload: bytes, limit: int, piece: int = 16 * 1024) -> bytes:
    """Inflate in pieces, as a server receives a body."""
    inflater = Inflater(limit)
    for start in range(0, len(payload), piece):
        inflater.feed(payload[start : start + piece])
    return inflater.finish()


def test_inflating_a_bomb_never_holds_more_than_the_limit() -> None:
    limit = 1024 * 1024
    payload = bomb(50 * limit)
    tracemalloc.start()
    try:
        with pytest.raises(BodyRefused) as refused:
            inflate(payload, limit)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert refused.value.reply.status == 413
    # Inflating all of it would take 50 MiB; what is held stays near the limit.
    assert peak < limit * 3 // 2, f"peak {peak} bytes"


@pytest.mark.parametrize("piece", [1, 7, 1 << 20], ids=["byte-by-byte", "7-bytes", "whole"])
def test_inflating_in_any_pieces_gives_the_body_up_to_exactly_the_limit(piece: int) -> None:
    limit = 1024 * 1024
    # Zeros inflate ~1000x: one small piece of input yields many steps of output.
    assert inflate(bomb(limit), limit, piece) == b"\0" * limit
    with pytest.raises(BodyRefused) as refused:
        inflate(bomb(limit + 1), limit, piece)
    assert refused.value.reply.status == 413


def schema_depth(schema: dict[str, Any], defs: dict[str, Any]) -> int:
    """How deep JSON valid under ``schema`` can nest arrays and objects."""
    if "$ref" in schema:
        return schema_depth(defs[schema["$ref"].rsplit("/", 1)[-1]], defs)
    branches = [*schema.get("anyOf", ()), *schema.get("allOf", ())]
    if branches:
        return max(schema_depth(branch, defs) for branch in branches)
    kind = schema.get("type")
    if kind == "array":
        return 1 + schema_depth(schema.get("items", {}), defs)
    if kind == "object":
        children = [*schema.get("properties", {}).values()]
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            children.append(extra)
        return 1 + max((schema_depth(c, defs) for c in children), default=0)
    return 0


def test_a_valid_body_nests_exactly_the_minimum_depth() -> None:
    # Why depth is only checked when validation fails: what validates is this shallow.
    schema = pydantic.TypeAdapter(list[Event]).json_schema()
    assert schema_depth(schema, schema.get("$defs", {})) == MIN_JSON_DEPTH == 3


def test_websockets_may_not_take_every_connection() -> None:
    with pytest.raises(pydantic.ValidationError, match="ws_max_connections"):
        BridgeSettings(max_connections=100, ws_max_connections=100)


def test_the_websocket_cap_falls_with_the_open_file_limit_in_proportion() -> None:
    # A process of its own: the limit is the process's, as under a real deployment's.
    code = (
        "import resource\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))\n"
        "from rest_bridge.config import BridgeSettings\n"
        "from rest_bridge.connections import connection_cap, ws_connection_cap\n"
        "s = BridgeSettings(max_connections=4096, ws_max_connections=3072)\n"
        "print(connection_cap(s.max_connections), ws_connection_cap(s))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    # 1,024 descriptors less 128 kept back; WebSockets keep their three quarters of it.
    assert out.split() == ["896", "672"]
