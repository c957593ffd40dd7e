"""Files the requests the bridge refuses itself (its 422s) in the server's rejected record.

The server owns Redis, so the bridge reports over gRPC (RejectedEvents.Record),
in the background: the 422 never waits for it, and a report that cannot be
sent is dropped with a log line. Requests the server refuses are recorded by
the server itself, so each rejection is recorded once; the exception is a request
gRPC refuses as too large before the server sees it (the bridge's 413), which the
bridge reports too.

Each credential (key, or page origin) may have ``rejected_reports_per_second`` reports sent
(in bursts of ten seconds' worth): the server records at most its own share of each caller
anyway (EVENTS_REJECTED_RECORDS_PER_SECOND), and a flood of invalid frames must not cost a
call to the server each.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import grpc
import orjson

from events_server.ops.allowances import Allowances
from events_server.pb import events_pb2 as pb
from events_server.pb import events_pb2_grpc
from events_server.wire.metadata import MD_API_KEY, MD_ORIGIN
from events_server.wire.rejected import (
    MAX_ERROR_CHARS,
    MAX_ERRORS,
    MAX_IN_FLIGHT,
    PAYLOAD_LIMIT,
    tenants_of,
)
from rest_bridge.upstream import metadata_value

log = logging.getLogger(__name__)


def body_tenants(body: bytes) -> list[str]:
    """The tenants a request body names, when it parses as a JSON array of objects (v1) or an
    object with a ``tenant`` (v2)."""
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        # Not JSON (or nested deeper than orjson goes): the server records it for the
        # key's tenants.
        return []
    if isinstance(value, dict):
        return tenants_of([value.get("tenant")])
    if not isinstance(value, list):
        return []
    return tenants_of(item.get("tenant") for item in value if isinstance(item, dict))


def _field(loc: list[Any]) -> str:
    return ".".join(str(part) for part in loc)


class RejectedReporter:
    """Sends rejected-request reports to the server, a bounded number at a time."""

    def __init__(
        self,
        stub: Callable[[], events_pb2_grpc.RejectedEventsAsyncStub],
        timeout_seconds: float,
        per_credential_per_second: float = 0.0,
    ) -> None:
        self._stub = stub
        self._timeout = timeout_seconds
        self._tasks: set[asyncio.Task[None]] = set()
        self._allowances = Allowances(per_credential_per_second, per_credential_per_second * 10)
        self.lost = 0
        """Reports dropped (too many in flight) or not accepted by the server."""
        self.over_budget = 0
        """Reports not sent: their credential had had its share."""

    def _lose(self, why: str) -> None:
        self.lost += 1
        if self.lost & (self.lost - 1) == 0:  # 1st, 2nd, 4th...: no log flood
            log.warning("rejected-request report lost (%d so far): %s", self.lost, why)

    def report(
        self,
        body: bytes,
        detail: list[dict[str, Any]],
        api_key: str | None,
        origin: str | None = None,
        tenants: list[str] | None = None,
    ) -> None:
        """Report a request refused with ``detail`` (a 422's, or a 413's), if it came with a
        key or (keyless) from a page origin. ``tenants``: those the body names, when the
        caller knows them (else they are read from the body, which must then be small).

        The server records it for the tenants it names that the caller covers (a key's, or
        a registered storefront origin's), else for the caller's own: a request with
        neither is nobody's, and is not recorded.
        """
        if api_key:
            credential = (MD_API_KEY, metadata_value(api_key))
        elif origin:
            credential = (MD_ORIGIN, metadata_value(origin))
        else:
            return
        if not self._allowances.take(credential[1]):
            self.over_budget += 1  # not a loss: the server would not record it either
            if self.over_budget & (self.over_budget - 1) == 0:  # 1st, 2nd, 4th...
                log.warning(
                    "rejected-request reports not sent (%d so far): a caller had its share"
                    " (rejected_reports_per_second)",
                    self.over_budget,
                )
            return
        if len(self._tasks) >= MAX_IN_FLIGHT:
            self._lose(f"{MAX_IN_FLIGHT} already in flight")
            return
        request = pb.RejectedRequest(
            tenants=body_tenants(body) if tenants is None else tenants,
            errors=[
                # Cut here as the server would: the report must stay well within the
                # server's max_request_bytes, which applies to it too.
                pb.RejectedField(
                    field=_field(d.get("loc", []))[:MAX_ERROR_CHARS],
                    description=str(d.get("msg", ""))[:MAX_ERROR_CHARS],
                    reason=str(d.get("type", ""))[:MAX_ERROR_CHARS],
                )
                for d in detail[:MAX_ERRORS]
            ],
            payload=body[:PAYLOAD_LIMIT],
            payload_size=len(body),
        )
        task = asyncio.create_task(self._send(request, credential))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, request: pb.RejectedRequest, credential: tuple[str, str]) -> None:
        try:
            await self._stub().Record(request, timeout=self._timeout, metadata=(credential,))
        except grpc.aio.AioRpcError as error:
            self._lose(f"{error.code().name}: {error.details()}")

    async def drain(self) -> None:
        """Wait for the reports in flight (at shutdown)."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
