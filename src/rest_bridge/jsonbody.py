"""A request body's JSON as FastAPI parses it, and the bridge's bounds on it (both contracts).

FastAPI parses a JSON body with the stdlib parser and answers what it refuses with a
422; the bridge does the same (rest_bridge.validation, rest_bridge.validation_v2), with
bounds FastAPI lacks: nesting past ``max_json_depth``, more than
``max_events_per_request`` events, invalid UTF-8 named where it is.
"""

from __future__ import annotations

import json
from typing import Any

from rest_bridge.errors import invalid_body, json_invalid, unprocessable
from rest_bridge.responses import Reply


def parse_json(body: bytes, max_depth: int, **hooks: Any) -> Any:
    """The body as Python values as FastAPI parses it, or a 422 Reply when it does not parse
    (its depth is left to the caller: see nests_deeper). ``hooks``: json.loads's."""
    try:
        value = json.loads(body, **hooks)
    except json.JSONDecodeError as error:
        return unprocessable(json_invalid(error.pos, error.msg))
    except UnicodeDecodeError as error:
        # FastAPI answers 400 "There was an error parsing the body", a status the
        # contract does not have, naming nothing. JSON must be UTF-8: say where it is not.
        return invalid_body(
            ["body", error.start], "JSON decode error: invalid UTF-8", "json_invalid"
        )
    except RecursionError:
        # The parser gives up near 1000 levels, far past any allowed max_depth.
        return too_deep(max_depth)
    except ValueError as error:
        # Python refuses to convert integers of over 4300 digits (a guard against
        # quadratic parsing); FastAPI would answer that 400 too.
        return invalid_body(["body"], f"JSON decode error: {error}", "json_invalid")
    return value


def too_deep(max_depth: int) -> Reply:
    """The 422 of a body nested past ``max_depth``."""
    return invalid_body(
        ["body"],
        f"JSON is nested deeper than the limit of {max_depth} levels of arrays and objects"
        " (max_json_depth)",
        "json_too_deep",
    )


def nests_deeper(value: Any, limit: int) -> bool:
    """Whether arrays and objects nest more than ``limit`` deep (a loop: no recursion)."""
    stack = [(value, 1)] if isinstance(value, list | dict) else []
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        children = item.values() if isinstance(item, dict) else item
        stack.extend((child, depth + 1) for child in children if isinstance(child, list | dict))
    return False


def too_many_events(count: int, max_events: int, loc: tuple[str, ...] = ("body",)) -> Reply:
    """The server's own refusal of a request of more than ``max_events`` events."""
    return invalid_body(
        list(loc),
        f"the request has {count} events; at most {max_events} are allowed"
        " (max_events_per_request)",
        "too_many_events",
    )
