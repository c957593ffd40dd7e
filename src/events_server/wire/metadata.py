"""Every gRPC metadata key and service name that the processes agree on.

The REST bridge forwards what it knows of the browser's request grpc-gateway style.
gRPC overwrites a forwarded ``user-agent`` with its own, hence the prefixed names.
"""

from __future__ import annotations

import itertools
import os

from events_server.pb import events_pb2

MD_API_KEY = "x-api-key"
"""The gRPC metadata that carries the key (the REST bridge forwards it there)."""

REQUEST_ID_HEADER = "x-request-id"
"""HTTP header and gRPC metadata key of the request id."""

MD_USER_AGENT = "grpcgateway-user-agent"
MD_REFERER = "grpcgateway-referer"
MD_FORWARDED_FOR = "x-forwarded-for"
MD_FORWARDED_HOST = "x-forwarded-host"
MD_ORIGIN = "grpcgateway-origin"
"""The browser page's Origin, forwarded by the bridge."""

MD_WS_MESSAGE_ID = "x-ws-message-id"
"""The id of the WebSocket frame a one-event call carries: an event without a
deduplication_id is deduplicated on it (per tenant), so the client's resends of that
frame are queued once."""

FORWARDED_METADATA = frozenset(
    {MD_FORWARDED_FOR, MD_USER_AGENT, MD_REFERER, MD_FORWARDED_HOST, MD_ORIGIN, MD_WS_MESSAGE_ID}
)
"""What the bridge says on a browser's behalf: believed from the bridge alone (the server
drops it from any other caller, see ``events_server.server.identity``)."""

MD_BRIDGE_TOKEN = "x-events-bridge-token"
"""The shared bridge credential (``EVENTS_BRIDGE_TOKEN``), sent by the bridge on every call."""

MD_RETRY_AFTER = "retry-after"
"""Trailing metadata of a RESOURCE_EXHAUSTED refusal: seconds until a retry may pass
(the bridge's Retry-After)."""

_SERVICES = events_pb2.DESCRIPTOR.services_by_name
SERVICE_NAME = _SERVICES["EventsService"].full_name
REJECTED_SERVICE_NAME = _SERVICES["RejectedEvents"].full_name
ORIGINS_SERVICE_NAME = _SERVICES["Origins"].full_name
BRIDGE_INGEST_SERVICE_NAME = _SERVICES["BridgeIngest"].full_name
GATHERED_METHOD = f"/{BRIDGE_INGEST_SERVICE_NAME}/CreateEventsGathered"
"""The REST bridge's gathered calls (internal: only the bridge may make them)."""
GATHERED_STREAM_METHOD = f"/{BRIDGE_INGEST_SERVICE_NAME}/StreamGathered"
"""The same calls as batches on one long-lived stream per bridge channel (bridge only)."""
BATCH_LINK_METHOD = f"/{BRIDGE_INGEST_SERVICE_NAME}/OpenBatchLink"
"""A ticket for the server's batch link (events_server.wire.batch_link; bridge only)."""
ADMIT_METHOD = f"/{ORIGINS_SERVICE_NAME}/Admit"
"""Whether a caller is known, asked by the REST bridge before it reads a request's body."""


def new_request_id() -> str:
    """A fresh request id: 32 hex digits, as a uuid4's hex, from a random prefix of this
    process's and a counter (uuid4 reads the OS's randomness for each: a system call per
    request, ~5% of the bridge's work on a beacon)."""
    return f"{_ids.prefix}{next(_ids.counter):016x}"


class _Ids:
    """This process's request id prefix and counter (new ones in a forked child: workers
    must not repeat each other's ids)."""

    def __init__(self) -> None:
        self.prefix = ""
        self.counter = itertools.count()
        self.reseed()

    def reseed(self) -> None:
        self.prefix = os.urandom(8).hex()
        self.counter = itertools.count()


_ids = _Ids()
os.register_at_fork(after_in_child=_ids.reseed)
