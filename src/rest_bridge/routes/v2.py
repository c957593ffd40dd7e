"""POST /v2/create-events and POST /v2/track (deprecated, the same body): Depict's v2 contract
(contract/create-events-v2.openapi.yaml), a ``TrackV2Request`` of purchases, transaction
mappings and unavailable products, validated as FastAPI validates it
(rest_bridge.validation_v2) and sent as Track. The body's tenant and market go into each
event; the 200 answers each event as POST /create-events does."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any

from events_server.pb import events_pb2 as pb
from events_server.wire.rejected import tenants_of
from rest_bridge.errors import v2_field_loc
from rest_bridge.gather_batch import Metadata
from rest_bridge.offload import Rules
from rest_bridge.routes.steps import JsonPost
from rest_bridge.validation_v2 import track_in_worker, validate_track

CREATE_EVENTS_PATH = "/v2/create-events"
TRACK_PATH = "/v2/track"
PATHS = (CREATE_EVENTS_PATH, TRACK_PATH)

RULES: Rules[pb.TrackRequest] = Rules(
    inline=validate_track, in_worker=track_in_worker, decode=pb.TrackRequest.FromString
)


def _tenant(event: pb.TrackedEvent) -> str:
    kind = event.WhichOneof("kind")
    return getattr(event, kind).tenant if kind else ""


class Track(JsonPost):
    """The ASGI app of POST /v2/create-events and POST /v2/track."""

    locate = staticmethod(v2_field_loc)

    rules = RULES

    def tenants(self, request: Any) -> list[str]:
        return tenants_of([_tenant(e) for e in request.events])

    def call(self, request: Any, metadata: Metadata) -> Awaitable[pb.CreateEventsResponse]:
        return self._gatherer.track(request, metadata)
