"""Events of an exact serialized size, for testing the size limits at their edges."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from events_server.pb import events_pb2 as pb
from events_server.server.app import EventsServer
from events_server.server.settings import Settings
from events_server.wire.codec import varint
from tests.support import LoopThread, started_server


def event_of_size(size: int, longest: int, **fields: object) -> pb.Event:
    """A valid event of exactly ``size`` protobuf bytes, none of its strings over ``longest``.

    ``variant_ids`` items make up the size: each costs a tag byte, its length and itself.
    """
    base: dict[str, object] = {"tenant": "t", "market": "us", "type": pb.EVENT_TYPE_CLICK}
    event = pb.Event(**{**base, **fields})  # type: ignore[arg-type]
    while (missing := size - event.ByteSize()) > 0:
        if missing == 1:
            raise ValueError(f"no item adds exactly 1 byte (event is {event.ByteSize()} bytes)")
        # The longest item that fills the gap exactly or leaves room for another (>= 2 bytes).
        length = min(longest, missing - 2)
        while (left := missing - (1 + len(varint(length)) + length)) != 0 and left < 2:
            length -= 1
        event.variant_ids.append("v" * length)
    if event.ByteSize() != size:
        raise ValueError(f"cannot make an event of {size} bytes from {fields}")
    return event


def request_size(events: list[pb.Event]) -> int:
    """Bytes of the CreateEventsRequest carrying ``events``."""
    return pb.CreateEventsRequest(events=events).ByteSize()


@contextlib.contextmanager
def server_with(
    loop: LoopThread, settings: Settings, **limits: int
) -> Iterator[tuple[EventsServer, int]]:
    """A started events-server of the session's settings but ``limits``, and its port."""
    # Built anew, not model_copy(): the settings' validators must see the new values.
    limited = Settings(**{**settings.model_dump(), **limits})
    server, port = loop.run(started_server(limited))
    try:
        yield server, port
    finally:
        loop.run(server.stop(0))
