"""Import boundaries: each role loads only what it needs, checked in a fresh interpreter."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

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
        " events_server.wire.rejected, events_server.wire.validation,"
        " events_server.wire.violations, events_server.wire.tracked,"
        " events_server.wire.track_validation"
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


# --- no import cycles ----------------------------------------------------------------

SRC = Path(__file__).parents[2] / "src"


def import_graph(package: str) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (anywhere in it, TYPE_CHECKING blocks and
    function bodies included: a cycle hidden in a function is still a cycle)."""
    root = SRC / package
    modules = {
        ".".join(path.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__"): path
        for path in root.rglob("*.py")
        if "pb" not in path.relative_to(root).parts
    }
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from package import module` imports the module (the package's own
                # __init__ runs first for any of its modules: that is no edge of its own).
                named = {f"{node.module}.{alias.name}" for alias in node.names}
                found.update(named)
                if not named <= modules.keys():
                    found.add(node.module)
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected set of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in graph[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_cycle_check_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize("package", ["events_server", "rest_bridge"])
def test_no_module_imports_one_that_imports_it_back(package: str) -> None:
    graph = import_graph(package)
    assert f"{package}.client.aio" in graph or package != "events_server"
    assert cycles(graph) == []
