"""Import boundaries: each role loads only what it needs, checked in a fresh interpreter."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

SERVER_SIDE = ("events_server.server", "events_server.cli", "events_server.consumer")
THIRD_PARTY_SERVER = ("redis", "hiredis", "pydantic_settings", "fastapi", "uvicorn")


def loaded_after(statement: str) -> set[str]:
    """The modules a fresh interpreter holds after running ``statement``."""
    probe = f"{statement}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    return set(json.loads(out))


def under(modules: set[str], *roots: str) -> list[str]:
    return sorted(m for m in modules if any(m == r or m.startswith(r + ".") for r in roots))


def test_the_client_loads_no_redis_web_framework_or_server_module() -> None:
    modules = loaded_after("import events_server.client")
    assert under(modules, *THIRD_PARTY_SERVER, *SERVER_SIDE, "events_server.queue") == []
    assert "events_server.client.aio" in modules  # the probe really imported it


def test_the_bridge_loads_no_server_module() -> None:
    modules = loaded_after("import rest_bridge.app")
    assert under(modules, *SERVER_SIDE, "events_server.queue", "redis", "hiredis") == []
    assert "rest_bridge.routes.v2" in modules


def test_the_consumer_loads_no_web_framework_or_grpc_server_module() -> None:
    modules = loaded_after("import events_server.consumer")
    assert under(modules, "fastapi", "uvicorn", "starlette", "grpc", "events_server.server") == []
    assert "events_server.consumer.consumer" in modules


@pytest.mark.parametrize("package", ["events_server.client", "events_server.consumer"])
def test_public_packages_export_what_they_declare(package: str) -> None:
    module = __import__(package, fromlist=["__all__"])
    assert module.__all__, package
    for name in module.__all__:
        assert hasattr(module, name), f"{package}.{name}"


def test_wire_imports_only_protobuf_and_the_standard_library() -> None:
    modules = loaded_after(
        "import events_server.wire.codec, events_server.wire.metadata, events_server.wire.origins,"
        " events_server.wire.rejected, events_server.wire.validation, events_server.wire.violations"
    )
    allowed = (
        "events_server.wire",
        "events_server.pb",
        "google.protobuf",
        "google.rpc",
        "google._upb",  # protobuf's C implementation
    )
    foreign = [
        m
        for m in modules
        if m.split(".")[0] not in sys.stdlib_module_names
        and m not in ("events_server", "google", "__main__")
        and not under({m}, *allowed)
        and not m.startswith("_")
    ]
    assert foreign == []
