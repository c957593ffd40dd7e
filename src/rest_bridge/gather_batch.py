"""A gathered batch's waiters: what each request waits on while it is queued or out, and
how the server's answer to the batch reaches each of them (rest_bridge.gather)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import grpc

from events_server.pb import events_pb2 as pb
from rest_bridge.gather_stream import status_error

Metadata = tuple[tuple[str, str], ...]


@dataclass(slots=True, eq=False)
class Out:
    """A gathered call in flight."""

    started: float
    """When it was sent (loop time)."""
    over: bool = False


@dataclass(slots=True, eq=False)
class Pending:
    """One request waiting for its answer. Its SubRequest is built in place, in the call
    that carries it (a SubRequest built here and copied into the call cost ~1.5 µs more)."""

    request: pb.CreateEventsRequest | pb.TrackRequest
    metadata: Metadata
    raw: bytes
    """``request`` serialized: the SubRequest's ``request``."""
    kind: int
    ws_message_id: str | None
    size: int
    deadline: float
    future: asyncio.Future[pb.CreateEventsResponse] = field(repr=False)
    queued_at: float = 0.0


def _sub_error(response: pb.SubResponse) -> grpc.aio.AioRpcError:
    """A refused sub-request as the error its own CreateEvents call would have raised."""
    return status_error(response.code, response.details, response.trailers)


def _refuse(future: asyncio.Future[pb.CreateEventsResponse], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)


def answer(
    batch: list[Pending], reply: pb.GatheredResponse, loop: asyncio.AbstractEventLoop
) -> None:
    """Each waiter of ``batch`` gets its own answer from the server's ``reply``."""
    for pending, response in zip(batch, reply.responses, strict=False):
        if pending.future.done():
            continue
        if response.code == 0:
            pending.future.set_result(response.response)
        elif response.hold_seconds > 0:
            # Held as the server would have held a call of its own (a rate-limited
            # request), this request alone: the others of the call are answered now.
            refusal = _sub_error(response)
            loop.call_later(response.hold_seconds, _refuse, pending.future, refusal)
        else:
            pending.future.set_exception(_sub_error(response))
    for pending in batch[len(reply.responses) :]:  # not reached: the server answers each
        if not pending.future.done():
            pending.future.set_exception(
                grpc.aio.AioRpcError(grpc.StatusCode.INTERNAL, details="no answer")
            )


def ignore(future: asyncio.Future[pb.CreateEventsResponse]) -> None:
    if not future.cancelled():
        future.exception()  # retrieved: no "never retrieved" warning
