"""POST /create-events: the v1 contract (contract/create-events.openapi.yaml), a JSON array of
``Event``, validated as FastAPI validates it (rest_bridge.validation) and sent as CreateEvents."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any

from events_server.pb import events_pb2 as pb
from events_server.wire.rejected import tenants_of
from rest_bridge.gather_batch import Metadata
from rest_bridge.offload import Rules
from rest_bridge.routes.steps import JsonPost
from rest_bridge.validation import (
    decode_events,
    events_in_worker,
    quick_events,
    validate_request,
)

PATH = "/create-events"

RULES: Rules[pb.CreateEventsRequest] = Rules(
    inline=validate_request, in_worker=events_in_worker, decode=decode_events, quick=quick_events
)


class CreateEvents(JsonPost):
    """The ASGI app of POST /create-events."""

    rules = RULES

    def tenants(self, request: Any) -> list[str]:
        return tenants_of([e.tenant for e in request.events])

    def call(self, request: Any, metadata: Metadata) -> Awaitable[pb.CreateEventsResponse]:
        return self._gatherer.create_events(request, metadata)
