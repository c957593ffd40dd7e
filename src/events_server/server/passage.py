"""One request on its way through the server (``Passage``), and what it carries in: the
client's address, its kind, the WebSocket frame id that is its retry identity."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Protocol

from google.protobuf.timestamp_pb2 import Timestamp

from events_server.pb import events_pb2 as pb
from events_server.queue.keys import KeySpace
from events_server.server.auth import Caller
from events_server.server.errors import IngestError, InvalidEvents
from events_server.server.limits import Charge
from events_server.server.store import Item
from events_server.wire.metadata import MD_FORWARDED_FOR, MD_WS_MESSAGE_ID
from events_server.wire.violations import FieldViolation

CREATE_EVENTS = pb.REQUEST_KIND_CREATE_EVENTS
TRACK = pb.REQUEST_KIND_TRACK
METHODS: dict[int, str] = {CREATE_EVENTS: "CreateEvents", TRACK: "Track"}
"""The EventsService method a request of each kind is (or stands for, when gathered)."""

NO_EVENTS = pb.CreateEventsRequest()
"""A passage's request until it is parsed."""

WS_DEDUP_PREFIX = "ws:"
"""Frame ids dedup in their own namespace: a client's deduplication_id never meets one."""

MAX_RETRY_ID_CHARS = 256


class Prepared(Protocol):
    """A parsed and valid request of one kind, ready to be checked for tenants and queued."""

    def tenants(self) -> Iterable[str]:
        """The tenant of each event, in order."""

    def tenant_field(self, index: int) -> str:
        """Where event ``index`` names its tenant (for a refusal)."""

    def items(self, shared: bytes, keys: KeySpace, partitions: int) -> list[Item]:
        """What to queue: each event's partition, dedup key and envelope (``shared``: the
        rest of the envelope, serialized)."""


def check_retry_id(retry_id: str, events: int) -> None:
    """A WebSocket frame id names one event, and is short (it becomes part of a Redis key)."""
    if events != 1:
        raise InvalidEvents(
            [
                FieldViolation(
                    "events",
                    f"a call with {MD_WS_MESSAGE_ID} carries one event, not {events}",
                    "ws_one_event",
                )
            ]
        )
    if not retry_id or len(retry_id) > MAX_RETRY_ID_CHARS:
        raise InvalidEvents(
            [
                FieldViolation(
                    "id",
                    f"the frame id must be 1 to {MAX_RETRY_ID_CHARS} characters long,"
                    f" not {len(retry_id)}",
                    "ws_id_length",
                )
            ]
        )


def client_ip(metadata: dict[str, str], peer: str, forwarded_hops: int) -> str:
    """The client address: from x-forwarded-for, skipping trusted proxies, else the peer."""
    forwarded = metadata.get(MD_FORWARDED_FOR, "")
    if "," not in forwarded and (one := forwarded.strip()):
        return one  # one hop (the bridge's usual): the client's, whatever is trusted
    chain = [hop.strip() for hop in forwarded.split(",") if hop.strip()]
    if chain:
        # Only the right end of the chain was written by proxies we trust; anything
        # further left came from the client and could be forged.
        return chain[max(len(chain) - 1 - forwarded_hops, 0)]
    # grpc peers look like "ipv4:10.0.0.1:5000", "ipv6:[::1]:5000", "unix:/path".
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rpartition(":")[0]
    if kind == "ipv6":
        return rest.rpartition(":")[0].strip("[]")
    return rest or peer


class Passage:
    """One request on its way through the server: a CreateEvents or Track call, or one
    sub-request of the bridge's gathered call. Each step fills in what it learnt; ``error``
    ends it."""

    __slots__ = (
        "caller",
        "charge",
        "client_ip",
        "error",
        "items",
        "kind",
        "metadata",
        "peer",
        "raw",
        "received_at",
        "reply",
        "request",
        "request_id",
        "retry_id",
    )

    def __init__(
        self,
        raw: bytes,
        metadata: dict[str, str],
        peer: str,
        retry_id: str | None,
        *,
        received_at: Timestamp | None = None,
        kind: int = CREATE_EVENTS,
    ) -> None:
        self.raw = raw
        self.metadata = metadata
        self.peer = peer
        self.retry_id = retry_id
        """The WebSocket frame id, for an event without a deduplication_id."""
        self.kind = kind
        """What ``raw`` holds: a CreateEventsRequest (CREATE_EVENTS) or a TrackRequest (TRACK);
        any other value is refused once the caller is admitted."""
        if received_at is None:
            received_at = Timestamp()
            received_at.FromNanoseconds(time.time_ns())
        self.received_at = received_at
        """When the server received it (the call that carried it)."""
        self.request: pb.CreateEventsRequest | pb.TrackRequest = NO_EVENTS
        self.request_id: str | None = None
        """Its request id, once checked (gathered sub-requests: see ``gathered``)."""
        self.client_ip = ""
        """The client's address (see ``client_ip``), once admitted."""
        self.caller: Caller | None = None
        self.items: list[Item] = []
        self.reply: pb.CreateEventsResponse | None = None
        self.error: IngestError | None = None
        self.charge: Charge | None = None
        """Its rate charge, when taken in its write's own script (see ``plan_charge``)."""

    @property
    def method(self) -> str:
        """The EventsService method it is (or stands for)."""
        return METHODS.get(self.kind, "CreateEvents")

    @property
    def parsed(self) -> bool:
        """Whether its request was parsed (so its events can be counted)."""
        return self.request is not NO_EVENTS

    def fail(self, error: IngestError) -> None:
        """End the request with ``error``.

        Kept without its traceback: the traceback holds the frames that hold this passage,
        a reference cycle only a full collection frees, and a flood of refusals (held up
        to a second each, so they outlive the young generations) made those collections
        stall every call for tens of ms.
        """
        self.error = error.with_traceback(None)
