"""The steps every JSON POST route shares, whatever its contract: the key, CORS, the body,
the call to the server, the answer, the rejected record.

A route (rest_bridge.routes.v1, rest_bridge.routes.v2) is a JsonPost that says how its body
is validated (``rules``), which tenants a request names (``tenants``) and which call sends it
(``call``): FastAPI documents the routes (rest_bridge.app) but does not serve them, its
generic pipeline costing more CPU than the work itself.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple, TypeVar

import grpc
import orjson

from events_server.pb import events_pb2 as pb
from rest_bridge.admission import Admission
from rest_bridge.body import (
    BodyRefused,
    arrived_body,
    body_arrived,
    check_media_type,
    declared_length,
    is_gzipped,
    read_body,
)
from rest_bridge.config import BridgeSettings
from rest_bridge.cors import Cors
from rest_bridge.credentials import api_key
from rest_bridge.errors import (
    REQUEST_TOO_LARGE,
    grpc_error_response,
    v1_field_loc,
    validation_detail,
)
from rest_bridge.gather import Gatherer
from rest_bridge.gather_batch import Metadata
from rest_bridge.offload import BodyParser, Rules
from rest_bridge.rejected import RejectedReporter
from rest_bridge.responses import Reply, json_reply
from rest_bridge.upstream import forwarded_metadata

UNPROCESSABLE = 422

STATUS_NAMES = {
    pb.EventResult.STATUS_ACCEPTED: "accepted",
    pb.EventResult.STATUS_DUPLICATE: "duplicate",
}

T = TypeVar("T")


def response_body(reply: pb.CreateEventsResponse) -> dict[str, Any]:
    """JSON body of a 200: the counts, then one result per event in request order."""
    return {
        "accepted": reply.accepted,
        "duplicates": reply.duplicates,
        "results": [
            {
                "status": STATUS_NAMES.get(r.status, "unknown"),
                "entry_id": r.entry_id,
                "partition": r.partition,
            }
            for r in reply.results
        ],
    }


_RESULT_HEADS = {
    status: b'{"status":"%s","entry_id":' % name.encode() for status, name in STATUS_NAMES.items()
}


def response_bytes(reply: pb.CreateEventsResponse) -> bytes:
    """response_body as JSON, written at once (a third of orjson's way through the dict)."""
    parts = []
    for result in reply.results:
        head = _RESULT_HEADS.get(result.status)
        if head is None:  # not the server's: said as "unknown" by the general way
            return orjson.dumps(response_body(reply))
        # entry_id through orjson: whatever it holds comes out as a JSON string.
        entry_id = orjson.dumps(result.entry_id)
        parts.append(b'%s%s,"partition":%d}' % (head, entry_id, result.partition))
    return b'{"accepted":%d,"duplicates":%d,"results":[%s]}' % (
        reply.accepted,
        reply.duplicates,
        b",".join(parts),
    )


def body_timed_out(seconds: float) -> Reply:
    """The 408 of a body that did not arrive in time."""
    return json_reply(
        408,
        {"detail": f"the body did not arrive within {seconds:g} seconds (body_timeout_seconds)"},
        # The rest of the body is not read: the connection cannot be reused.
        {"Connection": "close"},
    )


class Started(NamedTuple):
    """A request sent on by ``JsonPost.start``, its answer to come in ``future``."""

    future: asyncio.Future[pb.CreateEventsResponse]
    request: Any
    headers: dict[bytes, bytes]
    key: str | None
    body: bytes
    cors: list[tuple[bytes, bytes]]


class JsonPost:
    """The ASGI app of one JSON POST route; subclasses say what a whole body becomes (its
    ``rules``, ``tenants`` and ``call``)."""

    locate: staticmethod[[str], list[str | int]] = staticmethod(v1_field_loc)
    """Where a field the server's violations name was in the request's JSON body."""

    rules: Rules[Any]
    """How its bodies are validated, and what a valid one becomes."""

    def __init__(  # noqa: PLR0917
        self,
        settings: BridgeSettings,
        gatherer: Gatherer,
        cors: Cors,
        parser: BodyParser,
        rejected: RejectedReporter | None,
        admission: Admission,
    ) -> None:
        self._settings = settings
        self._admission = admission
        self._gatherer = gatherer
        self._cors = cors
        self._rejected = rejected
        self._parser = parser

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        reply, cors = await self.answer(scope, receive)
        await reply.send(send, cors)

    async def answer(
        self, scope: dict[str, Any], receive: Any
    ) -> tuple[Reply, list[tuple[bytes, bytes]]]:
        """The reply to one request, and the CORS headers it goes with (the caller sends
        both: rest_bridge.access adds the request id)."""
        headers = dict(scope["headers"])
        key, source = api_key(headers, scope.get("query_string", b""))
        cors: list[tuple[bytes, bytes]] = []
        if (origin := headers.get(b"origin")) is not None:  # browsers only: not the hot path
            try:
                decision = await self._cors.decide(origin.decode("latin-1"), key)
            except grpc.aio.AioRpcError as error:
                return grpc_error_response(error, self._settings.retry_after_seconds), cors
            # On every answer, the bridge's own 413/415/422 too: the page can read them.
            cors = self._cors.response_headers(origin, decision)
        try:
            check_media_type(headers.get(b"content-type"), source)
            gzipped = is_gzipped(headers.get(b"content-encoding"))
            if (
                not self._admission.admitted(headers, key)
                and (denied := await self._admission.before_body(scope, headers, key)) is not None
            ):
                raise BodyRefused(denied)  # unread: nothing costly before the caller is known
            length, limit = headers.get(b"content-length"), self._settings.max_body_bytes
            if body_arrived(receive):  # asyncio.timeout costs ~4 µs a request: not needed
                body = (
                    arrived_body(await receive(), receive, length, limit)
                    if not gzipped
                    else await read_body(receive, length, gzipped, limit)
                )
            else:
                async with asyncio.timeout(self._settings.body_timeout_seconds):
                    body = await read_body(receive, length, gzipped, limit)
        except BodyRefused as refused:
            return refused.reply, cors
        except TimeoutError:
            return body_timed_out(self._settings.body_timeout_seconds), cors
        return await self.handle(scope, headers, key, body), cors

    def start(self, scope: dict[str, Any], body: bytes) -> Started | None:
        """What ``answer`` does for a request whose whole body is in (``body``), up to the
        call to the server, when no step of it would wait or refuse: the request sent on,
        for a caller that waits for its answer without a coroutine (rest_bridge.hot). None
        (nothing done) otherwise: ``answer`` is to serve it. So this takes a subset of what
        ``answer`` takes, and does to it exactly what ``answer`` would."""
        headers = dict(scope["headers"])
        key, source = api_key(headers, scope["query_string"])
        cors: list[tuple[bytes, bytes]] = []
        if (origin := headers.get(b"origin")) is not None:
            decision = self._cors.known(origin.decode("latin-1"), key)
            if decision is None:
                return None
            cors = self._cors.response_headers(origin, decision)
        if b"content-encoding" in headers or not self._admission.admitted(headers, key):
            return None
        try:
            check_media_type(headers.get(b"content-type"), source)
        except BodyRefused:
            return None
        limit = self._settings.max_body_bytes
        if len(body) > limit or declared_length(headers.get(b"content-length")) > limit:
            return None
        request = self._parser.parse_inline(body, self.rules)
        if request is None or isinstance(request, Reply):
            return None
        client = scope["client"]
        metadata = forwarded_metadata(headers, client[0] if client else "", key)
        future = self._gatherer.submit(request, metadata)
        if future is None:
            return None
        return Started(future, request, headers, key, body, cors)

    def finish(self, started: Started) -> Reply:
        """The reply to a request ``start`` sent on, once its answer is in."""
        error = started.future.exception()
        if error is None:
            return Reply(200, response_bytes(started.future.result()))
        if not isinstance(error, grpc.aio.AioRpcError):
            raise error
        request = started.request
        return self.refused(
            error, lambda: self.tenants(request), started.headers, started.key, started.body
        )

    def tenants(self, request: Any) -> list[str]:
        """The tenants ``request`` names (for the record of a request refused as too large)."""
        raise NotImplementedError

    def call(self, request: Any, metadata: Metadata) -> Awaitable[pb.CreateEventsResponse]:
        """The server's answer to ``request``, through the gatherer (as ``start`` sends it)."""
        raise NotImplementedError

    async def handle(
        self, scope: dict[str, Any], headers: dict[bytes, bytes], key: str | None, body: bytes
    ) -> Reply:
        """The reply to one request with its whole (inflated) JSON body."""
        request = await self.parse(body, self.rules, key, headers)
        if isinstance(request, Reply):
            return request
        return await self.forward(request, lambda: self.tenants(request), scope, headers, key, body)

    async def parse(
        self, body: bytes, rules: Rules[T], key: str | None, headers: dict[bytes, bytes]
    ) -> T | Reply:
        """What ``body`` becomes by ``rules``, or its refusal (a 422 recorded as rejected)."""
        inline = self._parser.parse_inline(body, rules)  # without a coroutine, when it can
        result, tenants = (
            (inline, None) if inline is not None else await self._parser.parse(body, rules)
        )
        if isinstance(result, Reply) and result.status == UNPROCESSABLE:
            self.report(body, orjson.loads(result.body)["detail"], key, headers, tenants)
        return result

    async def forward(  # noqa: PLR0917
        self,
        request: Any,
        tenants: Callable[[], list[str]],
        scope: dict[str, Any],
        headers: dict[bytes, bytes],
        key: str | None,
        body: bytes,
    ) -> Reply:
        """The server's answer to ``request`` (sent by ``call``) as the HTTP reply.

        ``tenants``: those the request names, for the record of a request gRPC refuses as
        too large before the server sees it (which the bridge records itself).
        """
        client = scope.get("client")
        metadata = forwarded_metadata(headers, client[0] if client else "", key)
        try:
            response = await self.call(request, metadata)
        except grpc.aio.AioRpcError as error:
            return self.refused(error, tenants, headers, key, body)
        return Reply(200, response_bytes(response))

    def refused(
        self,
        error: grpc.aio.AioRpcError,
        tenants: Callable[[], list[str]],
        headers: dict[bytes, bytes],
        key: str | None,
        body: bytes,
    ) -> Reply:
        """The HTTP reply to a call the server (or gRPC) refused."""
        reply = grpc_error_response(error, self._settings.retry_after_seconds, self.locate)
        if reply.status == REQUEST_TOO_LARGE:
            message = orjson.loads(reply.body)["detail"]
            detail = [validation_detail(["body"], message, "request_too_large")]
            self.report(body, detail, key, headers, tenants())
        return reply

    def report(
        self,
        body: bytes,
        detail: list[dict[str, Any]],
        key: str | None,
        headers: dict[bytes, bytes],
        tenants: list[str] | None,
    ) -> None:
        """Report ``body`` (the inflated one, at most max_body_bytes, never a gzip bomb) in
        the background; ``tenants``: those it names, when known (else read from it)."""
        if self._rejected is not None:
            origin = headers.get(b"origin")
            page = origin.decode("latin-1") if origin else None
            self._rejected.report(body, detail, key, page, tenants)
