"""The REST bridge: the JSON contract of ``POST /create-events``, translated to gRPC."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any
from urllib.parse import quote

import grpc
from fastapi import FastAPI, Header, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from fastapi.security import APIKeyCookie, APIKeyHeader, APIKeyQuery
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import WithJsonSchema

from events_server.codec import event_from_dict
from events_server.logs import REQUEST_ID_HEADER, new_request_id, request_id
from events_server.pb import events_pb2 as pb
from events_server.pb import events_pb2_grpc
from events_server.server import SERVICE_NAME
from events_server.service import (
    MD_API_KEY,
    MD_FORWARDED_FOR,
    MD_FORWARDED_HOST,
    MD_REFERER,
    MD_USER_AGENT,
)
from rest_bridge.access import AccessMiddleware
from rest_bridge.config import BridgeSettings
from rest_bridge.contract import DESCRIPTION, TAG, ValidationErrorItem
from rest_bridge.errors import grpc_error_response, validation_detail
from rest_bridge.metrics import BridgeMetrics
from rest_bridge.models import Event, unencodable_locations

STATUS_NAMES = {
    pb.EventResult.STATUS_ACCEPTED: "accepted",
    pb.EventResult.STATUS_DUPLICATE: "duplicate",
}

# Forwarded header values are cut to this many characters: gRPC refuses calls
# whose metadata passes 8 KiB, and no real user agent or referer is this long.
MAX_FORWARDED_CHARS = 2048

# Printable ASCII but "%": what may pass into gRPC metadata unescaped.
_METADATA_SAFE = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "%")

# Contract header parameters: plain `type: string` in the schema, None when absent.
OptionalHeader = Annotated[str | None, WithJsonSchema({"type": "string"}), Header()]

api_key_query = APIKeyQuery(name="api_key", auto_error=False)
api_key_header = APIKeyHeader(name="X-API-KEY", auto_error=False)
api_key_cookie = APIKeyCookie(name="X-API-KEY", auto_error=False)


def metadata_value(value: str, limit: int = MAX_FORWARDED_CHARS) -> str:
    """A header value fit for gRPC metadata: printable ASCII, else percent-encoded bytes."""
    value = value[:limit]
    if value.isascii() and value.isprintable():
        return value
    # Starlette decodes header bytes as latin-1, so this recovers the raw bytes.
    return quote(value.encode("latin-1", "replace"), safe=_METADATA_SAFE)[:limit]


def forwarded_metadata(
    request: Request, api_key: str | None, referer: str | None, user_agent: str | None
) -> list[tuple[str, str]]:
    """The gRPC metadata for a call made on behalf of this HTTP request (grpc-gateway style)."""
    # Set by AccessMiddleware; the server logs its lines under the same id.
    metadata = [(REQUEST_ID_HEADER, request_id.get() or new_request_id())]
    if api_key:
        metadata.append((MD_API_KEY, metadata_value(api_key)))
    if user_agent is not None:
        metadata.append((MD_USER_AGENT, metadata_value(user_agent)))
    if referer is not None:
        metadata.append((MD_REFERER, metadata_value(referer)))
    peer = request.client.host if request.client else ""
    chain = request.headers.get("x-forwarded-for")
    # The peer goes last; cut from the left so that the right end, the part
    # written by proxies we trust, survives.
    forwarded_for = f"{chain}, {peer}" if chain else peer
    metadata.append((MD_FORWARDED_FOR, metadata_value(forwarded_for[-MAX_FORWARDED_CHARS:])))
    forwarded_host = request.headers.get("x-forwarded-host") or request.headers.get("host")
    if forwarded_host:
        metadata.append((MD_FORWARDED_HOST, metadata_value(forwarded_host)))
    return metadata


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


def create_app(settings: BridgeSettings) -> FastAPI:
    """The bridge app; its gRPC channel opens and closes with the app's lifespan."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with grpc.aio.insecure_channel(settings.grpc_target) as channel:
            app.state.events = events_pb2_grpc.EventsServiceStub(channel)
            app.state.health = health_pb2_grpc.HealthStub(channel)
            yield

    app = FastAPI(title="Event ingestion", version="1.0", lifespan=lifespan)
    metrics = BridgeMetrics()
    app.add_middleware(AccessMiddleware, metrics=metrics, ip_mode=settings.log_client_ip)

    @app.exception_handler(RequestValidationError)
    async def contract_422(request: Request, exc: RequestValidationError) -> JSONResponse:
        detail = [validation_detail(list(e["loc"]), e["msg"], e["type"]) for e in exc.errors()]
        return JSONResponse({"detail": detail}, status_code=422)

    @app.post(
        "/create-events",
        tags=[TAG],
        summary="Create Events",
        description=DESCRIPTION,
        response_model=None,
    )
    async def create_events(  # noqa: PLR0917 (FastAPI declares parameters positionally)
        http_request: Request,
        request: list[Event],
        referer: OptionalHeader = None,
        user_agent: OptionalHeader = None,
        x_forwarded_for: OptionalHeader = None,
        x_forwarded_host: OptionalHeader = None,
        key_in_query: str | None = Security(api_key_query),
        key_in_header: str | None = Security(api_key_header),
        key_in_cookie: str | None = Security(api_key_cookie),
    ) -> JSONResponse:
        # x_forwarded_for and x_forwarded_host are declared for the contract and
        # read from the raw headers (with the peer appended) in forwarded_metadata.
        api_key = key_in_header or key_in_query or key_in_cookie
        try:
            call = pb.CreateEventsRequest(events=[event_from_dict(vars(e)) for e in request])
        except UnicodeEncodeError:
            detail = [
                validation_detail(
                    loc, "String should be valid UTF-8 (no lone surrogates)", "string_unicode"
                )
                for loc in unencodable_locations(request)
            ]
            return JSONResponse({"detail": detail}, status_code=422)
        try:
            reply = await http_request.app.state.events.CreateEvents(
                call,
                timeout=settings.grpc_timeout_seconds,
                metadata=forwarded_metadata(http_request, api_key, referer, user_agent),
            )
        except grpc.aio.AioRpcError as error:
            return grpc_error_response(error, settings.retry_after_seconds)
        return JSONResponse(response_body(reply))

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", include_in_schema=False)
    async def readyz(request: Request) -> JSONResponse:
        try:
            reply = await request.app.state.health.Check(
                health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=1.0
            )
        except grpc.aio.AioRpcError as error:
            return JSONResponse({"status": error.code().name}, status_code=503)
        ready = reply.status == health_pb2.HealthCheckResponse.SERVING
        name = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        return JSONResponse({"status": name}, status_code=200 if ready else 503)

    @app.get("/metrics", include_in_schema=False)
    async def metrics_endpoint() -> Response:
        return Response(generate_latest(metrics.scrape), media_type=CONTENT_TYPE_LATEST)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title, version=app.version, routes=app.routes, tags=app.openapi_tags
            )
            # Match the 422 bodies we really send (see ValidationErrorItem).
            schema["components"]["schemas"]["ValidationError"] = (
                ValidationErrorItem.model_json_schema()
            )
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
