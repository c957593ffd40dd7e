"""BridgeIngest.CreateEventsGathered: the REST bridge's requests, several to a call.

The bridge sends what arrived while its previous calls were out in one call (group
commit, rest_bridge.gather). Each sub-request takes the steps a call of its own takes (a
CreateEvents call, or a Track call by its kind; ``EventsService``: admit its key or
storefront origin, parse, validate, check its tenants, charge its rate) and gets the
status and per-event results that call would end with; what they queue is written by one
store append (one pipeline of per-partition scripts for all of them). A sub-request's
refusal touches no other. The same calls come as batches on the bridge's stream too
(``gathered_stream``): both are worked by ``serve``.

Only the bridge may call it (``identity.BRIDGE_ONLY_METHODS``: its mTLS certificate, its
EVENTS_BRIDGE_TOKEN, or a peer on this host when neither is configured): its
sub-requests carry the client context the bridge forwards (addresses, page origins,
frame ids), which nobody else may claim, and all of it is believed.

Turns (``FairTurns``): a gathered call holds one turn, in an account of its own
(``BRIDGE_TURNS``), however many callers it carries: it is one unit of work and one Redis
connection. So the bridge holds at most max_in_flight_per_caller turns and direct callers
keep the rest; fairness between the callers it carries is the bridge's (it fills each call
round robin by credential), and each still has its own rate limit here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping

import grpc
from google.protobuf.message import DecodeError
from google.protobuf.timestamp_pb2 import Timestamp

from events_server.ops.access_log import AccessLog
from events_server.ops.logs import IpMode, accept_request_id, client_ip_for_log
from events_server.ops.logs import request_id as current_request_id
from events_server.pb import events_pb2 as pb
from events_server.server import identity
from events_server.server.access import access_line
from events_server.server.errors import IngestError, InvalidEvents, StoreUnavailable
from events_server.server.limits import Charge
from events_server.server.metrics import ServerMetrics
from events_server.server.passage import Passage
from events_server.server.service import EventsService
from events_server.server.status import QUIET_CODES, Trailers, grpc_status
from events_server.wire.metadata import GATHERED_METHOD, REQUEST_ID_HEADER, SERVICE_NAME
from events_server.wire.violations import FieldViolation

log = logging.getLogger(__name__)

BRIDGE_TURNS = "bridge:gathered"
"""The FairTurns account of gathered calls."""

MAX_SUB_REQUESTS = 1024
"""Most requests one gathered call may carry (the bridge sends at most its gather bound)."""

SUB_METHOD = f"/{SERVICE_NAME}/{{}}"
"""What a sub-request's access line names: the call it stands for (CreateEvents, Track)."""


class GatheredService:
    """Serves BridgeIngest.CreateEventsGathered (from raw bytes) with EventsService's steps."""

    def __init__(
        self,
        events: EventsService,
        metrics: ServerMetrics,
        ip_mode: IpMode,
        access: AccessLog,
    ) -> None:
        self._events = events
        self._metrics = metrics
        self._ip_mode = ip_mode
        self._access = access

    async def CreateEventsGathered(
        self, raw: bytes, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.GatheredResponse:
        """Every sub-request answered as its own CreateEvents call would be."""
        caller = identity.current.get()
        if caller is None or not caller.bridge:  # the access interceptor refused it already
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{GATHERED_METHOD} is for the REST bridge only, and this caller is not it",
            )
        try:
            return await self.serve(decode(raw), context.peer())
        except IngestError as error:  # no turn came, or not a GatheredRequest: the whole call
            await context.abort(*whole_call_failed(error))
            raise  # not reached (abort() raises)

    async def serve(
        self, gathered: pb.GatheredRequest, peer: str, seconds: float | None = None
    ) -> pb.GatheredResponse:
        """Every sub-request of one gathered call (or one batch of a stream) answered as its
        own CreateEvents call would be; IngestError when the whole call fails.

        ``seconds``: the time the bridge gives a batch of its stream. No step waits past it
        (the turn, the rate charges, the write): one deadline for all of them, where a
        timeout around the batch cost a timer and a task's cancellation more each batch.
        """
        events = self._events
        _check_size(gathered)
        # A budget per request, as for a call of its own, from when it arrived at the
        # bridge: a hung Redis costs a request the budget once, its wait for this call
        # included, so the call works to its oldest request's deadline. A request that
        # waited more than STALE_SHARE of it is refused alone (see ``_fresh``): an old
        # request never leaves the fresh ones less than the rest of the budget.
        waits = [sub.waited_us for sub in gathered.requests]
        stale_us = events.write_seconds * 1e6 * STALE_SHARE
        waited = max(waits, default=0)
        if waited > stale_us:  # the oldest that is not refused sets the deadline
            waited = max((w for w in waits if w <= stale_us), default=0)
        now = asyncio.get_running_loop().time()
        deadline = now + events.write_seconds - waited / 1e6
        if seconds is not None:
            deadline = min(deadline, now + seconds)
        async with events.limiter.turn(BRIDGE_TURNS, deadline):
            ns = time.time_ns()
            received_at = Timestamp(seconds=ns // 1_000_000_000, nanos=ns % 1_000_000_000)
            passages = [
                Passage(
                    sub.request,
                    _as_dict(sub.metadata),
                    peer,
                    sub.ws_message_id if sub.HasField("ws_message_id") else None,
                    received_at=received_at,
                    kind=sub.kind,
                )
                for sub in gathered.requests
            ]
            self._metrics.gathered(len(passages))
            await self._work(_fresh(passages, waits, events.write_seconds), deadline)
        response = pb.GatheredResponse()
        add = response.responses.add
        for passage in passages:
            self._answer(passage, len(passages), add)
        return response

    async def _work(self, passages: list[Passage], deadline: float) -> None:
        events = self._events
        for passage in passages:
            token = current_request_id.set(_request_id(passage))
            try:
                if events.admit_known(passage) is None:
                    await events.admit_looked_up(passage)
                events.prepare(passage)
            except IngestError as error:
                passage.fail(error)
            finally:
                current_request_id.reset(token)
        # Rates the write cannot take itself are charged first, together, each on its own.
        ahead: list[tuple[Passage, Charge]] = []
        for passage in passages:
            if passage.error is None:
                try:
                    if (charge := events.plan_charge(passage)) is not None:
                        ahead.append((passage, charge))
                except IngestError as error:
                    passage.fail(error)
        if ahead:
            await asyncio.gather(*(self._charge(p, c, deadline) for p, c in ahead))
        try:
            await events.write(passages, deadline)
        except IngestError as error:  # the whole write failed: nobody knows more
            for passage in passages:
                if passage.error is None and passage.reply is None:
                    passage.fail(error)

    async def _charge(self, passage: Passage, charge: Charge, deadline: float) -> None:
        current_request_id.set(_request_id(passage))  # this task's own context
        try:
            await self._events.limiter.charge(charge, deadline)
        except IngestError as error:
            passage.fail(error)

    def _answer(self, passage: Passage, gathered: int, add: Callable[..., pb.SubResponse]) -> None:
        """Count the sub-request's end, write its access line, and add its answer."""
        reply = passage.reply
        if passage.error is None and reply is not None:
            self._events.finish(passage)  # answered: counted, and nothing to log
            self._metrics.gathered_request(OK_NAME)
            if self._access.wanted(logging.INFO, True):
                self._access_line(passage, grpc.StatusCode.OK, gathered)
            add().response.CopyFrom(reply)  # a copy in C (a SubResponse made first: two)
            return
        token = current_request_id.set(_request_id(passage))
        try:
            code, message, trailers = self._events.finish(passage)
            self._metrics.gathered_request(code.name)
            if self._access.wanted(logging.INFO, False):
                self._access_line(passage, code, gathered)
        finally:
            current_request_id.reset(token)
        add(
            code=code.value[0],
            details=message,
            hold_seconds=self._events.hold(passage),
            trailers=trailer_messages(trailers),
        )

    def _access_line(self, passage: Passage, code: grpc.StatusCode, gathered: int) -> None:
        token = current_request_id.set(_request_id(passage))
        try:
            access_line(
                self._access,
                logging.INFO,
                SUB_METHOD.format(passage.method),
                code,
                seconds=time.time() - passage.received_at.ToNanoseconds() / 1e9,
                events=len(passage.request.events) if passage.parsed else None,
                response=passage.reply,
                metadata=passage.metadata,
                client=client_ip_for_log(passage.client_ip, self._ip_mode),
                gathered=gathered,
            )
        finally:
            current_request_id.reset(token)


def _as_dict(metadata: Mapping[str, str]) -> dict[str, str]:
    """A sub-request's metadata map as a dict: not ``dict(map)``, which walks the keys
    of upb's Mapping in Python (0.45 µs a request more)."""
    return {name: metadata[name] for name in metadata}


def _request_id(passage: Passage) -> str:
    """The sub-request's request id: the bridge's, when sane (checked once), else a new one."""
    if passage.request_id is None:
        passage.request_id = accept_request_id(passage.metadata.get(REQUEST_ID_HEADER))
    return passage.request_id


OK_NAME = grpc.StatusCode.OK.name

STALE_SHARE = 0.5
"""A sub-request that waited in the bridge more than this share of the server's budget is
refused alone (it would shorten the write of every request gathered with it); the bridge
sends what waits at most STALL_SECONDS (25 ms), so only an overwhelmed bridge gets here."""


def _fresh(passages: list[Passage], waits: list[int], budget: float) -> list[Passage]:
    """The passages to work on; those whose request waited (``waits``, µs) more than
    STALE_SHARE of the budget in the bridge are refused, each alone (retryable, nothing
    queued)."""
    stale_us = budget * 1e6 * STALE_SHARE
    if max(waits, default=0) <= stale_us:
        return passages
    fresh = []
    for passage, waited_us in zip(passages, waits, strict=True):
        if waited_us > stale_us:
            passage.fail(
                StoreUnavailable(
                    f"the request waited {waited_us / 1e6:.3f}s in the REST bridge, past"
                    f" {STALE_SHARE:.0%} of the server's budget ({budget:g}s); nothing was"
                    " queued"
                )
            )
        else:
            fresh.append(passage)
    return fresh


def whole_call_failed(error: IngestError) -> tuple[grpc.StatusCode, str, Trailers]:
    """The status a gathered call (or a stream's batch) failing as a whole ends with, logged
    unless it is an expected one."""
    code, message, trailers = grpc_status(error)
    if code not in QUIET_CODES:
        log.warning("%s failed: %s: %s", GATHERED_METHOD, code.name, message)
    return code, message, trailers


def trailer_messages(trailers: Trailers) -> list[pb.Trailer]:
    """Trailing metadata as the bridge gets it back in a message."""
    return [
        pb.Trailer(key=key, value=value if isinstance(value, bytes) else value.encode())
        for key, value in trailers
    ]


def decode(raw: bytes) -> pb.GatheredRequest:
    """The gathered call's sub-requests (their events stay bytes until each is admitted):
    parsed before its turn (from the bridge alone, and cheap), to learn how long its
    requests already waited there."""
    try:
        return pb.GatheredRequest.FromString(raw)
    except DecodeError as error:
        raise InvalidEvents(
            [FieldViolation("requests", f"not a GatheredRequest: {error}", "protobuf_invalid")]
        ) from None


def _check_size(gathered: pb.GatheredRequest) -> None:
    if len(gathered.requests) > MAX_SUB_REQUESTS:
        raise InvalidEvents(
            [
                FieldViolation(
                    "requests",
                    f"{len(gathered.requests)} requests in one call; at most {MAX_SUB_REQUESTS}",
                    "too_many_requests",
                )
            ]
        )
