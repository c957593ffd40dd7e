"""Realistic events (~600 bytes of JSON each) in every wire form the benchmark sends.

30% of events carry a deduplication_id, and 5% of those repeat an earlier one,
as retries do. Bodies are assembled from precomputed fragments, so the load
generator spends its CPU on sending, not on building payloads.
"""

from __future__ import annotations

import json
import random
from collections import deque
from dataclasses import dataclass

from events_server.pb import events_pb2 as pb
from events_server.wire.codec import event_from_dict, length_delimited

POOL_SIZE = 1000
DEDUP_SHARE = 0.30
REPEAT_SHARE = 0.05

TENANTS = ["my_store", "shop_eu", "shop_us", "outlet"]
"""The stores the load writes to (the benchmark's key covers them)."""

TYPES = [
    "page_view",
    "click",
    "add_to_cart",
    "purchase",
    "element_visible",
    "ws_click",
    "recommendations_inserted",
]


DEDUP_FIELD = pb.Event.DESCRIPTOR.fields_by_name["deduplication_id"].number
EVENTS_FIELD = pb.CreateEventsRequest.DESCRIPTOR.fields_by_name["events"].number


def sample_event(rng: random.Random) -> dict[str, object]:
    """One realistic event as the contract's JSON object (no deduplication_id)."""
    user = f"GA1.2.{rng.randrange(10**9):09d}.{rng.randrange(10**10):010d}"
    sku = f"{rng.randrange(10**6):06d}"
    return {
        "tenant": rng.choice(TENANTS),
        "market": rng.choice(["us", "se", "de", "gb"]),
        "type": rng.choice(TYPES),
        "user_id": user,
        "session_id": f"{rng.getrandbits(64):016x}",
        "url": f"https://my_store.com/collections/keyboards/products/mechanical-{sku}?variant=red",
        "product_id": f"BLA-KEY-{sku}",
        "variant_ids": [f"{sku}-red", f"{sku}-blue", f"{sku}-black"],
        "entity_identifiers": {"sku": sku, "gtin": f"{rng.randrange(10**13):013d}"},
        "entity_price": f"{rng.randrange(10, 500)}.00",
        "currency": "USD",
        "document_referrer": "https://www.google.com/search?q=mechanical+keyboard+red+switches",
        "document_width": rng.choice(["1280", "1440", "390"]),
        "recommendation_id": f"{rng.getrandbits(128):032x}",
        "page_url": f"https://my_store.com/products/mechanical-{sku}",
    }


@dataclass
class Batches:
    """Generates request bodies for one load-generator process."""

    seed: int
    worker: int

    def __post_init__(self) -> None:
        rng = random.Random(self.seed)
        self._rng = rng
        events = [sample_event(rng) for _ in range(POOL_SIZE)]
        self.json_events = [json.dumps(e, separators=(",", ":")).encode() for e in events]
        self.proto_events = [event_from_dict(e) for e in events]
        self.proto_bytes = [e.SerializeToString() for e in self.proto_events]
        self._next = 0
        self._counter = 0
        self._recent: deque[bytes] = deque(maxlen=1000)

    def _dedup_ids(self, n: int) -> list[bytes | None]:
        ids: list[bytes | None] = []
        for _ in range(n):
            if self._rng.random() >= DEDUP_SHARE:
                ids.append(None)
            elif self._recent and self._rng.random() < REPEAT_SHARE:
                ids.append(self._rng.choice(self._recent))
            else:
                self._counter += 1
                fresh = f"w{self.worker}-{self.seed}-{self._counter}".encode()
                self._recent.append(fresh)
                ids.append(fresh)
        return ids

    def _indexes(self, n: int) -> list[int]:
        start = self._next
        self._next = (start + n) % POOL_SIZE
        return [(start + i) % POOL_SIZE for i in range(n)]

    def json_body(self, n: int) -> bytes:
        """A JSON array of n events for POST /create-events."""
        parts = []
        for index, dedup in zip(self._indexes(n), self._dedup_ids(n), strict=True):
            event = self.json_events[index]
            if dedup is not None:
                event = event[:-1] + b',"deduplication_id":"' + dedup + b'"}'
            parts.append(event)
        return b"[" + b",".join(parts) + b"]"

    def ws_frame(self) -> tuple[str, bytes]:
        """A WebSocket frame as Depict's client sends it: a fresh id and one event (no
        deduplication_id: the server deduplicates a frame's event on its id)."""
        (index,) = self._indexes(1)
        self._counter += 1
        frame_id = f"w{self.worker}-{self.seed}-f{self._counter}"
        return frame_id, b'{"id":"' + frame_id.encode() + b'","event":' + self.json_events[
            index
        ] + b"}"

    def grpc_body(self, n: int) -> bytes:
        """A serialized CreateEventsRequest of n events."""
        parts = []
        for index, dedup in zip(self._indexes(n), self._dedup_ids(n), strict=True):
            event = self.proto_bytes[index]
            if dedup is not None:
                # Appended fields merge into the message: no re-serializing.
                event += length_delimited(DEDUP_FIELD, dedup)
            parts.append(length_delimited(EVENTS_FIELD, event))
        return b"".join(parts)

    def script_items(self, n: int) -> list[tuple[int, bytes | None]]:
        """(pool index, deduplication_id) pairs for driving the Redis script directly."""
        return list(zip(self._indexes(n), self._dedup_ids(n), strict=True))
