"""The bridge's OpenAPI is the two contracts, field by field, descriptions included: v1
(POST /create-events) and Depict's v2 spec (POST /v2/create-events, POST /v2/track)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from rest_bridge.app import create_app
from rest_bridge.config import BridgeSettings

ROOT = Path(__file__).parents[2]
CONTRACT = ROOT / "contract" / "create-events.openapi.yaml"
SHARED = ROOT.parent / "shared" / "contract" / "create-events.openapi.yaml"
CONTRACT_V2 = ROOT / "contract" / "create-events-v2.openapi.yaml"
SHARED_V2 = ROOT.parent / "shared" / "contract" / "create-events-v2.openapi.yaml"


@pytest.fixture(scope="module")
def contract() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(CONTRACT.read_text())
    return loaded


@pytest.fixture(scope="module")
def contract_v2() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(CONTRACT_V2.read_text())
    return loaded


@pytest.fixture(scope="module")
def ours() -> dict[str, Any]:
    return create_app(BridgeSettings()).openapi()


def test_operation_equals_the_contract(contract: dict[str, Any], ours: dict[str, Any]) -> None:
    assert ours["paths"]["/create-events"]["post"] == contract["paths"]["/create-events"]["post"]


@pytest.mark.parametrize("name", ["Event", "EEventType", "HTTPValidationError", "ValidationError"])
def test_schema_equals_the_contract(
    contract: dict[str, Any], ours: dict[str, Any], name: str
) -> None:
    assert ours["components"]["schemas"][name] == contract["components"]["schemas"][name]


@pytest.mark.parametrize("path", ["/v2/create-events", "/v2/track"])
def test_v2_operation_equals_the_spec(
    contract_v2: dict[str, Any], ours: dict[str, Any], path: str
) -> None:
    assert ours["paths"][path] == contract_v2["paths"][path]


def test_v2_schemas_equal_the_spec(contract_v2: dict[str, Any], ours: dict[str, Any]) -> None:
    for name, schema in contract_v2["components"]["schemas"].items():
        assert ours["components"]["schemas"][name] == schema, name
    assert ours["components"]["securitySchemes"] == contract_v2["components"]["securitySchemes"]


def test_whole_document_equals_the_two_contracts_but_the_title(
    contract: dict[str, Any], contract_v2: dict[str, Any], ours: dict[str, Any]
) -> None:
    expected = {k: v for k, v in contract.items() if v != []}  # `servers: []` = no servers
    expected["info"] = {**contract["info"], "title": ours["info"]["title"]}
    # The two share HTTPValidationError, ValidationError and the security schemes, equal
    # in both files (checked here by the merge: a name in both must not change).
    schemas = {**contract["components"]["schemas"], **contract_v2["components"]["schemas"]}
    for name in contract["components"]["schemas"].keys() & contract_v2["components"]["schemas"]:
        assert contract["components"]["schemas"][name] == schemas[name], name
    expected["paths"] = {**contract["paths"], **contract_v2["paths"]}
    expected["components"] = {**contract["components"], "schemas": schemas}
    assert ours == expected


@pytest.mark.parametrize(("copy", "shared"), [(CONTRACT, SHARED), (CONTRACT_V2, SHARED_V2)])
def test_the_copy_in_the_repo_is_the_shared_contract(copy: Path, shared: Path) -> None:
    if not shared.exists():
        pytest.skip("no ../shared checkout beside this repo (a user's clone)")
    assert copy.read_bytes() == shared.read_bytes()
