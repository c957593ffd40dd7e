"""POST /create-events: the v1 contract (contract/create-events.openapi.yaml), a JSON array of
``Event``, validated as FastAPI validates it (rest_bridge.validation) and sent as CreateEvents."""

from __future__ import annotations

from typing import Any

from events_server.pb import events_pb2 as pb
from events_server.wire.rejected import tenants_of
from rest_bridge.offload import Rules
from rest_bridge.responses import Reply
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

    async def handle(
        self, scope: dict[str, Any], headers: dict[bytes, bytes], key: str | None, body: bytes
    ) -> Reply:
        request = await self.parse(body, RULES, key, headers)
        if isinstance(request, Reply):
            return request
        return await self.forward(
            self._gatherer.create_events,
            request,
            lambda: self.tenants(request),
            scope,
            headers,
            key,
            body,
        )
