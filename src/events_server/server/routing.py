"""Which partition stream an event goes to."""

from __future__ import annotations

import random
import zlib

from events_server.pb import events_pb2 as pb
from events_server.wire.tracked import USER_FIELDS, TrackedKind


def _hashed(tenant: str, value: str, partitions: int) -> int:
    return zlib.crc32(f"{tenant}\x00{value}".encode()) % partitions


def partition_for(event: pb.Event, partitions: int, *, fallback: str | None = None) -> int:
    """Stable partition of an event: same tenant and user (or session, ...) -> same stream.

    ``fallback`` routes an event that names none of those (its retry identity), so that
    every resend of it meets the first copy's dedup key.
    """
    for name in ("user_id", "session_id", "dsid", "deduplication_id"):
        if event.HasField(name):
            routing = f"{event.tenant}\x00{getattr(event, name)}".encode()
            return zlib.crc32(routing) % partitions
    if fallback is not None:
        return _hashed(event.tenant, fallback, partitions)
    # Nothing to keep in order and no id to find again: spread the load.
    return random.randrange(partitions)


def partition_for_tracked(
    message: TrackedKind, partitions: int, *, fallback: str | None = None
) -> int:
    """Stable partition of a v2 event.

    A purchase or a transaction mapping goes by its transaction id: its dedup key (one
    purchase per (tenant, transaction_id)) must live in the partition's hash slot, and
    only the transaction is the same in every copy of an order: the thank-you page's
    beacon may name a dsid, the shop's server a user id. So an order is queued once
    whoever resends it, and its mapping lands beside it; it is not ordered with its
    shopper's other events (consumers have its received_at).

    An unavailable product goes as an Event does: its user (or session, or dsid) first,
    so that a shopper's reports stay in one stream, in order; else its deduplication_id,
    else ``fallback`` (its retry identity), else anywhere.
    """
    tenant = message.tenant
    if not isinstance(message, pb.ProductUnavailable):
        return _hashed(tenant, message.transaction_id, partitions)
    for name in USER_FIELDS:
        if message.HasField(name):  # type: ignore[arg-type]
            return _hashed(tenant, getattr(message, name), partitions)
    if message.HasField("deduplication_id"):
        return _hashed(tenant, message.deduplication_id, partitions)
    if fallback is not None:
        return _hashed(tenant, fallback, partitions)
    return random.randrange(partitions)
