"""The EventsService servicer: validate, build envelopes, dedup + enqueue, report.

This is the one place where IngestErrors become gRPC status codes.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
from collections.abc import Callable

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from events_server.pb import events_pb2 as pb
from events_server.pb import events_pb2_grpc
from events_server.server.auth import Authenticator, Caller, check_tenants
from events_server.server.errors import (
    AuthError,
    IngestError,
    InvalidEvents,
    RateLimited,
    RequestTooLarge,
    StoreUnavailable,
)
from events_server.server.events_request import PreparedEvents
from events_server.server.limits import Charge, Limiter, Rates
from events_server.server.metrics import ServerMetrics
from events_server.server.passage import CREATE_EVENTS, TRACK, Passage, Prepared, client_ip
from events_server.server.rejected import RejectedLog
from events_server.server.status import (
    QUIET_CODES,
    Trailers,
    abort,
    call_events,
    call_metadata,
    grpc_status,
    refuse,
)
from events_server.server.store import EventStore
from events_server.server.track_request import PreparedTrack
from events_server.wire.codec import envelope_context
from events_server.wire.metadata import (
    MD_API_KEY,
    MD_FORWARDED_HOST,
    MD_ORIGIN,
    MD_REFERER,
    MD_USER_AGENT,
    MD_WS_MESSAGE_ID,
)
from events_server.wire.validation import Limits
from events_server.wire.violations import FieldViolation

log = logging.getLogger(__name__)

ACCEPTED = pb.EventResult.STATUS_ACCEPTED
DUPLICATE = pb.EventResult.STATUS_DUPLICATE

RATE_HOLD_SECONDS = 1.0
"""The longest a rate-limited call is held before its refusal is sent."""

MAX_RATES_KEPT = 10_000
"""Callers whose rates are kept worked out (see ``_rates_of``); past it, they start over."""

NO_REPLY = pb.CreateEventsResponse()
"""What a refused call returns, beside its status (see ``status.refuse``)."""


def _unknown_kind(kind: int) -> InvalidEvents:
    return InvalidEvents(
        [
            FieldViolation(
                "kind",
                f"request kind {kind} is not one this server knows (CREATE_EVENTS, TRACK)",
                "enum",
            )
        ]
    )


class EventsService:
    """Serves CreateEvents and Track (from raw request bytes: see app.create_server) on an
    EventStore.

    Every request takes the same steps, alone or gathered: ``admit``, ``prepare`` (parse,
    validate, tenants, envelopes), ``charge`` (its rate), ``write`` (one store append for
    every request written together, which takes the charge where it can) and ``finish``
    (metrics, and the status it ends with).
    """

    def __init__(
        self,
        store: EventStore,
        auth: Authenticator,
        partitions: int,
        forwarded_hops: int,
        metrics: ServerMetrics,
        *,
        limits: Limits,
        limiter: Limiter,
        rates: Callable[[Caller], Rates],
        write_seconds: float,
        max_request_bytes: int,
        rejected: RejectedLog | None = None,
    ) -> None:
        self.limiter = limiter
        self._max_request_bytes = max_request_bytes
        self._rates = rates
        self.write_seconds = write_seconds
        self._store = store
        self._auth = auth
        self._limits = limits
        self._partitions = partitions
        self._forwarded_hops = forwarded_hops
        self._metrics = metrics
        self._rejected = rejected
        self._rates_by_record: dict[int, tuple[object, Rates]] = {}
        self._stamp: tuple[Timestamp | None, bytes] = (None, b"")
        """The last receipt time serialized, and its bytes."""

    async def CreateEvents(
        self, raw: bytes, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.CreateEventsResponse:
        """CreateEvents from the request's bytes: the caller is known before they are parsed."""
        return await self._serve(raw, context, CREATE_EVENTS)

    async def Track(
        self, raw: bytes, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.CreateEventsResponse:
        """Track (Depict's v2 kinds) from the request's bytes, as CreateEvents."""
        return await self._serve(raw, context, TRACK)

    async def _serve(
        self, raw: bytes, context: grpc.aio.ServicerContext[object, object], kind: int
    ) -> pb.CreateEventsResponse:
        metadata = call_metadata(context)
        passage = Passage(raw, metadata, context.peer(), metadata.get(MD_WS_MESSAGE_ID), kind=kind)
        try:
            # Who first: an unauthenticated caller learns nothing, not even what is
            # invalid, and costs no parsing.
            caller = await self.admit(passage)
            # One budget from here on: waiting for the caller's turn, parsing, its rate
            # check, the write. The turn comes before any parsing: a flood's calls wait
            # their turn (costing no CPU), while other callers find theirs free.
            deadline = asyncio.get_running_loop().time() + self.write_seconds
            async with self.limiter.turn(caller.limiter_id, deadline):
                self.prepare(passage)
                await self.charge(passage, deadline)
                await self.write([passage], deadline)
        except IngestError as error:
            passage.fail(error)
        if passage.parsed:  # the access line counts its events
            call_events.set(len(passage.request.events))
        code, message, trailers = self.finish(passage)
        if passage.reply is None:
            if hold := self.hold(passage):
                await asyncio.sleep(hold)
            refuse(context, code, message, trailers)
            return NO_REPLY
        return passage.reply

    async def admit(self, passage: Passage) -> Caller:
        """Who the request is: its key, or its storefront origin (raises AuthError).

        First of all, its size: one over max_request_bytes is refused as gRPC would refuse
        it (gRPC's own bound is higher, to let the bridge's gathered calls in).
        """
        if (caller := self.admit_known(passage)) is not None:
            return caller
        return await self.admit_looked_up(passage)

    def admit_known(self, passage: Passage) -> Caller | None:
        """``admit`` without a coroutine, when its caller's key or storefront is cached;
        None when it is not: then ``admit_looked_up`` is to be awaited."""
        metadata = passage.metadata
        passage.client_ip = client_ip(metadata, passage.peer, self._forwarded_hops)
        if len(passage.raw) > self._max_request_bytes:
            raise RequestTooLarge(len(passage.raw), self._max_request_bytes)
        passage.caller = self._auth.admit_known(metadata.get(MD_API_KEY), metadata.get(MD_ORIGIN))
        return passage.caller

    async def admit_looked_up(self, passage: Passage) -> Caller:
        """The rest of ``admit`` after ``admit_known`` found no cached answer."""
        metadata = passage.metadata
        passage.caller = await self._auth.admit(
            metadata.get(MD_API_KEY), metadata.get(MD_ORIGIN), passage.client_ip
        )
        return passage.caller

    def prepare(self, passage: Passage) -> None:
        """Parse, validate and check the tenants of an admitted request; build its envelopes.

        Raises InvalidEvents (recorded as rejected) or PermissionDenied. A request of no
        events is answered here, with nothing to write.
        """
        caller = passage.caller
        assert caller is not None
        prepared: Prepared
        try:
            if passage.kind == CREATE_EVENTS:
                prepared = PreparedEvents(passage, self._limits)
            elif passage.kind == TRACK:
                prepared = PreparedTrack(passage, self._limits)
            else:
                raise _unknown_kind(passage.kind)
        except InvalidEvents as error:
            if self._rejected is not None:
                self._rejected.record_invalid_events(passage.request, error.violations, caller)
            raise
        # After validation, so an empty or missing tenant reads as invalid, not as foreign.
        check_tenants(caller, prepared.tenants(), prepared.tenant_field)
        if not passage.request.events:
            passage.reply = pb.CreateEventsResponse()
            return
        self._metrics.admitted(caller.auth)

        metadata = passage.metadata
        stamp = passage.received_at
        if stamp is not self._stamp[0]:  # the requests of one gathered call share theirs
            self._stamp = (stamp, stamp.SerializeToString())
        shared = envelope_context(
            self._stamp[1],
            passage.client_ip,
            metadata.get(MD_USER_AGENT, metadata.get("user-agent")),
            metadata.get(MD_REFERER),
            metadata.get(MD_FORWARDED_HOST),
            caller.key_id,
            caller.storefront.origin if caller.storefront else None,
            passage.retry_id,
        )
        passage.items = prepared.items(shared, self._store.keys, self._partitions)

    def plan_charge(self, passage: Passage) -> Charge | None:
        """The request's rate charge, when it takes a round trip of its own before the write.

        None when there is nothing to charge, or when the write takes the charge itself
        (one partition batch on one server, as every single event there): then it is in
        ``passage.charge``. Raises RateLimited for a request larger than its burst.
        """
        caller = passage.caller
        if not passage.items or caller is None:
            return None
        rates = self._rates_of(caller)
        if rates.unlimited:
            return None
        events = len(passage.request.events)
        charge = self.limiter.charge_for(caller.limiter_id, rates, events)
        if self._store.charges_in_write(passage.items):
            passage.charge = charge
            return None
        return charge

    def _rates_of(self, caller: Caller) -> Rates:
        """The caller's rates, worked out once per key (or storefront) record: records are
        immutable, and a cached lookup hands out the same one until it expires."""
        record: object = caller.key if caller.key is not None else caller.storefront
        known = self._rates_by_record.get(id(record))
        if known is not None and known[0] is record:
            return known[1]
        if len(self._rates_by_record) >= MAX_RATES_KEPT:
            self._rates_by_record.clear()
        rates = self._rates(caller)
        self._rates_by_record[id(record)] = (record, rates)  # kept: its id stays its own
        return rates

    async def charge(self, passage: Passage, deadline: float) -> None:
        """Take the request from its caller's allowance, before anything is written, unless
        its write takes it (raises RateLimited, or StoreUnavailable when Redis does not
        answer)."""
        if (charge := self.plan_charge(passage)) is not None:
            await self.limiter.charge(charge, deadline)

    async def write(self, passages: list[Passage], deadline: float) -> None:
        """Write every passage's events in one store append; answer each (its reply, or the
        error of a partition batch of its that Redis refused). Raises when the whole write
        failed: then no passage knows what became of its events."""
        writing = [p for p in passages if p.items and p.error is None and p.reply is None]
        if not writing:
            return
        written = await self._store.append_each(
            [p.items for p in writing], deadline=deadline, charges=[p.charge for p in writing]
        )
        for passage, outcomes in zip(writing, written, strict=True):
            if isinstance(outcomes, IngestError):
                passage.fail(outcomes)
                continue
            accepted = sum(o[0] for o in outcomes)
            passage.reply = pb.CreateEventsResponse(
                # Dicts, not EventResult objects: upb builds them in C, twice as fast.
                results=[
                    {"status": ACCEPTED if ok else DUPLICATE, "entry_id": entry, "partition": part}  # type: ignore[misc]
                    for ok, entry, part in outcomes
                ],
                accepted=accepted,
                duplicates=len(outcomes) - accepted,
            )

    def hold(self, passage: Passage) -> float:
        """How long to hold the request's refusal before it is sent (seconds; 0: none).

        A rate-limited request is answered after the Retry-After it carries (whole seconds;
        at most RATE_HOLD_SECONDS): a caller that retries at once, or never stops, then
        costs a held call, not a refusal loop that takes the CPU every other caller needs.
        Jittered: held calls released together would come back together.
        """
        error = passage.error
        if not isinstance(error, RateLimited) or not error.retryable or passage.caller is None:
            return 0.0
        hold = min(math.ceil(error.retry_after_seconds), RATE_HOLD_SECONDS)
        return hold * random.uniform(0.5, 1.0)

    def finish(self, passage: Passage) -> tuple[grpc.StatusCode, str, Trailers]:
        """Count the request's events and how it ended; its status (OK with a reply)."""
        events = passage.request.events
        error = passage.error
        if error is None and passage.reply is not None:
            self._metrics.count_events(events, passage.reply)
            return grpc.StatusCode.OK, "", ()
        if error is None:  # not reached: every step answers or fails
            error = StoreUnavailable("the request was not answered; nothing was queued")
            passage.fail(error)
        passage.reply = None
        self._metrics.count_events(events, None, error)
        if isinstance(error, AuthError):
            self._metrics.auth_failure(error.kind)
        elif isinstance(error, RateLimited) and passage.caller is not None:
            self._metrics.rate_limited(passage.caller.auth, passage.caller.limiter_id)
        code, message, trailers = grpc_status(error)
        if code not in QUIET_CODES and not isinstance(error, RequestTooLarge):
            log.warning("%s failed: %s: %s", passage.method, code.name, message)
        return code, message, trailers


class OriginsService(events_pb2_grpc.OriginsServicer):
    """Origins.Check: the CORS answer the REST bridge gives a browser."""

    def __init__(self, auth: Authenticator) -> None:
        self._auth = auth

    async def Check(
        self, request: pb.OriginCheckRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.OriginCheckResponse:
        metadata = call_metadata(context)
        try:
            key = await self._auth.find(metadata.get(MD_API_KEY))
            if key is not None:
                decision = self._auth.decide(key, request.origin)
            else:
                decision = await self._auth.decide_any(request.origin)
        except StoreUnavailable as error:
            await abort(context, error)
        return pb.OriginCheckResponse(allowed=decision.allowed, credentials=decision.credentials)
