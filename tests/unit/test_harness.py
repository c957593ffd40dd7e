"""The harness's own logic (the consumer order check), and where each kind of test lives."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.harness.consumers import out_of_order


def test_the_order_check_counts_a_skip_but_not_a_replay() -> None:
    queued = {(0, "1-0"), (0, "2-0"), (0, "3-0"), (1, "1-0")}
    replay = [(1, 0, "1-0", 1), (2, 0, "2-0", 1), (3, 0, "1-0", 2), (4, 0, "2-0", 2)]
    assert out_of_order([*replay, (5, 1, "1-0", 1), (6, 0, "3-0", 1)], queued) == 0
    skip = [(1, 0, "1-0", 1), (2, 0, "3-0", 1), (3, 0, "2-0", 1)]
    assert out_of_order(skip, queued) == 1


TESTS = Path(__file__).parents[1]


def marked_slow() -> dict[str, bool]:
    """Every test function under tests/ (folder/module.py::name): whether it is marked slow."""
    found = {}
    for path in sorted(TESTS.rglob("test_*.py")):
        tree = ast.parse(path.read_text())
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
                slow = "pytest.mark.slow" in map(ast.unparse, node.decorator_list)
                found[f"{path.relative_to(TESTS)}::{node.name}"] = slow
    return found


def test_the_slow_tests_are_the_reliability_tests_and_no_others() -> None:
    found = marked_slow()
    assert sum(found.values()) >= 10  # what `make test-reliability` runs
    misplaced = [name for name, slow in found.items() if slow != name.startswith("reliability/")]
    assert misplaced == []
