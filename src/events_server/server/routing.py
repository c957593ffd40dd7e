"""Which partition stream an event goes to."""

from __future__ import annotations

import random
import zlib

from events_server.pb import events_pb2 as pb


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
        return zlib.crc32(f"{event.tenant}\x00{fallback}".encode()) % partitions
    # Nothing to keep in order and no id to find again: spread the load.
    return random.randrange(partitions)
