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
    """Stable partition of a v2 event, as of an Event: its user (or session, or dsid) first,
    so that a shopper's events of every kind stay in one stream, in order; else its identity
    (a transaction id, an unavailable product's deduplication_id), else ``fallback``.

    Its dedup key lives in that partition: a resend that names another user (or names one
    where the first copy named none) lands elsewhere and is not recognised as a resend.
    """
    tenant = message.tenant
    for name in USER_FIELDS:
        if message.HasField(name):  # type: ignore[arg-type]
            return _hashed(tenant, getattr(message, name), partitions)
    if isinstance(message, pb.ProductUnavailable):
        if message.HasField("deduplication_id"):
            return _hashed(tenant, message.deduplication_id, partitions)
    else:
        return _hashed(tenant, message.transaction_id, partitions)
    if fallback is not None:
        return _hashed(tenant, fallback, partitions)
    return random.randrange(partitions)
