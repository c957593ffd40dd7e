"""Origins.Admit: whether a caller is known, asked by the REST bridge before it reads a body.

A request's body is the costly part of it (a 1 MiB body is read, inflated, parsed and
validated on the bridge before the server learns there is no key behind it), so the
bridge asks first, from the headers alone, and keeps the answers that let a caller in
(rest_bridge.admission). The server answers as CreateEvents would admit the same call
(``Authenticator.admit``: the key, checked against the page origin; keyless, the page's
storefront origin), but stricter on one point: a keyless origin that is not registered is
refused here, PERMISSION_DENIED, where CreateEvents lets it in to refuse each event by its
tenant. Nothing is parsed, charged or written, and a refusal costs what an unknown key
costs CreateEvents (the client address's unknown-key allowance, see ``strangers``).
"""

from __future__ import annotations

import grpc

from events_server.pb import events_pb2 as pb
from events_server.server.auth import Authenticator
from events_server.server.errors import AuthError, IngestError, PermissionDenied
from events_server.server.metrics import ServerMetrics
from events_server.server.passage import client_ip
from events_server.server.service import OriginsService
from events_server.server.status import call_metadata, grpc_status, refuse
from events_server.wire.metadata import MD_API_KEY, MD_ORIGIN


class AdmittingOrigins(OriginsService):
    """The Origins service: Check (CORS, see ``OriginsService``) and Admit."""

    def __init__(self, auth: Authenticator, metrics: ServerMetrics, forwarded_hops: int) -> None:
        super().__init__(auth)
        self._metrics = metrics
        self._hops = forwarded_hops

    async def Admit(
        self, request: pb.AdmitRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.AdmitResponse:
        metadata = call_metadata(context)
        try:
            caller = await self._auth.admit(
                metadata.get(MD_API_KEY),
                metadata.get(MD_ORIGIN),
                client_ip(metadata, context.peer(), self._hops),
            )
            front = caller.storefront
            if front is not None and not front.tenants:
                raise PermissionDenied(
                    f"storefront origin {front.origin!r} is not registered for any tenant"
                    " (events-server storefronts add), and the request carries no API key;"
                    " nothing was queued",
                    "origin_not_registered",
                )
        except IngestError as error:
            if isinstance(error, AuthError):
                self._metrics.auth_failure(error.kind)
            # Set, not raised: a flood of refusals must leave no reference cycles behind
            # (see status.refuse).
            refuse(context, *grpc_status(error))
        return pb.AdmitResponse()
