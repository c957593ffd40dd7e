"""The rejected-requests record: a bounded dead-letter stream per tenant.

Beacon clients (``navigator.sendBeacon``) never read a 422, so a store whose
integration sends broken events would never know. Each request rejected as
invalid leaves one record per tenant it names (the first few) in that tenant's
stream: the time, where it came from, the errors, and the start of the payload.
Every stream is capped with ``XADD MAXLEN ~``: this record is the one place
where trimming is right, as it holds diagnostics, not events anyone consumes.

Recording is best effort and never delays or changes the rejection itself.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any, TextIO

import grpc
from redis.asyncio import Redis, RedisCluster
from redis.exceptions import RedisError

from events_server.auth import MD_API_KEY, ApiKey, Authenticator
from events_server.codec import event_to_dict
from events_server.errors import FieldViolation, IngestError
from events_server.keys import KeySpace
from events_server.pb import events_pb2 as pb
from events_server.pb import events_pb2_grpc
from events_server.status import abort, call_metadata

log = logging.getLogger(__name__)

PAYLOAD_LIMIT = 4096
"""Bytes of a rejected request's payload kept in its record."""

MAX_TENANTS = 4
"""Tenants one rejected request is recorded for: a request naming more is rarely honest."""

MAX_ERRORS = 50
"""Errors kept per record (a request of 10,000 bad events would otherwise fill it)."""

MAX_ERROR_CHARS = 500
"""Characters kept of each error's field, description and reason."""

MAX_IN_FLIGHT = 64
"""Records being written at once; past that, new ones are dropped (and logged)."""

MAX_TENANT_CHARS = 256

# Field names of a record in the stream.
F_TENANT = b"tenant"
F_AT = b"at"
F_SOURCE = b"source"
F_ERRORS = b"errors"
F_PAYLOAD = b"payload"
F_SIZE = b"payload_size"


def tenants_of(names: Iterable[object]) -> list[str]:
    """The distinct tenant names worth a record, in order, at most MAX_TENANTS."""
    found: list[str] = []
    for name in names:
        if not isinstance(name, str) or not name or len(name) > MAX_TENANT_CHARS:
            continue
        try:
            name.encode()
        except UnicodeEncodeError:  # a lone surrogate from JSON: not a name we can store
            continue
        if name not in found:
            found.append(name)
            if len(found) == MAX_TENANTS:
                break
    return found


def tenants_for(named: Iterable[object], key: ApiKey) -> list[str]:
    """The tenants a key's rejected request is recorded for: those it names and the key covers,
    else the key's own (a request missing its tenant is still its store's business)."""
    covered = [tenant for tenant in tenants_of(named) if tenant in key.tenants]
    return covered or list(key.tenants[:MAX_TENANTS])


def events_payload(request: pb.CreateEventsRequest) -> tuple[bytes, int]:
    """The start of a gRPC request's events as contract JSON, and the request's size."""
    # The request's own size: a copy of its events to measure would cost more than
    # the parse (seconds for a request of a million tiny events).
    size = request.ByteSize()
    parts: list[bytes] = []
    length = 0
    for event in request.events:
        part = json.dumps(event_to_dict(event), ensure_ascii=False).encode()
        parts.append(part)
        length += len(part) + 1
        if length > PAYLOAD_LIMIT:
            break  # only the start is kept: no need to render the rest
    return (b"[" + b",".join(parts) + b"]")[:PAYLOAD_LIMIT], size


class RejectedLog:
    """Writes rejected-request records to the tenants' capped streams."""

    def __init__(
        self, redis: Redis | RedisCluster, keys: KeySpace, maxlen: int, timeout_seconds: float
    ) -> None:
        self._redis = redis
        self._keys = keys
        self._maxlen = maxlen
        self._timeout = timeout_seconds
        self._tasks: set[asyncio.Task[None]] = set()
        self.dropped = 0
        """Records not written because too many were in flight."""

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
            F_ERRORS: json.dumps(errors, ensure_ascii=False),
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
        self, request: pb.CreateEventsRequest, violations: Sequence[FieldViolation], key: ApiKey
    ) -> None:
        """Record a CreateEvents call refused as invalid (in the background)."""
        tenants = tenants_for((event.tenant for event in request.events), key)
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

    The bridge forwards the request's API key: only a key's own tenants get records, so no
    one can fill another store's record with junk.
    """

    def __init__(self, rejected: RejectedLog, auth: Authenticator) -> None:
        self._rejected = rejected
        self._auth = auth

    async def Record(
        self, request: pb.RejectedRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.RecordRejectedResponse:
        metadata = call_metadata(context)
        try:
            key = await self._auth.authenticate(metadata.get(MD_API_KEY))
        except IngestError as error:
            await abort(context, error)
        tenants = tenants_for(request.tenants, key)
        del request.tenants[:]
        request.tenants.extend(tenants)
        try:
            await self._rejected.record(request, "http")
        except (RedisError, TimeoutError) as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"redis: {type(exc).__name__}: {exc}")
        return pb.RecordRejectedResponse()


# --- reading (events-server tail --rejected) ---------------------------------------


def record_to_dict(key: str, entry_id: bytes, fields: dict[bytes, bytes]) -> dict[str, Any]:
    """JSON form of one record, for people and for JSONL sinks."""
    payload = fields.get(F_PAYLOAD, b"")
    size = int(fields.get(F_SIZE, b"0"))
    return {
        "stream": key,
        "entry_id": entry_id.decode(),
        "tenant": fields.get(F_TENANT, b"").decode(errors="replace"),
        "at": fields.get(F_AT, b"").decode(),
        "source": fields.get(F_SOURCE, b"").decode(),
        "errors": json.loads(fields.get(F_ERRORS, b"[]")),
        # A cut may split a UTF-8 sequence (or the body was not UTF-8 at all).
        "payload": payload.decode(errors="replace"),
        "payload_size": size,
        "truncated": size > len(payload),
    }


def _entry_key(entry_id: bytes) -> tuple[int, int]:
    ms, _, seq = entry_id.partition(b"-")
    return int(ms), int(seq)


async def _rejected_streams(
    redis: Redis | RedisCluster, keys: KeySpace, tenant: str | None
) -> list[str]:
    if tenant is not None:
        return [keys.rejected(tenant)]
    found: list[str] = []
    async for name in redis.scan_iter(match=keys.rejected_pattern(), count=1000, _type="STREAM"):
        found.append(name.decode())
    return sorted(found)


async def tail_rejected(
    redis: Redis | RedisCluster,
    keys: KeySpace,
    *,
    tenant: str | None,
    count: int | None,
    follow: bool,
    out: TextIO,
    block_ms: int = 1000,
) -> None:
    """Print rejected-request records as JSON lines, oldest first (all, or the last count)."""

    def show(key: str, entry_id: bytes, fields: dict[bytes, bytes]) -> None:
        out.write(json.dumps(record_to_dict(key, entry_id, fields), ensure_ascii=False) + "\n")
        out.flush()

    # The streams are capped, so reading each one whole is bounded.
    found: list[tuple[tuple[int, int], str, bytes, dict[bytes, bytes]]] = []
    last_seen: dict[Any, Any] = {}
    for key in await _rejected_streams(redis, keys, tenant):
        if count is None:
            entries: Any = await redis.xrange(key)
        else:
            newest: Any = await redis.xrevrange(key, count=count)
            entries = list(reversed(newest))
        found.extend((_entry_key(i), key, i, f) for i, f in entries)
        # Follow on from what was read, not from "$": nothing slips in between.
        last_seen[key] = entries[-1][0].decode() if entries else "0-0"
    found.sort()
    if count is not None:
        found = found[-count:] if count else []
    for _, key, entry_id, fields in found:
        show(key, entry_id, fields)

    while follow:
        if tenant is None:
            # New tenants' streams appear at any time.
            for key in await _rejected_streams(redis, keys, None):
                last_seen.setdefault(key, "0-0")
        if not last_seen:
            await asyncio.sleep(block_ms / 1000)
            continue
        reply: Any = await redis.xread(last_seen, block=block_ms)
        for raw_key, entries in reply or ():
            key = raw_key.decode()
            for entry_id, fields in entries:
                show(key, entry_id, fields)
                last_seen[key] = entry_id.decode()
