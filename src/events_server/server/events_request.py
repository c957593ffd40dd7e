"""A CreateEvents request made ready to queue: parsed, valid, and its items."""

from __future__ import annotations

from collections.abc import Iterable

from events_server.queue.keys import KeySpace
from events_server.server.passage import WS_DEDUP_PREFIX, Passage, check_retry_id
from events_server.server.routing import partition_for
from events_server.server.store import Item
from events_server.server.validation import parse_request, validate_events
from events_server.wire.codec import envelope_bytes
from events_server.wire.validation import Limits


class PreparedEvents:
    """A valid CreateEventsRequest and its events serialized (see ``passage.Prepared``)."""

    __slots__ = ("events", "retry_id", "serialized")

    def __init__(self, passage: Passage, limits: Limits) -> None:
        """Parse and validate the passage's request (raises InvalidEvents)."""
        request = passage.request = parse_request(passage.raw, limits)
        self.events = request.events
        self.serialized = validate_events(self.events, limits)
        self.retry_id = passage.retry_id
        if self.retry_id is not None:
            check_retry_id(self.retry_id, len(self.events))

    def tenants(self) -> Iterable[str]:
        return (event.tenant for event in self.events)

    def tenant_field(self, index: int) -> str:
        return f"events[{index}].tenant"

    def items(self, shared: bytes, keys: KeySpace, partitions: int) -> list[Item]:
        retry_id = self.retry_id
        if retry_id is None:
            return [
                (
                    (partition := partition_for(event, partitions)),
                    keys.dedup(partition, event.tenant, event.deduplication_id)
                    if event.HasField("deduplication_id")
                    else None,
                    envelope_bytes(data, shared),
                )
                for event, data in zip(self.events, self.serialized, strict=True)
            ]
        # A WebSocket frame's resends carry its id: an event without a deduplication_id
        # is deduplicated on it, and routed by it, so a resend meets its first copy.
        (event,), (data,) = self.events, self.serialized
        dedup_id = (
            event.deduplication_id
            if event.HasField("deduplication_id")
            else WS_DEDUP_PREFIX + retry_id
        )
        partition = partition_for(event, partitions, fallback=dedup_id)
        return [
            (partition, keys.dedup(partition, event.tenant, dedup_id), envelope_bytes(data, shared))
        ]
