"""Arbitrary requests to the session's servers: hypothesis' settings for them, and each gRPC
answer held to what its events are."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import grpc
from hypothesis import HealthCheck, settings

from events_server.pb import events_pb2 as pb


def fuzz_settings(max_examples: int) -> settings:
    """Hypothesis' settings for ``max_examples`` requests to the session's servers."""
    return settings(
        max_examples=max_examples,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )


def judged_call(
    method: Callable[..., pb.CreateEventsResponse],
    request: pb.CreateEventsRequest | pb.TrackRequest,
    every_valid: bool,
    ours: bool,
    seen: Counter[str],
) -> pb.CreateEventsResponse | grpc.RpcError | None:
    """Call ``method`` (CreateEvents or Track) with ``request`` and hold the answer to its
    events: OK, a result an event, only when every event is valid and ``ours``;
    PERMISSION_DENIED only when every event is valid and not ``ours``; else
    INVALID_ARGUMENT. Counts each code in ``seen``.

    Returns the reply of an OK, the error of an INVALID_ARGUMENT, None for a
    PERMISSION_DENIED.
    """
    failed: Any = None
    try:
        reply = method(request, timeout=10)
    except grpc.RpcError as error:
        failed = error
    if failed is None:
        seen["OK"] += 1
        assert every_valid
        assert ours
        assert len(reply.results) == len(request.events)
        return reply
    code = failed.code()
    seen[code.name] += 1
    if code == grpc.StatusCode.PERMISSION_DENIED:  # valid, but another store's
        assert every_valid
        assert not ours
        return None
    assert code == grpc.StatusCode.INVALID_ARGUMENT, failed
    assert not every_valid
    refusal: grpc.RpcError = failed
    return refusal
