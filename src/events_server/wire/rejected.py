"""The caps of a rejected-request record, which the server and the bridge both apply."""

from __future__ import annotations

from collections.abc import Iterable

PAYLOAD_LIMIT = 4096
"""Bytes of a rejected request's payload kept in its record."""

MAX_TENANTS = 4
"""Tenants one rejected request is recorded for: a request naming more is rarely honest."""

MAX_ERRORS = 50
"""Errors kept per record (a request of 10,000 bad events would otherwise fill it)."""

MAX_ERROR_CHARS = 500
"""Characters kept of each error's field, description and reason."""

MAX_ERRORS_BYTES = 4096
"""Bytes of errors (as JSON) kept per record: with the payload, a record stays under ~8 KiB,
so a stream's bytes are bounded by its record count."""

MAX_RECORD_BYTES = PAYLOAD_LIMIT + MAX_ERRORS_BYTES + 512
"""The most one record takes (payload, errors, and the small fields)."""

MAX_IN_FLIGHT = 64
"""Records being written at once; past that, new ones are dropped (and logged)."""

MAX_TENANT_CHARS = 256


def tenants_of(names: Iterable[object]) -> list[str]:
    """The distinct tenant names worth a record, in order, at most MAX_TENANTS."""
    found: list[str] = []
    for name in names:
        if not isinstance(name, str) or not name or len(name) > MAX_TENANT_CHARS:
            continue
        try:
            name.encode()
        except UnicodeEncodeError:  # a lone surrogate from JSON: not a name we can store
            continue
        if name not in found:
            found.append(name)
            if len(found) == MAX_TENANTS:
                break
    return found
