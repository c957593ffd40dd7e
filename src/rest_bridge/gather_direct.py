"""A bridge the server does not take for the bridge: one plain call per request, for a while.

The server refuses the gathered calls and the gathered stream of a caller it does not
recognise as the bridge (its EVENTS_BRIDGE_TOKEN or certificate missing on one side), before
reading a byte of them. Such a bridge is then served as any direct caller is: one
CreateEvents (or Track) call per request, whose forwarded client context the server
ignores, for DIRECT_SECONDS, with a warning; then it tries gathering again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import grpc

from events_server.pb import events_pb2 as pb
from events_server.pb import events_pb2_grpc
from events_server.wire.metadata import MD_WS_MESSAGE_ID
from rest_bridge.gather_batch import Metadata

log = logging.getLogger("rest_bridge.gather")


NOT_THE_BRIDGE = "is for the REST bridge only"
"""What the server's refusal of a caller it does not take for the bridge says."""

DIRECT_SECONDS = 30.0
"""How long a bridge the server does not recognise sends plain CreateEvents calls before it
tries a gathered call again."""


def not_the_bridge(error: grpc.aio.AioRpcError) -> bool:
    """Whether the server refused a gathered call as not from the bridge."""
    return error.code() == grpc.StatusCode.PERMISSION_DENIED and NOT_THE_BRIDGE in (
        error.details() or ""
    )


class DirectCalls:
    """Plain calls, one per request, while the server does not take this for the bridge."""

    def __init__(
        self, direct: Callable[[], events_pb2_grpc.EventsServiceAsyncStub], timeout: float
    ) -> None:
        self._direct = direct
        self._timeout = timeout
        self.until = 0.0
        """Until when (loop time) requests go as plain calls."""

    def refused(self, error: grpc.aio.AioRpcError) -> None:
        """The server refused a gathered call as not from the bridge: plain calls for now."""
        now = asyncio.get_running_loop().time()
        if self.until <= now:
            log.warning(
                "the events-server does not take this process for the REST bridge"
                " (%s): sending one call per request (CreateEvents or Track), whose"
                " forwarded client context it ignores, for %g s; give both the same"
                " EVENTS_BRIDGE_TOKEN or this bridge a client certificate",
                error.details(),
                DIRECT_SECONDS,
            )
        self.until = now + DIRECT_SECONDS

    async def call(
        self,
        request: pb.CreateEventsRequest | pb.TrackRequest,
        metadata: Metadata,
        ws_message_id: str | None,
    ) -> pb.CreateEventsResponse:
        """One request's own call."""
        if ws_message_id is not None:
            metadata = (*metadata, (MD_WS_MESSAGE_ID, ws_message_id))
        response: pb.CreateEventsResponse
        if isinstance(request, pb.TrackRequest):
            response = await self._direct().Track(request, timeout=self._timeout, metadata=metadata)
        else:
            response = await self._direct().CreateEvents(
                request, timeout=self._timeout, metadata=metadata
            )
        return response

    async def answer(
        self,
        request: pb.CreateEventsRequest | pb.TrackRequest,
        metadata: Metadata,
        ws_message_id: str | None,
        future: asyncio.Future[pb.CreateEventsResponse],
    ) -> None:
        """Answer a request that was to be gathered with a call of its own."""
        try:
            response = await self.call(request, metadata, ws_message_id)
        except grpc.aio.AioRpcError as error:
            if not future.done():
                future.set_exception(error)
        else:
            if not future.done():
                future.set_result(response)
