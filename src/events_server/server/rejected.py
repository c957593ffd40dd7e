"""The rejected-requests record: a bounded dead-letter stream per tenant.

Beacon clients (``navigator.sendBeacon``) never read a 422, so a store whose
integration sends broken events would never know. Each request rejected as
invalid leaves one record per tenant it names (the first few) in that tenant's
stream: the time, where it came from, the errors, and the start of the payload.
Every stream is capped with ``XADD MAXLEN ~``: this record is the one place
where trimming is right, as it holds diagnostics, not events anyone consumes.

Recording is best effort and never delays or changes the rejection itself. Each record is
charged to the caller whose request it files (its key, or its storefront origin), at most
``rejected_records_per_second`` per process: a stream holds a few thousand records, and a
caller sending nothing but invalid requests (anyone may forge a storefront's origin) would
otherwise replace the store's real diagnostics with its own within seconds.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

import grpc
from redis.asyncio import Redis, RedisCluster
from redis.exceptions import RedisError

from events_server.ops.allowances import Allowances
from events_server.pb import events_pb2 as pb
from events_server.pb import events_pb2_grpc
from events_server.queue.keys import F_AT, F_ERRORS, F_PAYLOAD, F_SIZE, F_SOURCE, F_TENANT, KeySpace
from events_server.server.auth import Authenticator, Caller
from events_server.server.errors import IngestError
from events_server.server.status import abort, call_metadata
from events_server.wire.codec import event_to_dict
from events_server.wire.metadata import MD_API_KEY, MD_ORIGIN
from events_server.wire.rejected import (
    MAX_ERROR_CHARS,
    MAX_ERRORS,
    MAX_ERRORS_BYTES,
    MAX_IN_FLIGHT,
    MAX_TENANTS,
    PAYLOAD_LIMIT,
    tenants_of,
)
from events_server.wire.tracked import message_of, tracked_to_dict
from events_server.wire.violations import FieldViolation

log = logging.getLogger(__name__)


def tenants_for(named: Iterable[object], caller: Caller) -> list[str]:
    """The tenants a rejected request is recorded for: those it names that its caller (key or
    storefront) covers, else the caller's own (a request missing its tenant is still its
    store's business)."""
    covered = [tenant for tenant in tenants_of(named) if tenant in caller.tenants]
    return covered or list(caller.tenants[:MAX_TENANTS])


def _tenant(event: pb.Event | pb.TrackedEvent) -> str:
    if isinstance(event, pb.Event):
        return event.tenant
    message = message_of(event)
    return "" if message is None else message.tenant


def _to_dict(event: pb.Event | pb.TrackedEvent) -> dict[str, Any]:
    return event_to_dict(event) if isinstance(event, pb.Event) else tracked_to_dict(event)


def events_payload(request: pb.CreateEventsRequest | pb.TrackRequest) -> tuple[bytes, int]:
    """The start of a gRPC request's events as JSON (a CreateEvents event in the contract's
    form, a Track event as ``{kind: {...}}``), and the request's size."""
    # The request's own size: a copy of its events to measure would cost more than
    # the parse (seconds for a request of a million tiny events).
    size = request.ByteSize()
    parts: list[bytes] = []
    length = 0
    for event in request.events:
        part = json.dumps(_to_dict(event), ensure_ascii=False).encode()
        parts.append(part)
        length += len(part) + 1
        if length > PAYLOAD_LIMIT:
            break  # only the start is kept: no need to render the rest
    return (b"[" + b",".join(parts) + b"]")[:PAYLOAD_LIMIT], size


class RejectedLog:
    """Writes rejected-request records to the tenants' capped streams."""

    def __init__(
        self,
        redis: Redis | RedisCluster,
        keys: KeySpace,
        maxlen: int,
        timeout_seconds: float,
        per_caller_per_second: float = 0.0,
    ) -> None:
        self._redis = redis
        self._keys = keys
        self._maxlen = maxlen
        self._timeout = timeout_seconds
        self._tasks: set[asyncio.Task[None]] = set()
        self._allowances = Allowances(per_caller_per_second, per_caller_per_second * 10)
        self.dropped = 0
        """Records not written because too many were in flight."""
        self.over_budget = 0
        """Records not written because their caller had written its share."""

    def charge(self, caller: Caller) -> bool:
        """Whether a record of ``caller``'s may be written (one is taken from its share)."""
        if self._allowances.take(caller.limiter_id):
            return True
        self.over_budget += 1
        if self.over_budget & (self.over_budget - 1) == 0:  # 1st, 2nd, 4th...: no log flood
            log.warning(
                "rejected-request records not written (%d so far): %s wrote its share"
                " (rejected_records_per_second)",
                self.over_budget,
                caller.describe(),
            )
        return False

    async def record(self, request: pb.RejectedRequest, source: str) -> None:
        """Append the record to each named tenant's stream (raises RedisError, TimeoutError)."""
        tenants = tenants_of(request.tenants)
        if not tenants:
            return
        errors = [
            {
                "field": e.field[:MAX_ERROR_CHARS],
                "description": e.description[:MAX_ERROR_CHARS],
                "reason": e.reason[:MAX_ERROR_CHARS],
            }
            for e in request.errors[:MAX_ERRORS]
        ]
        fields: dict[Any, Any] = {
            F_AT: datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            F_SOURCE: source,
            F_ERRORS: _errors_json(errors),
            F_PAYLOAD: request.payload[:PAYLOAD_LIMIT],
            F_SIZE: request.payload_size,
        }
        async with asyncio.timeout(self._timeout):
            async with self._redis.pipeline(transaction=False) as pipe:
                for tenant in tenants:
                    pipe.xadd(
                        self._keys.rejected(tenant),
                        {F_TENANT: tenant, **fields},
                        maxlen=self._maxlen,
                        approximate=True,
                    )
                await pipe.execute()

    def record_soon(self, request: pb.RejectedRequest, source: str) -> None:
        """Write the record in the background; drop it if too many are in flight."""
        if len(self._tasks) >= MAX_IN_FLIGHT:
            self.dropped += 1
            if self.dropped & (self.dropped - 1) == 0:  # 1st, 2nd, 4th...: no log flood
                log.warning(
                    "rejected-request records dropped (%d so far): %d already being written",
                    self.dropped,
                    MAX_IN_FLIGHT,
                )
            return
        task = asyncio.create_task(self._record_logged(request, source))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _record_logged(self, request: pb.RejectedRequest, source: str) -> None:
        try:
            await self.record(request, source)
        except (RedisError, TimeoutError) as exc:
            log.warning("rejected-request record not written: %s: %s", type(exc).__name__, exc)

    def record_invalid_events(
        self,
        request: pb.CreateEventsRequest | pb.TrackRequest,
        violations: Sequence[FieldViolation],
        caller: Caller,
    ) -> None:
        """Record a CreateEvents or Track call refused as invalid (in the background), within
        its caller's share."""
        if not self.charge(caller):
            return
        tenants = tenants_for(map(_tenant, request.events), caller)
        payload, size = events_payload(request)
        self.record_soon(
            pb.RejectedRequest(
                tenants=tenants,
                errors=[
                    pb.RejectedField(field=v.field, description=v.description, reason=v.reason)
                    for v in violations[:MAX_ERRORS]
                ],
                payload=payload,
                payload_size=size,
            ),
            "grpc",
        )

    async def close(self) -> None:
        """Wait for the records being written."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


class RejectedServicer(events_pb2_grpc.RejectedEventsServicer):
    """RejectedEvents.Record: how the REST bridge files the requests it refused itself.

    The bridge forwards the request's API key (or, keyless, its page origin): only the
    caller's own tenants get records, so no one can fill another store's record with junk.
    """

    def __init__(self, rejected: RejectedLog, auth: Authenticator) -> None:
        self._rejected = rejected
        self._auth = auth

    async def Record(
        self, request: pb.RejectedRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.RecordRejectedResponse:
        metadata = call_metadata(context)
        try:
            caller = await self._auth.admit(metadata.get(MD_API_KEY), metadata.get(MD_ORIGIN))
        except IngestError as error:
            await abort(context, error)
        if not self._rejected.charge(caller):
            return pb.RecordRejectedResponse()  # the report is taken; its record is not written
        tenants = tenants_for(request.tenants, caller)
        del request.tenants[:]
        request.tenants.extend(tenants)
        try:
            await self._rejected.record(request, "http")
        except (RedisError, TimeoutError) as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"redis: {type(exc).__name__}: {exc}")
        return pb.RecordRejectedResponse()


def _errors_json(errors: list[dict[str, str]]) -> str:
    """The errors as JSON within MAX_ERRORS_BYTES: as many as fit, then a count of the rest."""
    text = json.dumps(errors, ensure_ascii=False)
    if len(text.encode()) <= MAX_ERRORS_BYTES:
        return text
    kept: list[dict[str, str]] = []
    for error in errors:
        kept.append(error)
        more = {"field": "", "description": f"{len(errors) - len(kept)} more", "reason": "more"}
        if len(json.dumps([*kept, more], ensure_ascii=False).encode()) > MAX_ERRORS_BYTES:
            kept.pop()
            break
    rest = len(errors) - len(kept)
    kept.append({"field": "", "description": f"{rest} more errors not kept", "reason": "more"})
    return json.dumps(kept, ensure_ascii=False)
