"""A Track request (Depict's v2 kinds) made ready to queue: parsed, valid, and its items.

What makes a resend a duplicate: a purchase's (tenant, transaction_id), a transaction
mapping's (tenant, transaction_id) apart from purchases, an unavailable product's
deduplication_id (or, sent over the bridge's WebSocket, its frame id) as an Event's.
"""

from __future__ import annotations

from collections.abc import Iterable

from events_server.pb import events_pb2 as pb
from events_server.queue.keys import KeySpace
from events_server.server.errors import InvalidEvents
from events_server.server.passage import WS_DEDUP_PREFIX, Passage, check_retry_id
from events_server.server.routing import partition_for_tracked
from events_server.server.store import Item
from events_server.server.validation import parse, too_many
from events_server.wire.codec import envelope_bytes
from events_server.wire.track_validation import tracked_violations
from events_server.wire.tracked import ENVELOPE_FIELDS, TrackedKind
from events_server.wire.validation import Limits


class PreparedTrack:
    """A valid TrackRequest: each event's kind, message and serialized message (what the
    envelope holds); see ``passage.Prepared``."""

    __slots__ = ("kinds", "messages", "retry_id", "serialized")

    def __init__(self, passage: Passage, limits: Limits) -> None:
        """Parse and validate the passage's request (raises InvalidEvents)."""
        request = passage.request = parse(passage.raw, limits, pb.TrackRequest, pb.TrackedEvent)
        events = request.events
        if len(events) > limits.max_events_per_request:
            raise too_many(len(events), limits)
        self.kinds: list[str] = []
        self.messages: list[TrackedKind] = []
        self.serialized: list[bytes] = []
        found = []
        for index, event in enumerate(events):
            kind = event.WhichOneof("kind")
            message: TrackedKind = getattr(event, kind) if kind is not None else pb.Purchase()
            data = message.SerializeToString()
            found.extend(tracked_violations(index, event, limits, len(data)))
            self.kinds.append(kind or "")
            self.messages.append(message)
            self.serialized.append(data)
        if found:
            raise InvalidEvents(found)
        self.retry_id = passage.retry_id
        if self.retry_id is not None:
            check_retry_id(self.retry_id, len(events))

    def tenants(self) -> Iterable[str]:
        return (message.tenant for message in self.messages)

    def tenant_field(self, index: int) -> str:
        return f"events[{index}].{self.kinds[index]}.tenant"

    def items(self, shared: bytes, keys: KeySpace, partitions: int) -> list[Item]:
        return [
            self._item(kind, message, data, shared=shared, keys=keys, partitions=partitions)
            for kind, message, data in zip(self.kinds, self.messages, self.serialized, strict=True)
        ]

    def _item(
        self,
        kind: str,
        message: TrackedKind,
        data: bytes,
        *,
        shared: bytes,
        keys: KeySpace,
        partitions: int,
    ) -> Item:
        tenant = message.tenant
        envelope = envelope_bytes(data, shared, ENVELOPE_FIELDS[kind])
        if not isinstance(message, pb.ProductUnavailable):
            # Its transaction is its identity: one purchase (one mapping) per transaction.
            partition = partition_for_tracked(message, partitions)
            return (
                partition,
                keys.transaction(partition, tenant, kind, message.transaction_id),
                envelope,
            )
        # As an Event's: its deduplication_id, else the WebSocket frame it came in, if any.
        dedup_id: str | None = None
        if message.HasField("deduplication_id"):
            dedup_id = message.deduplication_id
        elif self.retry_id is not None:
            dedup_id = WS_DEDUP_PREFIX + self.retry_id
        partition = partition_for_tracked(message, partitions, fallback=dedup_id)
        key = None if dedup_id is None else keys.dedup(partition, tenant, dedup_id)
        return partition, key, envelope
