"""The bridge's OpenAPI is the contract, field by field, descriptions included."""

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


@pytest.fixture(scope="module")
def contract() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(CONTRACT.read_text())
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


def test_whole_document_equals_the_contract_but_the_title(
    contract: dict[str, Any], ours: dict[str, Any]
) -> None:
    expected = {k: v for k, v in contract.items() if v != []}  # `servers: []` = no servers
    expected["info"] = {**contract["info"], "title": ours["info"]["title"]}
    assert ours == expected


def test_the_copy_in_the_repo_is_the_shared_contract() -> None:
    if not SHARED.exists():
        pytest.skip("no ../shared checkout beside this repo (a user's clone)")
    assert CONTRACT.read_bytes() == SHARED.read_bytes()
