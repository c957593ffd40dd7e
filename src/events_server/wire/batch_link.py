"""The batch link's frames: what the bridge and the server agree on (see BatchLinkOffer).

The bridge's gathered batches are most of what crosses between the two processes, and
grpc.aio's machinery (its poller thread, HTTP/2 framing, a wake-up of each loop per
message) cost more than the batch's own work here: a StreamGathered batch of 8 single
events ~0.25 ms of CPU in each process, measured at C1@16. So, where gRPC is plaintext
anyway, the same GatheredRequest / GatheredResponse messages go as frames on a plain TCP
connection: a 4-byte big-endian length, then the message.

The connection is opened with a ticket the server handed out on a BridgeIngest call (so
only a caller the access interceptor took for the bridge gets one): the first frame is
the ticket, and the server answers it with ``ACCEPTED`` (an empty GatheredResponse)
before any batch is sent. Everything else is what StreamGathered does: batches named by
``call_id``, answers that may pass each other, a whole-batch failure as the answer's
status, ``draining`` when the server stops.
"""

from __future__ import annotations

import struct

HEADER = struct.Struct(">I")
"""Every frame: its length, then that many bytes."""

TICKET_BYTES = 32

TICKET_SECONDS = 10.0
"""A ticket not used within this is void (the bridge connects at once)."""

HANDSHAKE_SECONDS = 2.0
"""A connection that has not sent a good ticket within this is closed."""

MAX_ANSWER_BYTES = 64 * 1024 * 1024
"""Largest answer frame the bridge reads (a batch's answers are far smaller)."""

ACCEPTED = b"\x00\x00\x00\x00"
"""The server's answer to a good ticket: an empty frame (an empty GatheredResponse)."""


def frame(payload: bytes) -> bytes:
    """``payload`` as one frame."""
    return HEADER.pack(len(payload)) + payload
