"""The EventsService servicer: validate, build envelopes, dedup + enqueue, report.

This is the one place where IngestErrors become gRPC status codes.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
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
    StoreUnavailable,
)
from events_server.server.limits import Limiter, Rates
from events_server.server.metrics import ServerMetrics
from events_server.server.rejected import RejectedLog
from events_server.server.routing import partition_for
from events_server.server.status import (
    QUIET_CODES,
    abort,
    call_events,
    call_metadata,
    grpc_status,
)
from events_server.server.store import EventStore, Item
from events_server.server.validation import parse_request, validate_events
from events_server.wire.codec import envelope_bytes
from events_server.wire.metadata import (
    MD_API_KEY,
    MD_FORWARDED_FOR,
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
NO_EVENTS = pb.CreateEventsRequest()

RATE_HOLD_SECONDS = 1.0
"""The longest a rate-limited call is held before its refusal is sent."""

WS_DEDUP_PREFIX = "ws:"
"""Frame ids dedup in their own namespace: a client's deduplication_id never meets one."""

MAX_RETRY_ID_CHARS = 256


def check_retry_id(retry_id: str, events: int) -> None:
    """A WebSocket frame id names one event, and is short (it becomes part of a Redis key)."""
    if events != 1:
        raise InvalidEvents(
            [
                FieldViolation(
                    "events",
                    f"a call with {MD_WS_MESSAGE_ID} carries one event, not {events}",
                    "ws_one_event",
                )
            ]
        )
    if not retry_id or len(retry_id) > MAX_RETRY_ID_CHARS:
        raise InvalidEvents(
            [
                FieldViolation(
                    "id",
                    f"the frame id must be 1 to {MAX_RETRY_ID_CHARS} characters long,"
                    f" not {len(retry_id)}",
                    "ws_id_length",
                )
            ]
        )


def client_ip(metadata: dict[str, str], peer: str, forwarded_hops: int) -> str:
    """The client address: from x-forwarded-for, skipping trusted proxies, else the peer."""
    chain = [hop.strip() for hop in metadata.get(MD_FORWARDED_FOR, "").split(",") if hop.strip()]
    if chain:
        # Only the right end of the chain was written by proxies we trust; anything
        # further left came from the client and could be forged.
        return chain[max(len(chain) - 1 - forwarded_hops, 0)]
    # grpc peers look like "ipv4:10.0.0.1:5000", "ipv6:[::1]:5000", "unix:/path".
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rpartition(":")[0]
    if kind == "ipv6":
        return rest.rpartition(":")[0].strip("[]")
    return rest or peer


class EventsService:
    """Serves CreateEvents (from raw request bytes: see app.create_server) on an EventStore."""

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
        rejected: RejectedLog | None = None,
    ) -> None:
        self._limiter = limiter
        self._rates = rates
        self._write_seconds = write_seconds
        self._store = store
        self._auth = auth
        self._limits = limits
        self._partitions = partitions
        self._forwarded_hops = forwarded_hops
        self._metrics = metrics
        self._rejected = rejected

    async def CreateEvents(
        self, raw: bytes, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.CreateEventsResponse:
        """CreateEvents from the request's bytes: the caller is known before they are parsed."""
        request = NO_EVENTS
        caller: Caller | None = None
        try:
            received_at = Timestamp()
            received_at.FromNanoseconds(time.time_ns())
            metadata = call_metadata(context)
            # Who first: an unauthenticated caller learns nothing, not even what is
            # invalid, and costs no parsing.
            caller = await self._auth.admit(metadata.get(MD_API_KEY), metadata.get(MD_ORIGIN))
            # One budget from here on: waiting for the caller's turn, parsing, its rate
            # check, the write. The turn comes before any parsing: a flood's calls wait
            # their turn (costing no CPU), while other callers find theirs free.
            deadline = asyncio.get_running_loop().time() + self._write_seconds
            async with self._limiter.turn(caller.limiter_id, deadline):
                try:
                    request = parse_request(raw, self._limits)
                except InvalidEvents as error:
                    self._record_invalid(request, error, caller)
                    raise
                call_events.set(len(request.events))
                reply = await self._create_events(
                    request,
                    received_at=received_at,
                    metadata=metadata,
                    caller=caller,
                    peer=context.peer(),
                    deadline=deadline,
                )
        except IngestError as error:
            self._metrics.count_events(request.events, None, error)
            if isinstance(error, AuthError):
                self._metrics.auth_failure(error.kind)
            elif isinstance(error, RateLimited) and caller is not None:
                self._metrics.rate_limited(caller.auth, caller.limiter_id)
                if error.retryable:
                    # Answered after the Retry-After it carries (whole seconds; at most
                    # RATE_HOLD_SECONDS): a caller that retries at once, or never stops, then
                    # costs a held call, not a refusal loop that takes the CPU every other
                    # caller needs.
                    # Jittered: held calls released together would come back together.
                    hold = min(math.ceil(error.retry_after_seconds), RATE_HOLD_SECONDS)
                    await asyncio.sleep(hold * random.uniform(0.5, 1.0))
            code, message, trailers = grpc_status(error)
            if code not in QUIET_CODES:
                log.warning("CreateEvents failed: %s: %s", code.name, message)
            await context.abort(code, message, trailers)
            raise  # abort() always raises; this keeps type checkers honest
        self._metrics.count_events(request.events, reply)
        return reply

    def _record_invalid(
        self, request: pb.CreateEventsRequest, error: InvalidEvents, caller: Caller
    ) -> None:
        if self._rejected is not None:
            self._rejected.record_invalid_events(request, error.violations, caller)

    async def _create_events(
        self,
        request: pb.CreateEventsRequest,
        *,
        received_at: Timestamp,
        metadata: dict[str, str],
        caller: Caller,
        peer: str,
        deadline: float,
    ) -> pb.CreateEventsResponse:
        events = request.events
        retry_id = metadata.get(MD_WS_MESSAGE_ID)
        try:
            serialized = validate_events(events, self._limits)
            if retry_id is not None:
                check_retry_id(retry_id, len(events))
        except InvalidEvents as error:
            self._record_invalid(request, error, caller)
            raise
        # After validation, so an empty or missing tenant reads as invalid, not as foreign.
        check_tenants(caller, (event.tenant for event in events))
        if not events:
            return pb.CreateEventsResponse()
        self._metrics.admitted(caller.auth)

        shared = pb.Envelope(
            received_at=received_at,
            client_ip=client_ip(metadata, peer, self._forwarded_hops),
            user_agent=metadata.get(MD_USER_AGENT, metadata.get("user-agent")),
            referer=metadata.get(MD_REFERER),
            forwarded_host=metadata.get(MD_FORWARDED_HOST),
            api_key_id=caller.key_id,
            storefront_origin=caller.storefront.origin if caller.storefront else None,
            ws_message_id=retry_id,
        ).SerializeToString()
        partitions = self._partitions
        if retry_id is None:
            items: list[Item] = [
                (
                    partition_for(event, partitions),
                    event.tenant,
                    event.deduplication_id if event.HasField("deduplication_id") else None,
                    envelope_bytes(data, shared),
                )
                for event, data in zip(events, serialized, strict=True)
            ]
        else:
            # A WebSocket frame's resends carry its id: an event without a deduplication_id
            # is deduplicated on it, and routed by it, so a resend meets its first copy.
            (event,), (data,) = events, serialized
            dedup_id = (
                event.deduplication_id
                if event.HasField("deduplication_id")
                else WS_DEDUP_PREFIX + retry_id
            )
            items = [
                (
                    partition_for(event, partitions, fallback=dedup_id),
                    event.tenant,
                    dedup_id,
                    envelope_bytes(data, shared),
                )
            ]

        await self._limiter.charge(caller.limiter_id, self._rates(caller), len(events), deadline)
        outcomes = await self._store.append(items, deadline=deadline)
        accepted = sum(o[0] for o in outcomes)
        return pb.CreateEventsResponse(
            # Dicts, not EventResult objects: upb builds them in C, twice as fast.
            results=[
                {"status": ACCEPTED if ok else DUPLICATE, "entry_id": entry, "partition": part}  # type: ignore[misc]
                for ok, entry, part in outcomes
            ],
            accepted=accepted,
            duplicates=len(outcomes) - accepted,
        )


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
